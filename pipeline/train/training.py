"""Distributed training with Ray Train: TensorflowTrainer + MultiWorkerMirroredStrategy + tf-keras fit.

The driver (`run_training`) lists and preprocesses data with Ray Data, starts the trainer and, when it
finishes, copies the best model out of Ray's checkpoint storage into the run folder as `model.keras`.
Each worker (pipeline.train.worker.train_loop_per_worker) builds or restores the model inside the strategy scope and fits
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
from pipeline.data.datasets import (ensure_ray, extra_training_refs, image_kinds, protocol_refs, refs_of_kinds,
                                    split_refs, training_dataset, training_refs)
from pipeline.io.fileio import write_text_atomic
from pipeline.model.registry import read_model_info, sha256_of
from pipeline.model.runinfo import ARCHITECTURE, CLASS_NAMES, DEFAULT_TILE, FORMAT, Postprocess, RunInfo
from pipeline.train.files import LOGS, backbone_init, console_of, read_history
from pipeline.train.tuning import TUNE_COST_IN_EPOCHS, will_tune


def _saved_config(output: str, given: TrainConfig) -> TrainConfig:
    """The settings of the interrupted run in `output`, to be continued (`--resume`); a --time-limit given is the
    resumed job's own budget (a new allocation), counted from its start."""
    paths = [os.path.join(output, name) for name in ("ray_run.json", "config.json")]
    if not all(os.path.exists(path) for path in paths):
        raise FileNotFoundError(f"--resume: no interrupted run in {output} (ray_run.json or config.json missing)")
    with open(paths[1], encoding="utf-8") as stream:
        text = stream.read()
    used = removed_options_used(json.loads(text))
    if used:
        raise ValueError(f"--resume: {paths[1]}: {used}; it cannot be resumed")
    saved = TrainConfig.from_json(text)
    return dataclasses.replace(saved, output=output, resume=True, time_limit=given.time_limit or saved.time_limit)


def _snapshot_arrays(val_dataset, count: int) -> dict | None:
    if count <= 0 or val_dataset.count() == 0:
        return None
    batch = val_dataset.take_batch(count, batch_format="numpy")
    return {"image": np.asarray(batch["image"]), "mask": np.asarray(batch["mask"])}


def _check_init_from(config: TrainConfig) -> None:
    """Refuse an --init-from model whose architecture or input handling (pipeline.model.runinfo.ARCHITECTURE) differs from
    this run's flags."""
    trained = read_model_info(config.init_from).trained_options()
    differ = [key for key in ARCHITECTURE if key in trained and trained[key] != getattr(config, key)]
    if differ:
        raise ValueError(f"--init-from {config.init_from}: it differs from this run in {', '.join(differ)} "
                         f"(give the flags or --preset it was trained with)")


def run_training(config: TrainConfig) -> dict:
    """Train as configured; returns run.json's content (as a dict). The run folder ends with model.keras beside it."""
    started = time.time()
    output = os.path.abspath(config.output)
    os.makedirs(output, exist_ok=True)
    run_state_path = os.path.join(output, "ray_run.json")
    if config.resume:
        config = _saved_config(output, config)
    # Workers run in Ray's own working directory: they must get the run folder as an absolute path.
    config = dataclasses.replace(config, output=output,
                                 init_from=os.path.abspath(config.init_from) if config.init_from else "")
    ensure_ray()  # the workers' own output goes to OUTPUT/logs; console.txt's lines are shown (console_of)
    refs, train_refs, val_refs = _training_splits(config)
    if config.init_from:
        _check_init_from(config)
    if len(val_refs) < config.workers or len(train_refs) < config.workers:
        raise ValueError(f"{len(refs)} images are too few for {config.workers} workers with --val-fraction "
                         f"{config.val_fraction}: every worker needs training and validation images")
    print(f"data: {len(train_refs)} training and {len(val_refs)} validation images from {config.data}", flush=True)
    print(f"training: {config.epochs} epochs on {config.workers} worker(s); their own output goes to "
          f"{os.path.join(output, LOGS)}", flush=True)
    options = dict(mode=config.mode, appearance=config.appearance, crops_per_image=config.crops_per_image,
                   seed=config.seed, nucleus_area=config.nucleus_area)
    train_data = training_dataset(train_refs, config.image_size, config.max_pixels, config.num_classes, config.blocks,
                                  augment=config.augment, crops_per_rare_image=config.crops_per_rare_image, **options)
    val_data = training_dataset(val_refs, config.image_size, config.max_pixels, config.num_classes, config.blocks,
                                augment=False, **options)

    storage = config.storage or os.path.join(output, "ray")
    name = _run_name(config, storage, run_state_path)
    write_text_atomic(os.path.join(output, "config.json"), config.to_json())

    trainer = _trainer(config, name, storage, {"train": train_data, "val": val_data},
                       {"train": len(train_refs), "val": len(val_refs)}, started)
    with console_of(output):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        shutil.copyfile(os.path.join(folder, "model.keras"), os.path.join(output, ".model.keras.partial"))
    os.replace(os.path.join(output, ".model.keras.partial"), os.path.join(output, "model.keras"))
    return _write_run_info(config, output, result, (train_refs, val_refs), train_data.count(), started)


