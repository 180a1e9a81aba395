"""Train the nuclei U-Net with Ray Train (MultiWorkerMirroredStrategy across workers).

Locally: `python jobs/train.py` (starts Ray on this machine). On a cluster:
`ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/stage1_train.zip --workers 4`.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import run_job  # noqa: E402
from pipeline.config import TrainConfig, parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = parse_args(TrainConfig, argv, description=__doc__, prog="jobs/train.py")

    def work() -> None:
        from pipeline.training import run_training

        info = run_training(config)
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(info["final_metrics"].items()) if isinstance(v, float))
        print(f"model: {os.path.join(os.path.abspath(config.output), 'model.keras')} "
              f"(weights of epoch {info['kept_epoch']} of {info['epochs_run']}, best {info['best_epoch']}; {metrics})")

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
