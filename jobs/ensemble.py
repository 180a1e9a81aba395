"""Average several runs of one recipe: `python jobs/ensemble.py --models A/model.keras,B/model.keras --output RUN`.

Writes RUN/model.keras, one model whose softmax is the mean of its members' (runs trained with different
seeds), and RUN/run.json; every job takes it like any run's model. Tune its inference settings next
(`jobs/tune.py --model RUN/model.keras`): averaged probabilities want their own thresholds. It costs each
member's prediction time.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import run_job  # noqa: E402
from pipeline.config import EnsembleConfig, parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_args(EnsembleConfig, argv, description=__doc__, required=("models", "output"))

    def work() -> None:
        from pipeline.model import ensemble_model

        members = [path for path in args.models.split(",") if path]
        info = ensemble_model(members, args.output)
        size = os.path.getsize(os.path.join(args.output, "model.keras")) / 2**20
        print(f"wrote {args.output}/model.keras ({size:.1f} MiB): the mean of {len(members)} models "
              f"(seeds {', '.join(map(str, info['ensemble_seeds']))}); next: jobs/tune.py --model "
              f"{args.output}/model.keras")

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
