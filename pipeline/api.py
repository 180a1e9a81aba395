"""The library's entry points: segment one image in this process, or a whole folder with Ray.

    import numpy as np
    from pipeline.api import Segmenter, segment_folder

    segmenter = Segmenter.load("dsb2018")          # a shipped model's name, or a model.keras / .onnx path
    labels = segmenter.segment(image)              # RGB or grey array -> int32 labels, 0 background, 1..N nuclei
    result = segment_folder("my_images/", "my_results/")   # what jobs/segment.py does: Ray Data, every output
    info = train("runs/mine", data="stage1_train.zip", preset="dsb2018")   # jobs/train.py: Ray Train, then tuned

A Kaggle submission CSV: submission.api.submit (jobs/submit.py).

`Segmenter` applies the model's stored inference settings (run.json, as jobs/tune.py chose them) exactly as
`jobs/segment.py` does; keyword arguments override them like the command's flags (threshold=0.6, tta=True, ...).
"""
from __future__ import annotations

import dataclasses
import os

from pipeline.config import TRAIN_PRESETS, SegmentConfig, TrainConfig
from pipeline.segment.run import run_segmentation
from pipeline.segment.segmenter import Segmenter
from pipeline.train.files import SHOWN_METRICS
from pipeline.train.training import run_training
from pipeline.train.tuning import describe, tune, untunable_reason, will_tune

__all__ = ["Segmenter", "segment_folder", "train", "train_with"]


def segment_folder(input: str, output: str, model: str = "dsb2018", **settings):
    """Segment every image under `input` (folder, .zip or URI) into `output` with Ray Data and an actor pool, as
    jobs/segment.py does (labels, measurements, manifest.csv, report.png); `settings` are SegmentConfig fields.
    Returns the run's SegmentationResult (rows of the manifest, seconds)."""
    config = dataclasses.replace(SegmentConfig(model=model, input=input, output=output), **settings)
    return run_segmentation(config, output)


def train(output: str, data: str = "synthetic", preset: str = "", **settings) -> dict:
    """Train a model into `output` with Ray Train, as jobs/train.py does (`settings`: TrainConfig fields over the
    preset's values over the defaults), then choose its inference settings on the tune split when the run asks for
    it (--tune; the dsb2018 preset does). Returns the model's run.json as a dict, with the tune log under "tuned"."""
    if preset and preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: one of {', '.join(sorted(TRAIN_PRESETS))}")
    return train_with(dataclasses.replace(TrainConfig(), **{**(TRAIN_PRESETS[preset] if preset else {}),
                                                            "preset": preset, "output": output, "data": data,
                                                            **settings}))


def train_with(config) -> dict:
    """train() with a whole TrainConfig (jobs/train.py's, parsed from its flags)."""
    skipped = untunable_reason(dataclasses.asdict(config)) if config.tune and not config.resume else ""
    if skipped:
        print(f"--tune: this run will not be tuned after training: {skipped}")
    info = run_training(config)
    model = os.path.join(os.path.abspath(config.output), "model.keras")
    metrics = ", ".join(f"{k}={info['final_metrics'][k]:.4f}" for k in SHOWN_METRICS
                        if isinstance(info["final_metrics"].get(k), float))
    print(f"model: {model} (weights of epoch {info['kept_epoch']} of {info['epochs_run']}, "
          f"best {info['best_epoch']}; {metrics})")
    if will_tune(info["config"]):  # a resumed run's own settings, not these
        print("choosing the inference settings on the tune split (--no-tune skips this; jobs/tune.py redoes it)",
              flush=True)
        log = tune(model)
        print(describe(log))
        print(f"tuned in {log['seconds'] / 60:.1f} min; run.json holds the settings")
        info = {**info, "tuned": log}
    return info
