"""Export a trained model to ONNX, so segmentation runs with ONNX Runtime and no TensorFlow.

`python jobs/export.py --model dsb2018 --output dsb2018.onnx` converts with tf2onnx (dynamic height and
width), runs TensorFlow and ONNX Runtime on the same real images, prints the largest difference, and
refuses to write a model that disagrees. The model's run.json settings travel in the ONNX metadata and in
a .json beside the file; `segment.py --model dsb2018.onnx` then uses them as it would run.json.
`--format bioimageio --output dsb2018.bioimageio.zip` writes a bioimage.io model package of the same export
(deepImageJ, ilastik, QuPath, napari) and runs bioimageio.core's test_model on it before keeping it.
"""
from __future__ import annotations

import sys

from pipeline.cli import run_job
from pipeline.config import ExportConfig, parse_args
from pipeline.model.onnx import run_export


def main(argv: list[str] | None = None) -> int:
    config = parse_args(ExportConfig, argv, description=__doc__)

    def work() -> None:
        if config.format == "bioimageio":
            from pipeline.model.bioimageio import run_bioimageio_export  # here: bioimageio.core, an extra

            result = run_bioimageio_export(config)
            print(f"checked on {result['images']} images from {result['check_source']}: max |TensorFlow - ONNX "
                  f"Runtime| = {result['max_abs_difference']:.2e}")
            print(f"wrote {result['package']}: bioimageio.core test_model {result['test_model']} "
                  f"({result['test_seconds']} s)")
            return
        result = run_export(config)
        print(f"checked on {result['images']} images from {result['check_source']}: max |TensorFlow - ONNX Runtime| "
              f"= {result['max_abs_difference']:.2e}")
        print(f"wrote {result['onnx']}{''.join(', ' + path for path in result['specialists'])} and {result['json']}")

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
