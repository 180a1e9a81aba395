"""Train the nuclei U-Net with Ray Train (MultiWorkerMirroredStrategy across workers).

Locally: `python jobs/train.py` (starts Ray on this machine). On a cluster:
`ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/stage1_train.zip --workers 4`.
With --tune (the dsb2018 preset's), a --holdout protocol run then chooses its inference settings on the tune
split, as jobs/tune.py does, so segment.py, submit.py and evaluate.py give its best result with no flag.
"""
from __future__ import annotations

import sys

from pipeline.api import train_with
from pipeline.cli import run_job
from pipeline.config import TrainConfig, parse_args


def main(argv: list[str] | None = None) -> int:
    config = parse_args(TrainConfig, argv, description=__doc__)

    def work() -> None:
        train_with(config)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
