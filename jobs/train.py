"""Train the nuclei U-Net with Ray Train (MultiWorkerMirroredStrategy across workers).

Locally: `python jobs/train.py` (starts Ray on this machine). On a cluster:
`ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/stage1_train.zip --workers 4`.
With --tune (the dsb2018 preset's), a --holdout protocol run then chooses its inference settings on the tune
split, as jobs/tune.py does, so segment.py, submit.py and evaluate.py give its best result with no flag.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import run_job  # noqa: E402
from pipeline.config import TrainConfig, parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = parse_args(TrainConfig, argv, description=__doc__)

    def work() -> None:
        import dataclasses

        from pipeline.training import run_training
        from pipeline.tuning import describe, tune, untunable_reason, will_tune

        skipped = untunable_reason(dataclasses.asdict(config)) if config.tune and not config.resume else ""
        if skipped:
            print(f"--tune: this run will not be tuned after training: {skipped}")
        info = run_training(config)
        model = os.path.join(os.path.abspath(config.output), "model.keras")
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(info["final_metrics"].items()) if isinstance(v, float))
        print(f"model: {model} (weights of epoch {info['kept_epoch']} of {info['epochs_run']}, "
              f"best {info['best_epoch']}; {metrics})")
        trained = info["config"]  # a resumed run's own settings, not this command line's
        if will_tune(trained):
            print("choosing the inference settings on the tune split (--no-tune skips this; jobs/tune.py redoes it)",
                  flush=True)
            log = tune(model)
            print(describe(log))
            print(f"tuned in {log['seconds'] / 60:.1f} min; run.json holds the settings")

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
