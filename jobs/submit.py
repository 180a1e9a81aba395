"""Turn a folder of test images into a Kaggle DSB2018 submission CSV (validated; scored with --labels).

Runs the same streaming path as segment.py (its label PNGs go to <output stem>_work/ so a rerun resumes),
writes `ImageId,EncodedPixels` with every test image present, validates it, and with --labels prints the
local DSB score as the last line `score=<mean>`.
"""
from __future__ import annotations

import os
import sys

from pipeline.cli import run_job
from pipeline.config import SegmentConfig, parse_args
from submission.api import make_submission
from submission.score import print_report


def main(argv: list[str] | None = None) -> int:
    config = parse_args(SegmentConfig, argv, description=__doc__, required=("input",))
    config.output = config.output or "submission.csv"

    def work() -> None:
        done = make_submission(config)
        print(f"wrote {done.path}: {done.rows} rows for {done.images} images ({done.failed} unreadable, "
              f"written with empty predictions); valid. Details: {os.path.join(done.work_dir, 'manifest.csv')}")
        if done.score is not None:
            print_report(done.score)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
