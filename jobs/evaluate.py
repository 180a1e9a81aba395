"""Score a trained model on its run's held-out validation images (DSB2018 metric, overall and per kind).

`python jobs/evaluate.py --model RUN/model.keras` re-creates the run's seeded validation split from its
run.json, segments those images as jobs/segment.py does, and prints a table (mean score and mean at IoU
0.5 for all images, fluorescence, stained and bright-field) and a last line `score=<mean>`. Writes
scores.csv, summary.json and best/worst pictures to --output (default: RUN/evaluation).
"""
from __future__ import annotations

import sys

from pipeline.cli import run_job
from pipeline.config import EvaluateConfig, parse_args
from pipeline.train.evaluation import evaluate, format_table


def main(argv: list[str] | None = None) -> int:
    config = parse_args(EvaluateConfig, argv, description=__doc__)

    def work() -> None:
        summary = evaluate(config)
        print(format_table(summary))
        print(f"score={summary['table'][0]['score']:.4f}")

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
