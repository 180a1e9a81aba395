"""The Keras callbacks of a training worker: resumable early stopping, the time limit that re-plans the learning
rate's decay, throughput, snapshots, and Ray Train checkpoint reports.

Each is a module-level class that gets what it needs in its constructor (no shared closures), so each can be
tested on its own with a real Keras model; `make_callbacks` wires them for one worker (pipeline.train.training).
Importing this module imports TensorFlow (tf-keras): only workers and tests do.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from pipeline.io.images import encode_png
from pipeline.model.network import save_model
from pipeline.model.tfkeras import keras, tf
from pipeline.train.files import epoch_line, say
from pipeline.train.schedule import encoder_scale_at, epochs_that_fit, learning_rate_at


class EpochPlan:
    """How many epochs the run will have: the configured number, lowered by TimeLimit to those that fit; the
    learning-rate schedule reads it so its decay ends with the run."""

    def __init__(self, epochs: int):
        self.epochs = epochs


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose best value, patience count and best weights survive a restart (`saved`: the
    checkpoint's state.json "early_stopping" entry and its best weights)."""

    def __init__(self, saved: dict | None = None, best_weights=None, **kwargs):
        super().__init__(**kwargs)
        self.saved, self.saved_best_weights = saved, best_weights

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.saved:
            self.best, self.wait, self.best_epoch = self.saved["best"], self.saved["wait"], self.saved["best_epoch"]
            self.best_weights = self.saved_best_weights

    def state(self) -> dict:
        """What a checkpoint keeps of it (state.json)."""
        return {"best": float(self.best), "wait": int(self.wait), "best_epoch": int(self.best_epoch)}


class Throughput(keras.callbacks.Callback):
    """Adds `epoch_seconds`, `steps` (training batches this epoch, counted) and `samples_per_second` (all workers
    together, `rows` training rows on each of `world` workers) to each epoch's logs."""

    def __init__(self, rows: int, world: int = 1):
        super().__init__()
        self.rows, self.world = rows, world

    def on_epoch_begin(self, epoch, logs=None):
        self.started, self.steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        logs["epoch_seconds"], logs["steps"] = seconds, self.steps
        logs["samples_per_second"] = self.rows * self.world / seconds


class EncoderSchedule(keras.callbacks.Callback):
    """Sets the encoder's step scale each epoch to `scale_at(epoch)` (optimizers without one, plain Adam, are left
    alone)."""

    def __init__(self, scale_at):
        super().__init__()
        self.scale_at = scale_at

    def on_epoch_begin(self, epoch, logs=None):
        if hasattr(self.model.optimizer, "encoder_scale"):
            self.model.optimizer.encoder_scale.assign(self.scale_at(epoch))


class TimeLimit(keras.callbacks.Callback):
    """Stops after the last epoch that can finish before `deadline` (epoch seconds; 0: none); rank 0 decides for
    every worker.

    After each epoch it also re-plans how many epochs fit (at the last epoch's speed) into `plan`, so the learning
    rate's decay ends when the run does rather than at an epoch it will never reach. `reserved_epochs` epochs'
    time is kept free before the deadline for the work after training (the --tune step).
    """

    def __init__(self, deadline: float, plan: EpochPlan, reserved_epochs: float = 0.0, rank: int = 0, world: int = 1,
                 minutes: float = 0.0, output: str = ""):
        super().__init__()
        self.deadline, self.plan, self.reserved_epochs, self.output = deadline, plan, reserved_epochs, output
        self.rank, self.world, self.minutes = rank, world, minutes
        self.configured = plan.epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if not self.deadline:
            return
        now = time.time()
        fit = epochs_that_fit(epoch + 1, self.deadline - now, now - self.started, self.reserved_epochs)
        if self.world > 1:
            from ray.train.collective import broadcast_from_rank_zero

            fit = broadcast_from_rank_zero(fit)
        self.plan.epochs = min(self.configured, fit)
        if fit <= epoch + 1:
            if self.rank == 0:
                after = " with time left for the tune step" if self.reserved_epochs else ""
                say(self.output, f"time limit: stopping after epoch {epoch + 1} (another would not end{after} "
                                 f"within {self.minutes:g} minutes)")
            self.model.stop_training = True


