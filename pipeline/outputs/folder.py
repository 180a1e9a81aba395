"""A run's output folder: where each file goes (never outside it), label files, exports beside them, the
per-nucleus measurement parts, the manifest and the report. Local paths and URIs alike; every write atomic."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from skimage.segmentation import find_boundaries

from pipeline.io import fileio
from pipeline.io.images import READING_COLUMNS
from pipeline.io.labelfiles import LABEL_SUFFIXES, decode_labels_file, encode_labels_file
from pipeline.io.sources import SampleRef, load_sample
from pipeline.outputs.exports import SUFFIXES, export_bytes
from pipeline.outputs.measure import COLUMNS
from pipeline.outputs.report import draw_report

MANIFEST_COLUMNS = ("image_id", "path", "height", "width", "nuclei", "mean_area", "covered_fraction", "labels",
                    "pixel_size_um", "pixel_size_source", *READING_COLUMNS, "blocks", "empty_blocks", "status", "error")
MEASUREMENTS = "measurements"  # OUTPUT/measurements/: the per-nucleus Parquet dataset, one part per block


def output_paths(output: str, image_path: str) -> tuple[str, str]:
    """(label PNG, overlay PNG) locations for an input's relative path; never outside `output`.

    A label image with more than 65,535 nuclei is written beside the PNG's place as `.tif` (see find_labels).
    """
    stem = posixpath.splitext(fileio.check_relative(image_path))[0] + ".png"
    return fileio.safe_join(output, "labels/" + stem), fileio.safe_join(output, "overlays/" + stem)


def label_candidates(output: str, image_path: str) -> dict[str, str]:
    """{suffix: location} of the label file an input may have (see labelfiles.LABEL_SUFFIXES)."""
    stem = output_paths(output, image_path)[0][:-len(".png")]
    return {suffix: stem + suffix for suffix in LABEL_SUFFIXES}


def write_exports(output: str, image_path: str, labels: np.ndarray, exports: tuple[str, ...],
                  measurements: dict | None = None, pixel_size_um: float | None = None) -> None:
    """The --export files of one input beside its label image (labels/<input path>.geojson, .rois.zip, .ome.tif)."""
    stem = output_paths(output, image_path)[0][:-len(".png")]
    for name in exports:
        fileio.write_bytes_atomic(stem + SUFFIXES[name], export_bytes(name, labels, measurements, pixel_size_um))


def find_labels(output: str, image_path: str) -> str | None:
    """The label file an earlier run wrote for an input (16-bit PNG, or 32-bit TIFF past 65,535 nuclei), or None."""
    return next((location for location in label_candidates(output, image_path).values() if fileio.exists(location)),
                None)


def read_labels(location: str) -> np.ndarray:
    """A label image written by segmentation (PNG or TIFF)."""
    return decode_labels_file(fileio.read_bytes(location))


def write_labels(output: str, image_path: str, labels: np.ndarray) -> str:
    """Write an input's label image (PNG, or TIFF past 65,535 nuclei) atomically; returns its path under output."""
    data, suffix = encode_labels_file(labels)
    candidates = label_candidates(output, image_path)
    fileio.write_bytes_atomic(candidates[suffix], data)
    for other, stale in candidates.items():  # a redo that changed format leaves no stale file for readers to find
        if other != suffix and not fileio.is_uri(stale) and os.path.exists(stale):
            os.unlink(stale)
    return candidates[suffix]


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image with each nucleus outlined, for a person to look at."""
    picture = image.copy()
    picture[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    return picture


def relative_label_path(output: str, location: str) -> str:
    return posixpath.relpath(location, output) if fileio.is_uri(output) else os.path.relpath(location, output)


def write_measurement_part(output: str, columns: list[dict]) -> None:
    """One Parquet part of OUTPUT/measurements/ holding the nuclei of a block of images (named by their ids)."""
    import pyarrow.parquet as pq  # here and below: Parquet and datasets load pandas, which only measuring needs

    table = pa.table({name: np.concatenate([part[name] for part in columns]) for name in COLUMNS})
    ids = sorted(set(str(part["image_id"][0]) for part in columns if len(part["image_id"])))
    name = "part-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20] + ".parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    fileio.write_bytes_atomic(output_file(output, f"{MEASUREMENTS}/{name}"), sink.getvalue().to_pybytes())


def measurements_folder(output: str) -> tuple[pafs.FileSystem, str | None]:
    """(filesystem, OUTPUT/measurements path), the path None when the folder does not exist."""
    fs, path = fileio.resolve(output)
    folder = posixpath.join(path, MEASUREMENTS)
    return fs, folder if fs.get_file_info(folder).type == pafs.FileType.Directory else None


def measured_image_ids(output: str) -> set[str]:
    """Image ids that already have rows in OUTPUT/measurements/ (one column read; empty when there is none)."""
    fs, folder = measurements_folder(output)
    if folder is None:
        return set()
    import pyarrow.dataset as pads

    dataset = pads.dataset(folder, filesystem=fs, format="parquet")
    if not dataset.files:  # a folder whose every part was lost
        return set()
    return set(dataset.to_table(columns=["image_id"]).column("image_id").unique().to_pylist())


def clear_measurements(output: str) -> None:
    """Remove OUTPUT/measurements/ (a --redo run measures every image again)."""
    fs, folder = measurements_folder(output)
    if folder is not None:
        fs.delete_dir(folder)


def write_manifest(location: str, rows: list[dict]) -> None:
    """The manifest CSV: one line per input file with its outcome, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: (str(row["path"]), str(row["image_id"]))))
    fileio.write_text_atomic(location, buffer.getvalue())


def output_file(output: str, name: str) -> str:
    return fileio.safe_join(output, name) if not fileio.is_uri(output) else output.rstrip("/") + "/" + name


def measured_areas(output: str) -> np.ndarray:
    """Every measured nucleus' area from OUTPUT/measurements/ (one column), empty when nothing was measured."""
    fs, folder = measurements_folder(output)
    if folder is None:
        return np.zeros(0)
    import pyarrow.dataset as pads

    return pads.dataset(folder, filesystem=fs, format="parquet").to_table(columns=["area"]).column("area").to_numpy()


def write_report(output: str, rows: list[dict], refs: list[SampleRef], max_pixels: int, title: str = "",
                 channel: str = "") -> None:
    """OUTPUT/report.png (pipeline.outputs.report) for a run's manifest rows; pictures of at most three images."""
    by_path = {ref.image_path: ref for ref in refs}

    def overlay_of(row: dict) -> np.ndarray | None:
        ref, label_path = by_path.get(row["path"]), find_labels(output, str(row["path"]))
        if ref is None or label_path is None:
            return None
        return overlay(load_sample(ref, with_masks=False, max_pixels=max_pixels, channel=channel).image,
                       read_labels(label_path))

    fileio.write_bytes_atomic(output_file(output, "report.png"),
                              draw_report(rows, measured_areas(output), overlay_of, title=title))
