"""Turn a folder of test images into a Kaggle DSB2018 submission CSV (validated; scored with --labels).

Runs the same streaming path as segment.py (its label PNGs go to <output stem>_work/ so a rerun resumes),
writes `ImageId,EncodedPixels` with every test image present, validates it, and with --labels prints the
local DSB score as the last line `score=<mean>`.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import run_job  # noqa: E402
from pipeline.config import SegmentConfig, parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = parse_args(SegmentConfig, argv, description=__doc__, required=("input",))
    config.output = config.output or "submission.csv"

    def work() -> None:
        from pipeline.inference import run_segmentation
        from submission.csvfile import write_submission
        from submission.rle import encode_labels
        from submission.score import print_report, score_submission, load_truth
        from submission.validate import image_shapes, violations

        work_dir = os.path.splitext(config.output)[0] + "_work"
        result = run_segmentation(config, work_dir, encoder=encode_labels)
        rows = {}
        for row in result.rows:
            if row["image_id"]:  # every listed test image gets rows; an unreadable one an empty prediction
                rows[row["image_id"]] = [(row["image_id"], rle) for rle in result.rles.get(row["image_id"], [])] \
                    or [(row["image_id"], "")]
        count = write_submission(config.output, rows)
        problems = violations(config.output, image_shapes(config.input))
        if problems:
            raise ValueError(f"{config.output} failed validation: {problems[0]} ({len(problems)} problems)")
        print(f"wrote {config.output}: {count} rows for {len(rows)} images ({result.failed} unreadable, "
              f"written with empty predictions); valid. Details: {os.path.join(work_dir, 'manifest.csv')}")
        if config.labels:
            print_report(score_submission(config.output, load_truth(config.labels)))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
