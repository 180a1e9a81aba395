"""The whole chain on the embedded synthetic data, end to end, on a laptop (no download).

Generates synthetic nuclei, trains the U-Net with Ray Train, segments a held-out synthetic test folder,
writes and validates a Kaggle submission, scores it locally and leaves overlay pictures to look at.
"""
from __future__ import annotations

import argparse
import os
import sys

from jobs import submit, train
from pipeline.io.synthetic import write_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="runs/quickstart", help="folder for everything this writes")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument("--train-images", type=int, default=96, help="synthetic training images (default 96)")
    parser.add_argument("--test-images", type=int, default=24, help="synthetic test images (default 24)")
    args = parser.parse_args(argv)

    run = os.path.join(args.output, "run")
    test = os.path.join(args.output, "test")
    # The preset's recipe (native-resolution crops, border class, standardised look), sized for a laptop.
    status = train.main(["--preset", "dsb2018", "--data", "synthetic", "--synthetic-count", str(args.train_images),
                         "--epochs", str(args.epochs), "--output", run, "--backbone-weights", "none",
                         "--crops-per-image", "4", "--encoder-width", "0.35", "--warmup-epochs", "1",
                         "--min-size", "10", "--time-limit", "0", "--holdout", "random", "--no-tune"])
    if status:
        return status
    write_dataset(test, args.test_images, seed=1000)  # a different seed: never seen in training
    print(f"test set: {args.test_images} synthetic images with masks in {test}", flush=True)
    return submit.main(["--model", os.path.join(run, "model.keras"), "--input", test,
                        "--output", os.path.join(args.output, "submission.csv"), "--labels", test, "--overlays", "6"])


if __name__ == "__main__":
    sys.exit(main())
