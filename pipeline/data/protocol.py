"""The evaluation protocol: a fixed, seeded, kind-stratified split of a labelled listing into train / tune / test.

- train: what the model learns from;
- tune: every choice (recipe, early stopping, thresholds, epochs, instance filter) is made watching it;
- test: only reported, never used to choose anything, so its score estimates unseen images.

The split depends only on the image ids, their kinds and `SPLIT_SEED` (not on the training seed), so
runs with different seeds are trained and scored on the same images. Stratified by kind of image
(fluorescence / stained / bright-field, from colour statistics), so the rare kinds appear in every part.
Pure numpy: no Ray or TensorFlow.
"""
from __future__ import annotations

import random

import numpy as np

KINDS = ("fluorescence", "stained", "bright-field")
SPLITS = ("train", "tune", "test")
SPLIT_SEED = 2018
FRACTIONS = {"train": 0.65, "tune": 0.15, "test": 0.20}


STAINED_COLOURFULNESS = 6.0  # above it an image is stained tissue (grey fluorescence and bright-field sit near 0)


def _sampled_pixels(image: np.ndarray) -> np.ndarray:
    # Take every n-th pixel first (a view), then widen only those: not a copy of the whole image.
    return image.reshape(-1, 3)[:: max(1, image.shape[0] * image.shape[1] // 20000)].astype(np.int16)


def _distance_from_grey(pixels: np.ndarray) -> float:
    return float(np.abs(pixels - pixels.mean(axis=1, keepdims=True)).mean())


def colourfulness(image: np.ndarray) -> float:
    """Mean distance of an RGB image's pixels from grey: 0 for a grey image; of the 600 shared DSB2018 images,
    7-43 for the 94 stained ones, at most 5.6 for the others."""
    return _distance_from_grey(_sampled_pixels(image))


DIM_TOP = 100  # an image whose 99th-percentile channel value is under this is dim: its colour is judged relative


def _stained(pixels: np.ndarray) -> bool:
    distance = _distance_from_grey(pixels)
    if distance > STAINED_COLOURFULNESS:
        return True
    if distance == 0:  # grey
        return False
    # a dim stained image is as colourful for its brightness, and its background is its light part
    brightest = pixels.max(axis=1)
    top = float(np.percentile(brightest, 99))
    return 0 < top < DIM_TOP and distance * 255.0 / top > STAINED_COLOURFULNESS and float(np.median(brightest)) > top / 2


def is_stained(image: np.ndarray) -> bool:
    """Colour tissue: far from grey, for its brightness when dim (of the 600 shared DSB2018 images, the 94 stained
    ones and only those; a quarter-brightness H&E image too)."""
    return _stained(_sampled_pixels(image))


def image_kind(image: np.ndarray) -> str:
    """fluorescence (light nuclei on dark), bright-field (dark on light grey) or stained (colour tissue)."""
    pixels = _sampled_pixels(image)
    if _stained(pixels):
        return "stained"
    return "bright-field" if float(np.median(pixels)) > 127 else "fluorescence"


def split_counts(total: int, fractions: dict[str, float] = FRACTIONS) -> dict[str, int]:
    """Images of one kind per split: tune and test get at least one each once a kind has 3 images."""
    held = {name: int(round(total * fractions[name])) for name in ("tune", "test")}
    if total >= 3:
        held = {name: max(1, count) for name, count in held.items()}
    while sum(held.values()) > max(0, total - 1):  # train keeps at least one image
        largest = max(held, key=held.get)
        held[largest] -= 1
    return {"train": total - sum(held.values()), **held}


def protocol_splits(ids_and_kinds: dict[str, str], seed: int = SPLIT_SEED,
                    fractions: dict[str, float] = FRACTIONS) -> dict[str, list[str]]:
    """{'train': ids, 'tune': ids, 'test': ids}: disjoint, seeded, stratified by kind, independent of order."""
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for kind in sorted(set(ids_and_kinds.values())):
        ids = sorted(image_id for image_id, own in ids_and_kinds.items() if own == kind)
        random.Random(f"{seed}:{kind}").shuffle(ids)
        counts = split_counts(len(ids), fractions)
        start = 0
        for name in ("test", "tune", "train"):
            splits[name].extend(ids[start:start + counts[name]])
            start += counts[name]
    return {name: sorted(ids) for name, ids in splits.items()}
