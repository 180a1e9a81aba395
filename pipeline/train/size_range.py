"""The nucleus sizes a model knows: the spread of its training images' median nucleus areas, stored in run.json so
that inference zooms only images outside it (size normalisation)."""
from __future__ import annotations

import os

import numpy as np

from pipeline.data.augment import true_median_area
from pipeline.data.datasets import protocol_refs, split_refs, training_refs
from pipeline.data.protocol import image_kind
from pipeline.io.sources import load_sample
from pipeline.model.registry import info_path, read_model_info, resolve_model, specialist_files
from pipeline.model.runinfo import RunInfo

SIZE_RANGE_PERCENTILES = (2, 98)  # the nucleus sizes a model knows: 96% of its training images' median sizes
# A model trained on coarse crops (--low-resolution) segments small nuclei better zoomed up than as they are, so its
# images are zoomed up from the 10th percentile: on the tune split x0.5 0.590 -> 0.598, plain 0.642 -> 0.640
# (docs/accuracy-trials.md).
COARSE_SIZE_RANGE_PERCENTILES = (10, 98)
MIN_IMAGES_OF_KIND = 20  # fewer training images of a kind give it no range of its own


def trained_refs(info: RunInfo, data: str = "") -> list:
    """The labelled images a model trained on: the protocol's train split, train + tune for a refit, else the
    random split's training part."""
    trained = info.config
    refs = training_refs(data or trained.get("data", ""), int(trained.get("synthetic_count", 96)),
                         int(trained.get("seed", 42)))
    holdout = trained.get("holdout", "random")
    if holdout in ("protocol", "refit"):
        splits = protocol_refs(refs)
        return splits["train"] + (splits["tune"] if holdout == "refit" else [])
    return split_refs(refs, float(trained.get("val_fraction", 0.2)), int(trained.get("seed", 42)))[0]


def size_range(info: RunInfo, data: str = "", measure: dict | None = None, kinds: tuple[str, ...] = ()) -> dict:
    """Size normalisation that zooms only images whose median nucleus is outside the sizes the model trained on
    (the 2nd-98th percentiles of its training images' median true nucleus areas; the 10th-98th for a model trained
    with --low-resolution), towards their median: on the tune split, x0.5 images 0.473 -> 0.566 with the plain
    images unchanged (docs/accuracy-trials.md). Each of `kinds` (those with a specialist) gets its own range and
    target (`by_kind`), the 2nd-98th percentiles and median of its training images: stained nuclei are larger than
    most, and half-size stained images were left unzoomed (tune split x0.5 0.563 -> 0.570, plain unchanged). A
    nucleus is measured with `measure`'s threshold, seed_threshold and min_size (the tuned settings), else with the
    stored ones."""
    refs = trained_refs(info, data)
    areas, of = [], []
    for ref in refs:  # one image in memory at a time
        sample = load_sample(ref)
        areas.append(true_median_area(sample.labels))
        of.append(image_kind(sample.image) if kinds else "")
    areas, of = np.array(areas), np.array(of)
    keys = ("threshold", "seed_threshold", "min_size")
    measuring = {key: measure[key] if measure else getattr(info.postprocess, key) for key in keys}
    coarse = float((info.config or {}).get("low_resolution") or 0.0) > 0
    stored = {**measuring, **_known_sizes(areas, COARSE_SIZE_RANGE_PERCENTILES if coarse else SIZE_RANGE_PERCENTILES)}
    if kinds:
        by_kind = {kind: _known_sizes(areas[of == kind], SIZE_RANGE_PERCENTILES)
                   for kind in sorted(kinds) if (of == kind).sum() >= MIN_IMAGES_OF_KIND}
        if by_kind:
            stored["by_kind"] = by_kind
    return {**stored, "measured_on": f"median true nucleus areas of the {len(refs)} images it trained on"}


def _known_sizes(areas: np.ndarray, percentiles: tuple[float, float]) -> dict:
    """The target (the median) and the range (`percentiles`) of the median nucleus areas of training images."""
    low, high = (round(float(np.percentile(areas, q)), 1) for q in percentiles)
    return {"nucleus_area": round(float(np.median(areas)), 1), "within": [low, high]}


def store_size_range(model: str, data: str = "") -> dict:
    """Write size_range into a model's run.json (a range of their own for its specialists' kinds), unless the tune
    step chose a size normalisation of its own."""
    model_path = os.path.abspath(resolve_model(model))
    info = read_model_info(model_path)
    stored = info.postprocess.size_normalisation
    if stored and "within" not in stored:
        raise ValueError(f"{model}: its run.json zooms every image to {stored.get('nucleus_area')} pixels (chosen "
                         "on the tune split); --nucleus-area 0 turns that off, or retune")
    info.postprocess.size_normalisation = size_range(info, data, kinds=tuple(specialist_files(model_path, info)))
    info.write(info_path(model_path))
    return info.postprocess.size_normalisation