def _training_splits(config: TrainConfig) -> tuple[list, list, list]:
    """(all listed refs, training refs, validation refs) as the run's --holdout, --kinds and --extra-data say."""
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
    return refs, train_refs, val_refs


def _run_name(config: TrainConfig, storage: str, run_state_path: str) -> str:
    """The Ray Train run's name: the interrupted run's (--resume), else a new one written to ray_run.json."""
    if config.resume:
        with open(run_state_path, encoding="utf-8") as stream:
            name = json.load(stream)["name"]
        # Ray Train restores a run from the latest checkpoint recorded under the same name and storage.
        print(f"resuming run {name} from its latest checkpoint in {storage}", flush=True)
    else:
        name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        write_text_atomic(run_state_path, json.dumps({"name": name, "storage": storage}))
    return name


def _write_run_info(config: TrainConfig, output: str, result, refs: tuple[list, list], train_crops: int,
                    started: float) -> dict:
    """run.json for the finished run: the kept epoch's metrics (best or last, --keep), how it was trained, the
    model file's sha256."""
    train_refs, val_refs = refs
    history = read_history(output)
    final = result.metrics or {}
    best = next((row for row in history if math.isfinite(final.get("best_val_loss", math.inf))
                 and row.get("epoch") == final.get("best_epoch")), None) \
        or min((row for row in history if "val_loss" in row), key=lambda row: row["val_loss"], default={})
    kept = best if config.keep == "best" else max(history, key=lambda row: row.get("epoch", 0), default={})
    info = RunInfo(
        format=FORMAT, model="model.keras", keras="tf-keras",
        image_size=config.image_size, num_classes=config.num_classes,
        classes=CLASS_NAMES[config.num_classes],
        mode=config.mode, appearance=config.appearance, tile=DEFAULT_TILE if config.mode == "native" else None,
        normalisation="RGB uint8 (after `appearance`) / 255 -> [0, 1] float32 (the model rescales to [-1, 1])",
        resize=("INTER_AREA down / INTER_LINEAR up to image_size x image_size" if config.mode == "resize" else
                "none: trained on image_size crops at full resolution; predict whole images padded to a "
                "multiple of 32, tiled when large"),
        backbone="MobileNetV2", backbone_weights=config.backbone_weights, backbone_init=backbone_init(config),
        encoder_width=config.encoder_width,
        decoder_width=config.decoder_width,
        postprocess=Postprocess(threshold=config.threshold, seed_threshold=config.seed_threshold,
                                min_size=config.min_size),
        data=config.data, holdout=config.holdout, train_images=len(train_refs), val_images=len(val_refs),
        train_crops=train_crops, workers=config.workers,
        epochs_run=int(max((m.get("epoch", 0) for m in history), default=0)),
        best_epoch=best.get("epoch"), kept_epoch=kept.get("epoch"),
        final_metrics={k: v for k, v in kept.items() if k != "epoch"},
        train_seconds=round(time.time() - started, 1), config=dataclasses.asdict(config),
        sha256={"model.keras": sha256_of(os.path.join(output, "model.keras"))},
    )
    info.write(os.path.join(output, "run.json"))
    return info.to_dict()


def _trainer(config: TrainConfig, name: str, storage: str, datasets: dict, sizes: dict, started: float):
    """Ray Train's TensorflowTrainer for the run: its workers, their data, failures it survives, checkpoints kept."""
    import ray
    import ray.train

    from pipeline.train.worker import train_loop_per_worker  # here: TensorFlow by a training run only, quietly
    from ray.train.tensorflow import TensorflowTrainer  # after TensorFlow's quiet import: it imports it too

    use_gpu = config.gpu == "yes" or (config.gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= config.workers)
    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(config),
                           "snapshots": _snapshot_arrays(datasets["val"], config.snapshots), "sizes": sizes,
                           "deadline": started + config.time_limit * 60 if config.time_limit > 0 else 0.0,
                           "reserved_epochs": TUNE_COST_IN_EPOCHS if will_tune(dataclasses.asdict(config)) else 0.0},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker},
                                               placement_strategy=config.placement),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )
