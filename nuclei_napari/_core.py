"""What the napari plugin computes, without Qt or napari: segmentation as a generator of progress steps that returns a
Labels layer's data (with the per-nucleus measurements as its features), the sample image, the output-folder reader."""
from __future__ import annotations

import csv
import functools
import os

import numpy as np
import pandas as pd

from pipeline.api import Segmenter
from pipeline.data.protocol import image_kind
from pipeline.io.fileio import UnsafePathError, safe_join
from pipeline.io.images import image_from_array, read_image
from pipeline.io.sources import load_sample
from pipeline.io.synthetic import synthetic_refs
from pipeline.model.registry import ROOT
from pipeline.outputs.folder import MEASUREMENTS, read_labels
from pipeline.outputs.measure import measure_nuclei

SEGMENT_STEPS = 3  # loading the model, segmenting, measuring


@functools.lru_cache(maxsize=2)
def _segmenter(model: str, threshold: float) -> Segmenter:
    """The model loaded once per (model, threshold) for the session; threshold 0 keeps the stored one."""
    return Segmenter.load(model or "dsb2018", **({"threshold": threshold} if threshold > 0 else {}))


def features_of(labels: np.ndarray, image: np.ndarray, name: str, pixel_size_um: float = 0.0) -> pd.DataFrame:
    """The nuclei's measurements as a Labels layer's features: one row per nucleus, `index` = its label value."""
    return _indexed(pd.DataFrame(measure_nuclei(labels, image, name, pixel_size_um or None)))


def _indexed(table: pd.DataFrame) -> pd.DataFrame:
    """A measurements table as napari's features: an `index` column first, each row's label value (napari maps
    row i to label i otherwise)."""
    return pd.concat([table["label"].rename("index"), table], axis=1)


def segment_steps(image: np.ndarray, name: str = "image", model: str = "dsb2018", threshold: float = 0.0,
                  channel: str = "", pixel_size_um: float = 0.0):
    """Yield each step's name (SEGMENT_STEPS of them), then return the Labels layer's (data, metadata, "labels"):
    the image's nuclei with the model's stored settings, measured on the image as the model read it."""
    yield "loading the model"
    segmenter = _segmenter(model, float(threshold))
    yield "segmenting"
    labels = segmenter.segment(np.asarray(image), channel=channel)
    yield "measuring"
    read = image_from_array(np.asarray(image), "", None, channel).image
    metadata = {"name": f"{name} nuclei", "features": features_of(labels, read, name, pixel_size_um),
                "metadata": {"model": model, "threshold": threshold or "stored", "channel": channel or "auto"}}
    if pixel_size_um > 0:
        metadata["scale"] = (pixel_size_um, pixel_size_um)
    return labels, metadata, "labels"


def run_steps(steps):
    """Drain a segment_steps generator outside napari: (its step names, its layer data)."""
    names = []
    while True:
        try:
            names.append(next(steps))
        except StopIteration as done:
            return names, done.value


def sample_nuclei() -> list[tuple]:
    """napari's File > Open Sample: a real DSB2018 fluorescence image (256 x 256, the left third of the shipped model's
    card picture, CC0), else a generated one."""
    picture = os.path.join(ROOT, "models", "dsb2018", "pictures", "good_fluorescence.png")
    if os.path.isfile(picture):
        with open(picture, "rb") as stream:
            image = read_image(stream.read()).image
        return [(np.ascontiguousarray(image[:, :image.shape[0]]), {"name": "DSB2018 fluorescence"}, "image")]
    images = (load_sample(ref, with_masks=False).image for ref in synthetic_refs(12, seed=7))
    return [(next(image for image in images if image_kind(image) == "fluorescence"), {"name": "synthetic nuclei"},
             "image")]


def get_reader(path):
    """napari reader: an output folder of jobs/segment.py (it holds manifest.csv), else None (not ours)."""
    if isinstance(path, str) and os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.csv")):
        return read_output_folder
    return None


def read_output_folder(path: str) -> list[tuple]:
    """Each segmented image of the folder: the image (when its path still resolves) and its labels, with the
    nuclei's measurements as the layer's features."""
    with open(os.path.join(path, "manifest.csv"), encoding="utf-8", newline="") as stream:
        rows = [row for row in csv.DictReader(stream) if row.get("status") == "done" and row.get("labels")]
    measured = _measurements(path)
    layers = []
    for row in rows:
        try:
            labels_file = safe_join(path, row["labels"])  # a manifest never points outside its folder
        except UnsafePathError:
            continue
        if not os.path.isfile(labels_file):
            continue
        if row.get("path") and os.path.isfile(row["path"]):
            with open(row["path"], "rb") as stream:
                layers.append((read_image(stream.read()).image, {"name": row["image_id"]}, "image"))
        metadata = {"name": f"{row['image_id']} nuclei"}
        if measured is not None:
            table = measured[measured["image_id"] == row["image_id"]].reset_index(drop=True)
            metadata["features"] = _indexed(table)
        layers.append((read_labels(labels_file), metadata, "labels"))
    return layers


def _measurements(path: str) -> pd.DataFrame | None:
    folder = os.path.join(path, MEASUREMENTS)
    return pd.read_parquet(folder) if os.path.isdir(folder) else None
