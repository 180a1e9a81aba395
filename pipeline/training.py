"""Distributed training with Ray Train: TensorflowTrainer + MultiWorkerMirroredStrategy + tf-keras fit.

The driver (`run_training`) lists and preprocesses data with Ray Data, starts the trainer and, when it
finishes, copies the best model out of Ray's checkpoint storage into the run folder as `model.keras`.
Each worker (`train_loop_per_worker`) builds or restores the model inside the strategy scope and fits
on its own shard; every epoch it reports a checkpoint, so a lost worker resumes from the last one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import numpy as np

from pipeline.config import TrainConfig, removed_options_used
from pipeline.fileio import write_text_atomic
from pipeline.registry import sha256_of
from pipeline.runinfo import ARCHITECTURE, DEFAULT_TILE, FORMAT, Postprocess, RunInfo
from pipeline.tuning import TUNE_COST_IN_EPOCHS, will_tune

CHECKPOINT_PREFIX = "epoch_"
FINAL_CHECKPOINT = "final"
BACKBONE_FILE = "backbone.json"  # rank 0 writes where the encoder's weights came from


# ---------------------------------------------------------------- worker side

def epochs_that_fit(done: int, seconds_left: float, epoch_seconds: float, reserved_epochs: float = 0.0) -> int:
    """How many epochs a time-limited run can reach: those done, plus the whole epochs (at the last one's speed)
    that end before the deadline with `reserved_epochs` epochs' time still left (for the --tune step)."""
    return done + max(0, int(seconds_left // max(epoch_seconds, 1e-3) - reserved_epochs))


def learning_rate_at(epoch: int, config: TrainConfig, epochs: int | None = None) -> float:
    """Linear warm-up for `warmup_epochs`, then cosine decay to 5% of the peak at the last epoch.

    `epochs` is the number of epochs the run will actually have (fewer than config.epochs when a time
    limit cuts it short), so the decay still ends at the run's last epoch.
    """
    peak = config.learning_rate
    if epoch < config.warmup_epochs:
        return peak * (epoch + 1) / (config.warmup_epochs + 1)
    span = max(1, min(config.epochs, epochs or config.epochs) - config.warmup_epochs)
    progress = min(1.0, (epoch - config.warmup_epochs) / span)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def encoder_scale_at(epoch: int, config: TrainConfig) -> float:
    """The encoder's step as a fraction of the decoder's: 0 during a frozen warm-up, then --encoder-lr-scale."""
    return 0.0 if epoch < config.frozen_encoder_epochs else config.encoder_lr_scale


def encoder_scale(config: TrainConfig) -> float | None:
    """The first epoch's encoder scale, or None when the encoder trains as the rest (plain Adam)."""
    if config.frozen_encoder_epochs <= 0 and config.encoder_lr_scale == 1.0:
        return None
    return encoder_scale_at(0, config)


# Haematoxylin, eosin and DAB optical densities of one unit of each stain (Ruifrok & Johnston 2001, as
# skimage.color.rgb_from_hed), rows normalised; their inverse turns a pixel's optical density into stain amounts.
STAIN_VECTORS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
STAIN_VECTORS = STAIN_VECTORS / np.linalg.norm(STAIN_VECTORS, axis=1, keepdims=True)


def stain_jitter(image, scale, shift, min_colour: float = 0.04):
    """A stained crop as if its haematoxylin / eosin / DAB amounts were each multiplied by `scale` and shifted by
    `shift` (optical density); crops with no colour (fluorescence, grey) come back unchanged.

    The crops are the model's `colour` appearance, inverted (nuclei bright), so the light reaching the camera
    is 1 - value. Stain-space colour augmentation (Tellez et al. 2018, 2019: "HED" jitter) imitates how H&E
    staining varies between labs (the variation between DSB2018's stained images), unlike a channel shuffle.
    """
    from pipeline.tfkeras import tf

    light = tf.clip_by_value(1.0 - image, 1.0 / 255.0, 1.0)
    density = -tf.math.log(light)
    stains = tf.constant(STAIN_VECTORS, tf.float32)
    amounts = tf.einsum("...c,cs->...s", density, tf.constant(np.linalg.inv(STAIN_VECTORS), tf.float32))
    amounts = amounts * scale + shift
    jittered = 1.0 - tf.exp(-tf.einsum("...s,sc->...c", amounts, stains))
    coloured = tf.reduce_mean(tf.abs(image - tf.reduce_mean(image, axis=-1, keepdims=True))) > min_colour
    return tf.where(coloured, tf.clip_by_value(jittered, 0.0, 1.0), image)


def epoch_augmentation(image, mask, colour: bool = False, stain: float = 0.0):
    """A fresh random flip and 90-degree turn of a training crop every epoch (image and mask alike).

    With `colour`, also a random channel order (half the crops) and grey (one in five) for the image alone:
    DSB2018's 1st place found channel shuffle and colour/grey remapping "very important" for stained tissue,
    so the model learns nuclei by their contrast with their surroundings rather than one stain's hue.
    `stain` > 0: each stain's amount scaled by 1 +- stain and shifted by +- stain / 4 (see stain_jitter).
    """
    from pipeline.tfkeras import tf

    both = tf.concat([image, tf.cast(mask, image.dtype)], axis=-1)
    both = tf.image.random_flip_left_right(both)
    both = tf.image.rot90(both, tf.random.uniform([], 0, 4, dtype=tf.int32))
    image, mask = both[..., :3], tf.cast(both[..., 3:], mask.dtype)
    if colour:
        order = tf.where(tf.random.uniform([]) < 0.5, tf.random.shuffle(tf.range(3)), tf.range(3))
        image = tf.gather(image, order, axis=-1)
        grey = tf.repeat(tf.reduce_mean(image, axis=-1, keepdims=True), 3, axis=-1)
        image = tf.where(tf.random.uniform([]) < 0.2, grey, image)
    if stain > 0:
        image = stain_jitter(image, tf.random.uniform([3], 1.0 - stain, 1.0 + stain),
                             tf.random.uniform([3], -stain / 4, stain / 4))
    return image, mask


def train_loop_per_worker(loop_config: dict) -> None:
    """Body run by every Ray Train worker: MWMS scope, model, shards of the data, fit, final report."""
    import ray
    import ray.train
    from pipeline.callbacks import make_callbacks, report_checkpoint
    from pipeline.model import CUSTOM_OBJECTS, build_unet, compile_model, load_model
    from pipeline.tfkeras import keras, tf

    config = TrainConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    print(f"worker rank {rank} of {world} on node {ray.get_runtime_context().get_node_id()[:12]} "
          f"({os.uname().nodename})", flush=True)
    keras.utils.set_random_seed(config.seed)
    # One worker has nothing to all-reduce, and any tf.distribute strategy doubles the CPU step time here
    # (measured with TF 2.21: 17 s vs 8.6 s per epoch for the same fit), so it trains under the default one.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()

    state: dict = {}
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as folder:
                model = keras.models.load_model(os.path.join(folder, "model.keras"), custom_objects=CUSTOM_OBJECTS,
                                                safe_mode=True)
                with open(os.path.join(folder, "state.json"), encoding="utf-8") as stream:
                    state = json.load(stream)
                if hasattr(model.optimizer, "scale_encoder"):
                    model.optimizer.scale_encoder(model.get_layer("encoder").trainable_weights)
                best_path = os.path.join(folder, "best_weights.npz")
                if os.path.exists(best_path):
                    with np.load(best_path) as saved:
                        state["best_weights"] = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            if rank == 0:
                print(f"resuming from the checkpoint of epoch {state.get('epoch', 0)}", flush=True)
                _truncate_history(config.output, int(state.get("epoch", 0)))
        elif config.init_from:  # fine-tuning: the given model's weights are the starting point
            model = compile_model(load_model(config.init_from)[0], config.learning_rate, config.num_classes,
                                  config.loss, encoder_scale(config))
        else:
            model = compile_model(build_unet(config.image_size, config.num_classes, config.backbone_weights,
                                             config.encoder_width, config.freeze_encoder, config.bn_momentum,
                                             decoder_width=config.decoder_width),
                                  config.learning_rate, config.num_classes, config.loss, encoder_scale(config))
            if rank == 0:  # where the encoder's weights came from, for run.json (the driver cannot tell)
                write_text_atomic(os.path.join(os.path.abspath(config.output), BACKBONE_FILE),
                                  json.dumps({"backbone_init": model.backbone_source}))

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF

    def shard(name: str, shuffle: bool):
        """This worker's Ray Data shard, read once into memory, as a distributed dataset of per-worker batches.

        Reading the shard once avoids a Ray Data epoch barrier inside every Keras epoch (prefetching
        across it can deadlock the workers); going through distribute_datasets_from_function stops
        Keras from re-batching each worker's batches as global ones (an empty split batch: NaN loss).
        The rows are `normalise`d uint8 images, so they are held as uint8 (a quarter of the memory) and turned
        back into exactly the same floats as they are batched.
        """
        columns = {"image": [], "mask": []}
        for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="numpy"):
            columns["image"].append(np.round(batch["image"] * 255.0).astype(np.uint8))
            columns["mask"].append(batch["mask"])
        images, masks = np.concatenate(columns["image"]), np.concatenate(columns["mask"])
        sizes[name] = len(images)

        def make(_context):
            dataset = tf.data.Dataset.from_tensor_slices((images, masks))
            if shuffle:
                dataset = dataset.shuffle(len(images), seed=config.seed + rank, reshuffle_each_iteration=True)
            dataset = dataset.map(as_floats, num_parallel_calls=tf.data.AUTOTUNE)
            if shuffle and config.augment:
                dataset = dataset.map(flip_and_turn, num_parallel_calls=tf.data.AUTOTUNE)
            dataset = dataset.batch(config.batch_size)
            if config.num_classes == 3 and config.border_weight != 1.0:
                dataset = dataset.map(with_class_weights)
            return dataset.repeat().prefetch(2).with_options(options)

        return strategy.distribute_datasets_from_function(make)

    def as_floats(image, mask):
        return tf.cast(image, tf.float32) * (1.0 / 255.0), mask  # pipeline.images.normalise, bit for bit

    def flip_and_turn(image, mask):
        return epoch_augmentation(image, mask, config.colour_augment, config.stain_augment)

    class_weights = tf.constant([1.0, 1.0, config.border_weight], tf.float32)

    def with_class_weights(image, mask):
        return image, mask, tf.gather(class_weights, tf.cast(mask[..., 0], tf.int32))

    sizes: dict[str, int] = {}
    train_data, val_data = shard("train", True), shard("val", False)

    def steps(name: str) -> int:
        return max(1, math.ceil(sizes[name] / config.batch_size))  # Ray splits equally: same on every worker

    snapshots = loop_config.get("snapshots") or {}
    callbacks, early_stopping = make_callbacks(
        config, rank, world, state, snapshots.get("image"), snapshots.get("mask"), train_rows=sizes["train"],
        deadline=float(loop_config.get("deadline") or 0.0),
        reserved_epochs=float(loop_config.get("reserved_epochs") or 0.0), checkpoint_prefix=CHECKPOINT_PREFIX)
    initial_epoch = int(state.get("epoch", 0))
    if initial_epoch < config.epochs:
        model.fit(train_data, validation_data=val_data, epochs=config.epochs,
                  steps_per_epoch=steps("train"), validation_steps=steps("val"), initial_epoch=initial_epoch, callbacks=callbacks, verbose=2 if rank == 0 else 0)
    elif state.get("best_weights") is not None:
        model.set_weights(state["best_weights"])
    final = {"final": 1, "epoch": initial_epoch if initial_epoch >= config.epochs else early_stopping_epoch(model),
             "best_epoch": int(early_stopping.best_epoch) + 1, "best_val_loss": float(early_stopping.best)}
    report_checkpoint(model, final, FINAL_CHECKPOINT, {"epoch": config.epochs, "final": True}, None, rank)


def _truncate_history(output: str, last_epoch: int) -> None:
    """Drop history.jsonl lines of epochs after the checkpoint a run resumes from (they are redone)."""
    path = os.path.join(os.path.abspath(output), "history.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as stream:
            kept = [line for line in stream if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch]
        write_text_atomic(path, "".join(kept))


def early_stopping_epoch(model) -> int:
    history = getattr(model, "history", None)
    epochs = getattr(history, "epoch", None) or [0]
    return int(epochs[-1]) + 1


# ---------------------------------------------------------------- driver side

def _saved_config(output: str) -> TrainConfig:
    """The settings of the interrupted run in `output`, to be continued (`--resume`)."""
    paths = [os.path.join(output, name) for name in ("ray_run.json", "config.json")]
    if not all(os.path.exists(path) for path in paths):
        raise FileNotFoundError(f"--resume: no interrupted run in {output} (ray_run.json or config.json missing)")
    with open(paths[1], encoding="utf-8") as stream:
        text = stream.read()
    used = removed_options_used(json.loads(text))
    if used:
        raise ValueError(f"--resume: {paths[1]}: {used}; it cannot be resumed")
    return dataclasses.replace(TrainConfig.from_json(text), output=output, resume=True)


def _snapshot_arrays(val_dataset, count: int) -> dict | None:
    if count <= 0 or val_dataset.count() == 0:
        return None
    batch = val_dataset.take_batch(count, batch_format="numpy")
    return {"image": np.asarray(batch["image"]), "mask": np.asarray(batch["mask"])}


def _check_init_from(config: TrainConfig) -> None:
    """Refuse an --init-from model whose architecture or input handling (pipeline.runinfo.ARCHITECTURE) differs from
    this run's flags."""
    from pipeline.registry import read_model_info

    trained = read_model_info(config.init_from).trained_options()
    differ = [key for key in ARCHITECTURE if key in trained and trained[key] != getattr(config, key)]
    if differ:
        raise ValueError(f"--init-from {config.init_from}: it differs from this run in {', '.join(differ)} "
                         f"(give the flags or --preset it was trained with)")


def run_training(config: TrainConfig) -> dict:
    """Train as configured; returns run.json's content (as a dict). The run folder ends with model.keras beside it."""
    from pipeline.data import (ensure_ray, extra_training_refs, image_kinds, protocol_refs, refs_of_kinds, split_refs,
                               training_dataset, training_refs)

    started = time.time()
    output = os.path.abspath(config.output)
    os.makedirs(output, exist_ok=True)
    run_state_path = os.path.join(output, "ray_run.json")
    if config.resume:
        config = _saved_config(output)
    # Workers run in Ray's own working directory: they must get the run folder as an absolute path.
    config = dataclasses.replace(config, output=output,
                                 init_from=os.path.abspath(config.init_from) if config.init_from else "")
    ensure_ray(log_to_driver=True)
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    refs = training_refs(config.data, config.synthetic_count, config.seed)
    kinds = image_kinds(refs) if config.kinds or config.holdout in ("protocol", "refit") else None  # decoded once
    if config.holdout in ("protocol", "refit"):  # test split never seen; tune split drives choices
        splits = protocol_refs(refs, known=kinds)
        train_refs, val_refs = splits["train"], splits["tune"]
        if config.holdout == "refit":  # the tune split joins training: its validation figures are no longer held out
            train_refs = train_refs + val_refs
            print("refit: training on the train and tune splits; validation loss (tune split) is not held out",
                  flush=True)
        print(f"evaluation protocol: {len(splits['test'])} test images held out, never seen", flush=True)
    else:
        train_refs, val_refs = split_refs(refs, config.val_fraction, config.seed)
    if config.kinds:  # a specialist: one kind of image, in training and in validation
        train_refs, val_refs = (refs_of_kinds(part, config.kinds, kinds) for part in (train_refs, val_refs))
        print(f"--kinds {config.kinds}: {len(train_refs)} training and {len(val_refs)} validation images of that kind",
              flush=True)
        if not train_refs or not val_refs:
            raise ValueError(f"--kinds {config.kinds}: {config.data} has {len(train_refs)} training and "
                             f"{len(val_refs)} validation images of that kind; a specialist needs both")
    if config.extra_data:
        extra = extra_training_refs(config.extra_data, {ref.image_id for ref in refs})
        if config.kinds:
            extra = refs_of_kinds(extra, config.kinds)
        train_refs = train_refs + extra
        print(f"--extra-data: {len(extra)} more training images", flush=True)
    if config.init_from:
        _check_init_from(config)
    if len(val_refs) < config.workers or len(train_refs) < config.workers:
        raise ValueError(f"{len(refs)} images are too few for {config.workers} workers with --val-fraction "
                         f"{config.val_fraction}: every worker needs training and validation images")
    print(f"data: {len(train_refs)} training and {len(val_refs)} validation images from {config.data}", flush=True)
    options = dict(mode=config.mode, appearance=config.appearance, crops_per_image=config.crops_per_image,
                   seed=config.seed, nucleus_area=config.nucleus_area)
    train_data = training_dataset(train_refs, config.image_size, config.max_pixels, config.num_classes, config.blocks,
                                  augment=config.augment, crops_per_rare_image=config.crops_per_rare_image, **options)
    val_data = training_dataset(val_refs, config.image_size, config.max_pixels, config.num_classes, config.blocks,
                                augment=False, **options)

    storage = config.storage or os.path.join(output, "ray")
    if config.resume:
        with open(run_state_path, encoding="utf-8") as stream:
            name = json.load(stream)["name"]
        # Ray Train restores a run from the latest checkpoint recorded under the same name and storage.
        print(f"resuming run {name} from its latest checkpoint in {storage}", flush=True)
    else:
        name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        write_text_atomic(run_state_path, json.dumps({"name": name, "storage": storage}))
    write_text_atomic(os.path.join(output, "config.json"), config.to_json())

    use_gpu = config.gpu == "yes" or (config.gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= config.workers)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(config), "snapshots": _snapshot_arrays(val_data, config.snapshots),
                           "sizes": {"train": len(train_refs), "val": len(val_refs)},
                           "deadline": started + config.time_limit * 60 if config.time_limit > 0 else 0.0,
                           "reserved_epochs": TUNE_COST_IN_EPOCHS if will_tune(dataclasses.asdict(config)) else 0.0},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker},
                                               placement_strategy=config.placement),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_data, "val": val_data},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        shutil.copyfile(os.path.join(folder, "model.keras"), os.path.join(output, ".model.keras.partial"))
    os.replace(os.path.join(output, ".model.keras.partial"), os.path.join(output, "model.keras"))

    history = _read_history(output)
    final = result.metrics or {}
    best = next((row for row in history if math.isfinite(final.get("best_val_loss", math.inf))
                 and row.get("epoch") == final.get("best_epoch")), None) \
        or min((row for row in history if "val_loss" in row), key=lambda row: row["val_loss"], default={})
    kept = best if config.keep == "best" else max(history, key=lambda row: row.get("epoch", 0), default={})
    info = RunInfo(
        format=FORMAT, model="model.keras", keras="tf-keras",
        image_size=config.image_size, num_classes=config.num_classes,
        classes=["background", "nucleus"] if config.num_classes == 2 else ["background", "interior", "border"],
        mode=config.mode, appearance=config.appearance, tile=DEFAULT_TILE if config.mode == "native" else None,
        normalisation="RGB uint8 (after `appearance`) / 255 -> [0, 1] float32 (the model rescales to [-1, 1])",
        resize=("INTER_AREA down / INTER_LINEAR up to image_size x image_size" if config.mode == "resize" else
                "none: trained on image_size crops at full resolution; predict whole images padded to a "
                "multiple of 32, tiled when large"),
        backbone="MobileNetV2", backbone_weights=config.backbone_weights, backbone_init=_backbone_init(config),
        encoder_width=config.encoder_width,
        decoder_width=config.decoder_width,
        postprocess=Postprocess(threshold=config.threshold, seed_threshold=config.seed_threshold,
                                min_size=config.min_size),
        data=config.data, holdout=config.holdout, train_images=len(train_refs), val_images=len(val_refs),
        train_crops=train_data.count(), workers=config.workers,
        epochs_run=int(max((m.get("epoch", 0) for m in history), default=0)),
        best_epoch=best.get("epoch"), kept_epoch=kept.get("epoch"),
        final_metrics={k: v for k, v in kept.items() if k != "epoch"},
        train_seconds=round(time.time() - started, 1), config=dataclasses.asdict(config),
        sha256={"model.keras": sha256_of(os.path.join(output, "model.keras"))},
    )
    info.write(os.path.join(output, "run.json"))
    return info.to_dict()


def _backbone_init(config: TrainConfig) -> str:
    """Where the encoder's first weights came from: the file rank 0 wrote, or the model fine-tuned from."""
    if config.init_from:
        return f"--init-from {config.init_from}"
    path = os.path.join(config.output, BACKBONE_FILE)
    if not os.path.exists(path):
        return "unknown"
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)["backbone_init"]


def _read_history(output: str) -> list[dict]:
    """Per-epoch metrics of the run, as rank 0 wrote them to history.jsonl (all epochs, unlike Ray's result)."""
    path = os.path.join(output, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]
