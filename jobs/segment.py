"""Segment every image under a folder (or zip, or URI) into 16-bit nucleus label PNGs at original size.

Writes OUTPUT/labels/<input path>.png (0 background, 1..N nuclei), optional OUTPUT/overlays/, and
OUTPUT/manifest.csv (one line per input file: size, nucleus count, status, error). A rerun skips
finished images. Runs locally or as a Ray job: `ray job submit --working-dir . -- python jobs/segment.py ...`.
"""
from __future__ import annotations

import sys

from pipeline.cli import run_job
from pipeline.config import SegmentConfig, parse_args
from pipeline.segment.run import run_segmentation


def main(argv: list[str] | None = None) -> int:
    config = parse_args(SegmentConfig, argv, description=__doc__,
                        required=("input", "output"))

    def work() -> None:
        result = run_segmentation(config, config.output)
        nuclei = sum(int(row.get("nuclei") or 0) for row in result.rows if row["status"] in ("done", "existing"))
        print(f"segmented {result.done} images, {nuclei:,} nuclei ({result.failed} failed) in {result.seconds:.1f}s; "
              f"outputs in {config.output} (manifest.csv, labels/, measurements/, report.png)")

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
