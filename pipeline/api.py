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

import numpy as np

from pipeline.config import SegmentConfig

__all__ = ["Segmenter", "segment_folder", "train", "train_with"]


class Segmenter:
    """One model with its stored settings, in this process (no Ray): an image in, its nuclei's labels out."""

    def __init__(self, model_path: str, config: SegmentConfig, threads: int = 2):
        from pipeline.inference import (Predictor, inspect_model, needs_image_kind, postprocess_settings,
                                        prediction_settings)

        self.model_path = model_path
        self.info = inspect_model(model_path)  # the model's run.json (pipeline.runinfo.RunInfo)
        self.post = postprocess_settings(config, self.info)
        self.predictor = Predictor(model_path, batch_size=1, threads=threads, **prediction_settings(config, self.info),
                                   tile=config.tile or self.info.effective_tile, overlap=config.overlap)
        self.needs_kind = needs_image_kind(self.post, model_path, self.info)

    @classmethod
    def load(cls, model: str = "dsb2018", threads: int = 2, **settings) -> "Segmenter":
        """A shipped model by name, or a model.keras / model.onnx path; `settings` are SegmentConfig fields that
        override the stored ones (threshold, seed_threshold, min_size, tta, scales, nucleus_area, instance_filter,
        split_clumps, refine_outlines, tile, overlap)."""
        from pipeline.registry import resolve_model

        config = dataclasses.replace(SegmentConfig(model=model), **settings)
        return cls(os.path.abspath(resolve_model(model)), config, threads)

    def segment(self, image: np.ndarray, kind: str | None = None, appearance: dict | None = None,
                channel: str | int = "", axes: str = "", names: list[str] | None = None) -> np.ndarray:
        """Nucleus labels (int32, the image's own height and width; 0 background, 1..N nuclei) of an RGB, RGBA or
        grey image of any integer or float type, or a channel stack (`axes` in tifffile's letters, e.g. 'CYX';
        guessed when not given; `names`: its channels' names): `channel` names or numbers its nuclear channel, as
        --nuclear-channel does, else the channel named as a nuclear stain, else channel 0.

        For a block of a larger image, `kind` (pipeline.protocol.image_kind) and `appearance`
        (pipeline.augment.fit_appearance) measured on the whole image make every block segmented alike."""
        from pipeline.augment import apply_appearance
        from pipeline.images import image_from_array, normalise, resize_image
        from pipeline.inference import labels_at_zoom, settings_for_kind
        from pipeline.protocol import image_kind

        # RGB(A) order, as PIL gives; a block of a larger image (`appearance` given) was read by its whole image's rules
        rgb = image_from_array(np.asarray(image), axes, names, str(channel),
                               colours="keep" if appearance is not None else "auto").image
        if kind is None:
            kind = image_kind(rgb) if self.needs_kind else ""
        prepared = apply_appearance(rgb, self.info.appearance, appearance)
        zoom = 1.0
        if self.info.mode == "native":
            probabilities, zoom = self.predictor.predict_whole(normalise(prepared), kind, keep_zoom=True)
        else:
            size = self.info.image_size or 128
            probabilities = self.predictor.predict(normalise(resize_image(prepared, size))[None])[0]
        threshold, seed_threshold, min_size = settings_for_kind(
            self.post["threshold"], self.post["seed_threshold"], self.post["min_size"], self.post["by_kind"], kind)
        return labels_at_zoom(probabilities, rgb.shape[0], rgb.shape[1], zoom, rgb, threshold=threshold,
                              min_size=min_size, seed_threshold=seed_threshold,
                              instance_filter=self.post["instance_filter"],
                              outline_refiner=self.post["outline_refiner"],
                              clump_split=self.post["clump_split"]).astype(np.int32)


def segment_folder(input: str, output: str, model: str = "dsb2018", **settings):
    """Segment every image under `input` (folder, .zip or URI) into `output` with Ray Data and an actor pool, as
    jobs/segment.py does (labels, measurements, manifest.csv, report.png); `settings` are SegmentConfig fields.
    Returns the run's SegmentationResult (rows of the manifest, seconds)."""
    from pipeline.inference import run_segmentation

    config = dataclasses.replace(SegmentConfig(model=model, input=input, output=output), **settings)
    return run_segmentation(config, output)


def train(output: str, data: str = "synthetic", preset: str = "", **settings) -> dict:
    """Train a model into `output` with Ray Train, as jobs/train.py does (`settings`: TrainConfig fields over the
    preset's values over the defaults), then choose its inference settings on the tune split when the run asks for
    it (--tune; the dsb2018 preset does). Returns the model's run.json as a dict, with the tune log under "tuned"."""
    from pipeline.config import TRAIN_PRESETS, TrainConfig

    if preset and preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: one of {', '.join(sorted(TRAIN_PRESETS))}")
    return train_with(dataclasses.replace(TrainConfig(), **{**(TRAIN_PRESETS[preset] if preset else {}),
                                                            "preset": preset, "output": output, "data": data,
                                                            **settings}))


def train_with(config) -> dict:
    """train() with a whole TrainConfig (jobs/train.py's, parsed from its flags)."""
    from pipeline.training import run_training
    from pipeline.tuning import describe, tune, untunable_reason, will_tune

    skipped = untunable_reason(dataclasses.asdict(config)) if config.tune and not config.resume else ""
    if skipped:
        print(f"--tune: this run will not be tuned after training: {skipped}")
    info = run_training(config)
    model = os.path.join(os.path.abspath(config.output), "model.keras")
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(info["final_metrics"].items()) if isinstance(v, float))
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
