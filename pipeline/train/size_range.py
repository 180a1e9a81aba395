"""The nucleus sizes a model knows: the spread of its training images' median nucleus areas, stored in run.json so
that inference zooms only images outside it (size normalisation)."""
from __future__ import annotations

import os

import numpy as np

from pipeline.data.augment import true_median_area
from pipeline.data.datasets import protocol_refs, split_refs, training_refs
from pipeline.io.sources import load_sample
from pipeline.model.registry import info_path, read_model_info, resolve_model
from pipeline.model.runinfo import RunInfo

SIZE_RANGE_PERCENTILES = (2, 98)  # the nucleus sizes a model knows: 96% of its training images' median sizes
# A model trained on coarse crops (--low-resolution) segments small nuclei better zoomed up than as they are, so its
# images are zoomed up from the 10th percentile: on the tune split x0.5 0.590 -> 0.598, plain 0.642 -> 0.640
# (docs/accuracy-trials.md).
COARSE_SIZE_RANGE_PERCENTILES = (10, 98)


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


def size_range(info: RunInfo, data: str = "", measure: dict | None = None) -> dict:
    """Size normalisation that zooms only images whose median nucleus is outside the sizes the model trained on
    (the 2nd-98th percentiles of its training images' median true nucleus areas; the 10th-98th for a model trained
    with --low-resolution), towards their median: on the tune split, x0.5 images 0.473 -> 0.566 with the plain
    images unchanged (docs/accuracy-trials.md). A nucleus is measured with `measure`'s threshold, seed_threshold and
    min_size (the tuned settings), else with the stored ones."""
    refs = trained_refs(info, data)
    areas = [true_median_area(load_sample(ref).labels) for ref in refs]
    keys = ("threshold", "seed_threshold", "min_size")
    measuring = {key: measure[key] if measure else getattr(info.postprocess, key) for key in keys}
    coarse = float((info.config or {}).get("low_resolution") or 0.0) > 0
    low, high = (round(float(np.percentile(areas, q)), 1)
                 for q in (COARSE_SIZE_RANGE_PERCENTILES if coarse else SIZE_RANGE_PERCENTILES))
    return {**measuring, "nucleus_area": round(float(np.median(areas)), 1), "within": [low, high],
            "measured_on": f"median true nucleus areas of the {len(refs)} images it trained on"}


def store_size_range(model: str, data: str = "") -> dict:
    """Write size_range into a model's run.json, unless the tune step chose a size normalisation of its own."""
    model_path = os.path.abspath(resolve_model(model))
    info = read_model_info(model_path)
    stored = info.postprocess.size_normalisation
    if stored and "within" not in stored:
        raise ValueError(f"{model}: its run.json zooms every image to {stored.get('nucleus_area')} pixels (chosen "
                         "on the tune split); --nucleus-area 0 turns that off, or retune")
    info.postprocess.size_normalisation = size_range(info, data)
    info.write(info_path(model_path))
    return info.postprocess.size_normalisation