def snapshot_strip(images: np.ndarray, truth: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """input | true mask | predicted mask, one row per image, as RGB uint8."""
    classes = logits.shape[-1]
    scale = 255 // max(1, classes - 1)
    rows = []
    for image, mask, logit in zip(images, truth, logits):
        as_rgb = lambda labels: np.repeat((labels.astype(np.uint8) * scale)[..., None], 3, axis=2)  # noqa: E731
        rows.append(np.concatenate([(image * 255).astype(np.uint8), as_rgb(mask[..., 0]),
                                    as_rgb(np.argmax(logit, axis=-1))], axis=1))
    return np.concatenate(rows, axis=0)


class Snapshots(keras.callbacks.Callback):
    """Each epoch, draws fixed validation images with their truth and prediction: OUTPUT/snapshots/epoch_NNN.png and
    TensorBoard (rank 0 writes; every rank predicts, as MWMS models must be called on all of them)."""

    def __init__(self, images, masks, output: str, rank: int = 0):
        super().__init__()
        self.images, self.masks, self.output, self.rank = images, masks, output, rank
        self.writer = tf.summary.create_file_writer(os.path.join(output, "tensorboard", "snapshots")) \
            if rank == 0 and images is not None else None

    def on_epoch_end(self, epoch, logs=None):
        if self.images is None or not len(self.images):
            return
        logits = self.model(self.images, training=False).numpy()
        if self.rank != 0:
            return
        strip = snapshot_strip(self.images, self.masks, logits)
        folder = os.path.join(self.output, "snapshots")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"epoch_{epoch + 1:03d}.png"), "wb") as stream:
            stream.write(encode_png(strip))
        with self.writer.as_default():
            tf.summary.image("input | truth | prediction", strip[None], step=epoch)
            self.writer.flush()


def report_checkpoint(model, metrics: dict, name: str, worker_state: dict, best_weights, rank: int) -> None:
    """Every rank saves the model (MWMS needs all of them to); rank 0 reports it to Ray Train as checkpoint `name`,
    with the worker state (state.json) and early stopping's best weights (best_weights.npz)."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        save_model(model, os.path.join(folder, "model.keras"))
        if rank == 0:
            if best_weights is not None:
                np.savez(os.path.join(folder, "best_weights.npz"), *best_weights)
            with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as stream:
                json.dump(worker_state, stream)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)
        else:
            ray.train.report(metrics)


class ReportCheckpoint(keras.callbacks.Callback):
    """After each epoch: rank 0 appends the metrics to OUTPUT/history.jsonl, and every rank reports a checkpoint
    named `prefix` + the epoch number (report_checkpoint)."""

    def __init__(self, output: str, early_stopping: ResumableEarlyStopping, prefix: str, rank: int = 0,
                 epochs: int = 0):
        super().__init__()
        self.output, self.early_stopping, self.prefix, self.rank = output, early_stopping, prefix, rank
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        metrics["epoch"] = epoch + 1
        if self.rank == 0:
            with open(os.path.join(self.output, "history.jsonl"), "a", encoding="utf-8") as log:
                log.write(json.dumps(metrics) + "\n")
            say(self.output, epoch_line(metrics, self.epochs))
        worker_state = {"epoch": epoch + 1, "early_stopping": self.early_stopping.state()}
        report_checkpoint(self.model, metrics, f"{self.prefix}{epoch + 1:04d}", worker_state,
                          self.early_stopping.best_weights, self.rank)


def make_callbacks(config, rank: int, world: int, state: dict, snapshot_images, snapshot_masks, train_rows: int,
                   deadline: float, reserved_epochs: float, checkpoint_prefix: str):
    """One worker's callbacks in order (LR schedule, early stopping, throughput, time limit, TensorBoard on rank 0,
    snapshots, checkpoint reports) and its early stopping (whose best epoch the final report gives)."""
    output = os.path.abspath(config.output)
    keep_best = config.keep == "best"  # "last": the callback only records the best epoch; it never stops nor restores
    early_stopping = ResumableEarlyStopping(state.get("early_stopping"), state.get("best_weights"), monitor="val_loss",
                                            patience=config.patience if keep_best else config.epochs,
                                            restore_best_weights=keep_best, start_from_epoch=config.warmup_epochs,
                                            verbose=1 if rank == 0 else 0)
    plan = EpochPlan(config.epochs)
    callbacks = [keras.callbacks.LearningRateScheduler(lambda epoch, _: learning_rate_at(epoch, config, plan.epochs)),
                 EncoderSchedule(lambda epoch: encoder_scale_at(epoch, config)), early_stopping,
                 Throughput(train_rows, world),
                 TimeLimit(deadline, plan, reserved_epochs, rank, world, config.time_limit, output)]
    if rank == 0:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=os.path.join(output, "tensorboard"), write_graph=False,
                                                     profile_batch=0))
    callbacks += [Snapshots(snapshot_images, snapshot_masks, output, rank),
                  ReportCheckpoint(output, early_stopping, checkpoint_prefix, rank, config.epochs)]
    return callbacks, early_stopping
