"""Ship a trained run as a named model: `python jobs/package.py --model RUN/model.keras --name dsb2018`.

Writes models/<name>/model.keras (weights and architecture, no optimizer state), run.json (the run's
settings plus the file's sha256, checked whenever the model is loaded) and tuning.json. The model card
(models/<name>/README.md) is written by a person: it says what the model is for and where it fails.
`--onnx` also exports the model and its specialists to ONNX beside them (checked against TensorFlow), which
inference on CPUs then runs with ONNX Runtime.
"""
from __future__ import annotations

import os
import sys

from pipeline.cli import run_job
from pipeline.config import ExportConfig, PackageConfig, parse_args
from pipeline.io.fileio import check_relative
from pipeline.model.onnx import add_onnx_twins, check_images_for
from pipeline.model.registry import MODELS_DIR


def main(argv: list[str] | None = None) -> int:
    args = parse_args(PackageConfig, argv, description=__doc__, required=("model", "name"))

    def work() -> None:
        from pipeline.model.network import package_model  # here: TensorFlow, not for --help

        folder = args.output or os.path.join(MODELS_DIR, check_relative(args.name))
        info = package_model(args.model, folder)
        size = os.path.getsize(os.path.join(folder, "model.keras")) / 2**20
        print(f"wrote {folder}/model.keras ({size:.1f} MiB, sha256 {info.sha256['model.keras']})")
        for kind, name in info.postprocess.specialists.items():
            print(f"wrote {folder}/{name} (the {kind} specialist, sha256 {info.sha256[name]})")
        if args.onnx:
            source, images = check_images_for(ExportConfig(), info)
            twins = add_onnx_twins(os.path.join(folder, "model.keras"), images)
            print(f"wrote {', '.join(twins['files'])}: max |TensorFlow - ONNX Runtime| = "
                  f"{twins['max_abs_difference']:.2e} on {twins['images']} images from {source}")

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
