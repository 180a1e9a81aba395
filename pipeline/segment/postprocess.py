"""How probabilities become nuclei: the post-processing settings as one typed object (run.json's choices, the flags
over them), labels at an image's own size (instances, clump splitting, filter, refiner) and the prediction settings.
Pure NumPy / OpenCV / scikit-image: no Ray or TensorFlow."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.config import SegmentConfig
from pipeline.labels.instance_filter import apply_filter
from pipeline.labels.instances import (CLUMP_SPLIT_KEYS, DEFAULT_CLUMP_SPLIT, instances_from_probabilities, sequential,
                                       split_clumps)
from pipeline.labels.outlines import refine_outlines
from pipeline.model.registry import specialist_files
from pipeline.model.runinfo import RunInfo


@dataclass(frozen=True)
class PostSettings:
    """How one image's probabilities become nuclei: foreground and seed thresholds, the smallest nucleus, and the
    fitted steps (clump splitting, false-positive filter, outline refiner) when on; `by_kind`: per-kind thresholds
    (jobs/tune.py), applied by `for_kind`."""

    threshold: float = 0.5
    min_size: int = 10
    seed_threshold: float | None = None
    clump_split: dict | None = None
    instance_filter: dict | None = None
    outline_refiner: dict | None = None
    by_kind: dict = field(default_factory=dict)

    def for_kind(self, kind: str) -> "PostSettings":
        """These settings for an image of `kind`: its own thresholds and minimum size where tuned, else these."""
        threshold, seed_threshold, min_size = settings_for_kind(self.threshold, self.seed_threshold, self.min_size,
                                                                self.by_kind, kind)
        return dataclasses.replace(self, threshold=threshold, seed_threshold=seed_threshold, min_size=min_size,
                                   by_kind={})


def settings_for_kind(threshold: float, seed_threshold: float | None, min_size: int, by_kind: dict | None,
                      kind: str) -> tuple[float, float | None, int]:
    """(threshold, seed_threshold, min_size) for an image of `kind`: its own tuned values if any, else the global."""
    own = (by_kind or {}).get(kind) or {}
    return (float(own.get("threshold", threshold)), own.get("seed_threshold", seed_threshold),
            int(own.get("min_size", min_size)))


def labels_at_zoom(probabilities: np.ndarray, height: int, width: int, zoom: float, image: np.ndarray | None,
                   settings: PostSettings, measured: tuple | None = None) -> np.ndarray:
    """Labels of an image whose probabilities were predicted at `zoom` (size normalisation): nuclei made at that
    size, where they have the sizes the post-processing was tuned on, then brought to the image's own size.
    `measured`: the size measurement's nuclei of these probabilities (pipeline.data.augment.AtZoom), used as they are
    when they were found with these settings' thresholds and minimum size."""
    if zoom == 1.0:
        own = measured is not None and measured[0] == (settings.threshold, settings.seed_threshold, settings.min_size)
        return labels_at_original_size(probabilities, height, width, settings, image, measured[1] if own else None)
    zoomed_h, zoomed_w = probabilities.shape[:2]
    if image is not None:
        image = cv2.resize(image, (zoomed_w, zoomed_h), interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR)
    labels = labels_at_original_size(probabilities, zoomed_h, zoomed_w, settings, image)
    labels = cv2.resize(labels.astype(np.int32), (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
    return sequential(labels)


def labels_at_original_size(probabilities: np.ndarray, height: int, width: int, settings: PostSettings,
                            image: np.ndarray | None = None, nuclei: np.ndarray | None = None) -> np.ndarray:
    """Upsample model-size probabilities to the image's own size, split them into nuclei (cutting merged clumps
    when the settings split clumps), drop rejected ones, and re-decide their outlines from the probabilities and the
    original `image` (when a refiner is given). `nuclei`: the first of those steps' result, when already known."""
    upsampled = probabilities.astype(np.float32)
    if upsampled.shape[:2] != (int(height), int(width)):
        upsampled = cv2.resize(upsampled, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
    if upsampled.ndim == 2:
        upsampled = upsampled[..., None]
    labels = nuclei if nuclei is not None else instances_from_probabilities(
        upsampled, threshold=settings.threshold, min_size=settings.min_size, seed_threshold=settings.seed_threshold)
    if settings.clump_split and upsampled.shape[-1] == 3:
        labels = split_clumps(labels, upsampled[..., 2],
                              **{key: settings.clump_split[key] for key in CLUMP_SPLIT_KEYS})
    labels = apply_filter(labels, upsampled, settings.instance_filter)
    if settings.outline_refiner and image is not None:
        labels = refine_outlines(labels, upsampled, image, settings.outline_refiner)
    return labels


def needs_image_kind(post: PostSettings, model_path: str, info: RunInfo | dict) -> bool:
    """Whether inference must classify each image's kind: only for per-kind settings (postprocess_settings'
    by_kind) or a kind specialist; otherwise it is not computed."""
    return bool(post.by_kind) or bool(specialist_files(model_path, info))


def postprocess_settings(config: SegmentConfig, info: RunInfo | dict) -> PostSettings:
    """threshold, seed_threshold, min_size, clump splitting, instance filter, outline refiner: the flags when given,
    else run.json (`info`, or its content as a dict), else defaults (pipeline.model.runinfo.Postprocess).

    The per-kind values of run.json (`by_kind`) apply only when no threshold or size flag is given.
    """
    saved = RunInfo.of(info).postprocess
    flagged = bool(config.threshold or config.seed_threshold or config.min_size)
    use_filter = saved.instance_filter is not None if config.instance_filter is None else config.instance_filter
    if use_filter and not saved.instance_filter:
        raise ValueError("--instance-filter: this model's run.json has no fitted instance filter (jobs/tune.py fits one)")
    use_refiner = saved.outline_refiner is not None if config.refine_outlines is None else config.refine_outlines
    if use_refiner and not saved.outline_refiner:
        raise ValueError("--refine-outlines: this model's run.json has no fitted outline refiner (jobs/tune.py fits one)")
    use_split = saved.clump_split is not None if config.split_clumps is None else config.split_clumps
    return PostSettings(threshold=config.threshold or saved.threshold,
                        seed_threshold=config.seed_threshold or saved.seed_threshold,
                        min_size=config.min_size or saved.min_size,
                        instance_filter=saved.instance_filter if use_filter else None,
                        outline_refiner=saved.outline_refiner if use_refiner else None,
                        clump_split=(saved.clump_split or dict(DEFAULT_CLUMP_SPLIT)) if use_split else None,
                        by_kind={} if flagged else dict(saved.by_kind))


def prediction_settings(config: SegmentConfig, info: RunInfo | dict) -> dict:
    """tta (flips), scales and size normalisation: the flags when given, else the model's run.json (`info`, or its
    content as a dict), else none.

    Size normalisation measures nuclei with the settings stored beside its target (run.json), else with the
    model's global post-processing settings.
    """
    info = RunInfo.of(info)
    saved = info.postprocess
    scales = tuple(float(part) for part in config.scales.split(",") if part.strip()) if config.scales else \
        tuple(saved.scales)
    if any(not 0.25 <= scale <= 4 for scale in scales):
        raise ValueError(f"--scales: each factor must be between 0.25 and 4, got {config.scales}")
    stored = dict(saved.size_normalisation or {})
    nucleus_area = float(stored.get("nucleus_area") or 0.0) if config.nucleus_area is None else config.nucleus_area
    if nucleus_area < 0:
        raise ValueError(f"--nucleus-area: pixels (0 = off), got {config.nucleus_area}")
    if nucleus_area and not info.mode == "native":
        raise ValueError("--nucleus-area: only native-mode models predict whole images at any size")
    if config.diameter and not nucleus_area:
        raise ValueError("--diameter: this model stores no nucleus size to zoom to; give --nucleus-area too")
    if config.diameter < 0:
        raise ValueError(f"--diameter: pixels (0 = measured), got {config.diameter}")
    size_normalisation = None
    if nucleus_area:  # a target given on the command line zooms every image; the stored one only out of its range
        size_normalisation = {"threshold": saved.threshold, "seed_threshold": saved.seed_threshold,
                              "min_size": saved.min_size, **stored, "nucleus_area": nucleus_area}
        if config.nucleus_area is not None:
            size_normalisation.pop("within", None)
            size_normalisation.pop("by_kind", None)
        if config.diameter:
            size_normalisation["diameter"] = float(config.diameter)
    return {"tta": saved.tta if config.tta is None else config.tta, "scales": scales,
            "size_normalisation": size_normalisation}
