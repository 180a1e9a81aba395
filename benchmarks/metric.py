"""The competition metric's speed: `pipeline.labels.metric.image_score` against the same score computed with
np.unique (the implementation it replaced), side by side on the same label images.

Truths are the real DSB2018 images' instance labels (synthetic ones without ../shared); predictions are the
truths shifted by a few pixels with one nucleus in ten dropped, so matches are partial as in real scoring.
A tune pass scores every tune image at 48 threshold combinations and more, which is why this matters.
Last line: `ratio=<unique seconds / image_score seconds>`.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from common import REAL_ZIP, interleaved_medians


def label_pairs(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(truth, prediction) label images: real truths when the data is here, else synthetic ones."""
    from pipeline.io.sources import list_kaggle, load_sample
    from pipeline.io.synthetic import render_sample

    if os.path.isfile(REAL_ZIP):
        truths = [load_sample(ref).labels for ref in list_kaggle(REAL_ZIP).refs[:count]]
    else:
        truths = [render_sample(0, index).labels for index in range(count)]
    rng = np.random.default_rng(0)
    pairs = []
    for truth in truths:
        predicted = np.roll(truth, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        dropped = rng.random(int(truth.max()) + 1) < 0.1
        dropped[0] = False
        pairs.append((truth, np.where(dropped[predicted], 0, predicted).astype(np.int32)))
    return pairs


def score_with_unique(truth: np.ndarray, predicted: np.ndarray) -> float:
    """The metric as it was: label values found by np.unique (a sort of every pixel), then the same thresholds."""
    from pipeline.labels.metric import scores_from_iou

    true_ids, true_flat = np.unique(truth, return_inverse=True)
    pred_ids, pred_flat = np.unique(predicted, return_inverse=True)
    intersection = np.bincount(true_flat.ravel() * pred_ids.size + pred_flat.ravel(),
                               minlength=true_ids.size * pred_ids.size).reshape(true_ids.size, pred_ids.size)
    union = intersection.sum(axis=1, keepdims=True) + intersection.sum(axis=0, keepdims=True) - intersection
    iou = (intersection / np.maximum(union, 1))[np.ix_(true_ids > 0, pred_ids > 0)]
    return float(scores_from_iou(iou).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="label images to score (default 100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed turns of each (default 5)")
    args = parser.parse_args()
    from pipeline.labels.metric import image_score

    pairs = label_pairs(args.images)
    current = [image_score(truth, predicted) for truth, predicted in pairs]
    before = [score_with_unique(truth, predicted) for truth, predicted in pairs]
    if not np.allclose(current, before):
        raise SystemExit("the two implementations disagree")
    pixels = sum(truth.size for truth, _ in pairs)
    print(f"{len(pairs)} label images, {pixels / 1e6:.1f} M pixels, mean score {np.mean(current):.4f} (both)")
    medians = interleaved_medians({
        "image_score": lambda: [image_score(truth, predicted) for truth, predicted in pairs],
        "np.unique": lambda: [score_with_unique(truth, predicted) for truth, predicted in pairs],
    }, repeats=args.repeats)
    for name, seconds in medians.items():
        print(f"{name:12s} median {seconds:.3f} s ({seconds / len(pairs) * 1000:.2f} ms an image)")
    print(f"ratio={medians['np.unique'] / medians['image_score']:.1f}")


if __name__ == "__main__":
    main()
