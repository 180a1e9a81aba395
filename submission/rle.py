"""Run-length encoding by Kaggle's DSB2018 rules.

Pixels are numbered from 1, top to bottom then left to right (column-major); a mask is written as
ascending `start length` pairs separated by spaces.
"""
from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> str:
    """Binary HxW mask to an RLE string ('' for an empty mask)."""
    pixels = np.asarray(mask, dtype=bool).ravel(order="F")
    padded = np.concatenate([[False], pixels, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-based starts and ends, alternating
    starts, ends = edges[0::2], edges[1::2]
    runs = np.empty(starts.size * 2, dtype=np.int64)
    runs[0::2], runs[1::2] = starts, ends - starts
    return " ".join(map(str, runs.tolist()))


def parse(rle: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of an RLE string; raises ValueError if it is not pairs of positive integers."""
    text = (rle or "").strip()
    if not text:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        numbers = np.array([int(token) for token in text.split()], dtype=np.int64)
    except ValueError:
        raise ValueError("EncodedPixels holds something that is not an integer") from None
    if numbers.size % 2:
        raise ValueError("EncodedPixels has an odd number of values (must be start/length pairs)")
    return numbers[0::2], numbers[1::2]


def decode(rle: str, height: int, width: int) -> np.ndarray:
    """RLE string back to a boolean HxW mask; raises ValueError for runs outside the image."""
    starts, lengths = parse(rle)
    if starts.size and (starts.min() < 1 or lengths.min() < 1 or (starts + lengths - 1).max() > height * width):
        raise ValueError("a run lies outside the image")
    flat = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(flat, starts - 1, 1)
    np.add.at(flat, starts - 1 + lengths, -1)
    return (np.cumsum(flat[:-1]) > 0).reshape((height, width), order="F")


def encode_labels(labels: np.ndarray) -> list[str]:
    """One RLE string per nucleus of an instance-label image (labels 1..N, in label order)."""
    labels = np.asarray(labels)
    flat = labels.ravel(order="F")
    present = np.unique(flat)
    present = present[present > 0]
    if present.size == 0:
        return []
    order = np.argsort(flat, kind="stable")
    sorted_labels = flat[order]
    rles = []
    for label in present:
        lo, hi = np.searchsorted(sorted_labels, [label, label + 1])
        positions = order[lo:hi] + 1  # 1-based, ascending because the sort is stable
        breaks = np.flatnonzero(np.diff(positions) != 1)
        starts = positions[np.concatenate([[0], breaks + 1])]
        ends = positions[np.concatenate([breaks, [positions.size - 1]])]
        runs = np.empty(starts.size * 2, dtype=np.int64)
        runs[0::2], runs[1::2] = starts, ends - starts + 1
        rles.append(" ".join(map(str, runs.tolist())))
    return rles
