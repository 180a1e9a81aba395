"""Score a submission with the DSB2018 metric: `python -m submission.score SUB.csv --labels DIR`.

Labels are Kaggle's layout with masks (folder or zip). Prints the mean at IoU 0.5, per-image scores
with --per-image, and a last line `score=<mean>`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from submission.csvfile import labels_by_image, read_submission
from pipeline.io.sources import list_kaggle, load_sample
from pipeline.labels.metric import image_scores


@dataclass
class ScoreReport:
    """Scores of one submission: per image (mean over thresholds and at IoU 0.5) and overall means."""

    per_image: dict[str, tuple[float, float]]

    @property
    def score(self) -> float:
        return float(np.mean([s for s, _ in self.per_image.values()])) if self.per_image else 0.0

    @property
    def score_at_50(self) -> float:
        return float(np.mean([s for _, s in self.per_image.values()])) if self.per_image else 0.0


def score_labels(truth: dict[str, np.ndarray], predicted: dict[str, np.ndarray]) -> ScoreReport:
    """Score predicted label images against true ones; an image missing from `predicted` scores as empty."""
    per_image = {}
    for image_id, true_labels in truth.items():
        pred = predicted.get(image_id)
        if pred is None or pred.shape != true_labels.shape:
            pred = np.zeros_like(true_labels)
        scores = image_scores(true_labels, pred)
        per_image[image_id] = (float(scores.mean()), float(scores[0]))
    return ScoreReport(per_image)


def load_truth(labels: str) -> dict[str, np.ndarray]:
    """True instance labels of every sample with masks in a Kaggle-layout folder or zip."""
    return {ref.image_id: load_sample(ref).labels for ref in list_kaggle(labels).refs if ref.has_masks}


def score_submission(path: str, truth: dict[str, np.ndarray]) -> ScoreReport:
    _, rows = read_submission(path)
    shapes = {image_id: labels.shape for image_id, labels in truth.items()}
    return score_labels(truth, labels_by_image(rows, shapes))


def print_report(report: ScoreReport, per_image: bool = False, stream=sys.stdout) -> None:
    if per_image:
        for image_id, (score, at_50) in sorted(report.per_image.items()):
            print(f"{image_id},{score:.4f},{at_50:.4f}", file=stream)
    print(f"images={len(report.per_image)} mean_iou50={report.score_at_50:.4f}", file=stream)
    print(f"score={report.score:.4f}", file=stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m submission.score", description=__doc__.splitlines()[0])
    parser.add_argument("submission", help="the submission CSV")
    parser.add_argument("--labels", required=True, help="Kaggle-layout folder or zip with <id>/masks/*.png")
    parser.add_argument("--per-image", action="store_true", help="print id,score,score_at_iou50 per image")
    args = parser.parse_args(argv)
    try:
        truth = load_truth(args.labels)
        report = score_submission(args.submission, truth)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_report(report, args.per_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
