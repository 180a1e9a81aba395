"""Kaggle submission CSV: `ImageId,EncodedPixels`, one row per nucleus, written atomically."""
from __future__ import annotations

import csv
import io
from typing import Iterable, Mapping

import numpy as np

from pipeline.io.fileio import write_text_atomic
from submission import rle

HEADER = ("ImageId", "EncodedPixels")


def rows_for_image(image_id: str, labels: np.ndarray) -> list[tuple[str, str]]:
    """Submission rows of one image; an image with no nuclei gets one row with empty EncodedPixels."""
    encoded = rle.encode_labels(labels)
    return [(image_id, run) for run in encoded] or [(image_id, "")]


def write_submission(path: str, rows_by_image: Mapping[str, Iterable[tuple[str, str]]] | Iterable[tuple[str, str]]
                     ) -> int:
    """Write rows (sorted by image id, nucleus order kept) to `path` atomically; returns the row count."""
    rows = [row for rows in rows_by_image.values() for row in rows] if isinstance(rows_by_image, Mapping) \
        else list(rows_by_image)
    rows.sort(key=lambda row: row[0])  # stable: each image's nuclei keep their order
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
    return len(rows)


def read_submission(path: str) -> tuple[list[str], list[tuple[int, str, str]]]:
    """(header, [(line number, image id, encoded pixels)]) of a submission file, read as text."""
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.reader(stream)
        header = next(reader, [])
        rows = [(reader.line_num, *(list(row) + ["", ""])[:2]) for row in reader if row]
    return header, rows


def labels_by_image(rows: Iterable[tuple[int, str, str]], shapes: Mapping[str, tuple[int, int]]
                    ) -> dict[str, np.ndarray]:
    """Instance label images rebuilt from submission rows (later nuclei win where runs overlap)."""
    labels = {image_id: np.zeros(shape, np.int32) for image_id, shape in shapes.items()}
    for _, image_id, encoded in rows:
        if image_id not in labels or not encoded.strip():
            continue
        target = labels[image_id]
        target[rle.decode(encoded, *target.shape)] = target.max() + 1
    return labels
