"""Choose a trained model's inference settings on the evaluation protocol's tune split; store them in run.json.

`python jobs/tune.py --model RUN/model.keras` predicts the run's tune-split images (never its test split),
grid-searches the post-processing thresholds, tries clump splitting, and fits the false-positive filter and the
outline refiner, keeping each only where it gains 0.005 (out of fold for the fitted ones). Size normalisation,
flips and scales cost 2-13 forward passes per image: they are tried only within --max-cost (0: all of them), and a
costlier way of predicting is kept only where it gains 0.005 over the cheaper one.
Writes RUN/tuning.json (every score) and the chosen settings into RUN/run.json, so segment.py, submit.py and
evaluate.py use them with no flag.
Images whose nuclei are outside the sizes the model trained on are zoomed towards them, a kind with a specialist
by its own training images' sizes (`--size-range` stores only that). A --holdout refit run (trained on the tune
split too) takes its sibling's settings: --settings-from SIBLING/model.keras, with the sibling's specialists, or
with --specialists its own (the same recipe, --holdout refit, --init-from the refit).
`--specialists stained=ST/model.keras` routes stained images to a model fine-tuned for them (jobs/train.py
--init-from RUN/model.keras --kinds stained), if it beats this model on the tune split's stained images.
"""
from __future__ import annotations

import sys

from pipeline.cli import run_job
from pipeline.config import TuneConfig, parse_args
from pipeline.train.size_range import store_size_range
from pipeline.train.specialists import copy_settings, parse_specialists
from pipeline.train.tuning import FITTED, describe, tune


def main(argv: list[str] | None = None) -> int:
    config = parse_args(TuneConfig, argv, description=__doc__, required=("model",))

    def work() -> None:
        if config.size_range:
            stored = store_size_range(config.model, config.data)
            by_kind = sorted(stored.get("by_kind", {}).items())
            ranges = {"images": stored, **{f"{kind} images": own for kind, own in by_kind}}
            for images, sizes in ranges.items():
                print(f"size normalisation stored: {images} whose median nucleus is outside {sizes['within'][0]:g}-"
                      f"{sizes['within'][1]:g} pixels are zoomed towards {sizes['nucleus_area']:g}")
            return
        if config.settings_from:
            settings = copy_settings(config.model, config.settings_from, parse_specialists(config.specialists))
            shown = {key: value for key, value in settings.items() if key not in FITTED}
            print(f"settings of {config.settings_from} copied: {shown}")
            return

        log = tune(config.model, config.data, write=not config.dry_run,
                   predictions=tuple(part.strip() for part in config.predictions.split(",") if part.strip()),
                   specialists=parse_specialists(config.specialists), max_cost=config.max_cost)
        print(describe(log))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
