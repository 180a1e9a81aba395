"""Training throughput: Ray Train with one worker against plain `model.fit`, same model, same data.

Both fit the same preprocessed images (the first N real images, or synthetic ones when the real data is
absent) at 128x128, batch 16; the first epoch (graph tracing) is left out and the median of the others
is used. Also measures two MWMS workers on this machine. Last line: `ratio=<ray/plain>`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from common import REAL_ZIP


def copy_subset(count: int, folder: str) -> str:
    """The first `count` real samples (or synthetic ones) as a Kaggle-layout folder."""
    from pipeline.io.sources import list_kaggle, read_file
    from pipeline.io.synthetic import write_dataset

    if not os.path.isfile(REAL_ZIP):
        write_dataset(folder, count, seed=0)
        return "synthetic"
    for ref in list_kaggle(REAL_ZIP).refs[:count]:
        for path in (ref.image_path, *ref.mask_paths):
            target = os.path.join(folder, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as stream:
                stream.write(read_file(ref, path))
    return "real DSB2018"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=240, help="images used (train 80%%, validation 20%%)")
    args = parser.parse_args()

    from pipeline.config import TrainConfig
    from pipeline.data.datasets import ensure_ray, split_refs, training_dataset, training_refs
    from pipeline.model.network import build_unet, compile_model
    from pipeline.model.tfkeras import keras
    from pipeline.train.training import run_training

    data = tempfile.mkdtemp()
    kind = copy_subset(args.images, data)
    ensure_ray()
    train_refs, val_refs = split_refs(training_refs(data, 0, 0), 0.2, 42)  # run_training's split (seed 42)
    train = training_dataset(train_refs, 128, 10**8, 2).take_batch(len(train_refs))
    val = training_dataset(val_refs, 128, 10**8, 2).take_batch(len(val_refs))

    class EpochTimer(keras.callbacks.Callback):
        times: list = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.started)

    model = compile_model(build_unet(128, 2, "none"), 1e-3, 2)
    timer = EpochTimer()
    model.fit(train["image"], train["mask"], batch_size=16, epochs=args.epochs, verbose=0, shuffle=True,
              validation_data=(val["image"], val["mask"]), callbacks=[timer])
    plain = len(train_refs) / statistics.median(timer.times[1:])

    def ray_rate(workers: int) -> float:
        with tempfile.TemporaryDirectory() as output:
            run_training(TrainConfig(data=data, output=output, epochs=args.epochs, workers=workers,
                                     cpus_per_worker=1.0 if workers == 1 else 0.5, batch_size=16,
                                     backbone_weights="none", warmup_epochs=0, patience=100, snapshots=0))
            rows = [json.loads(line) for line in open(os.path.join(output, "history.jsonl"))]
            return statistics.median(row["samples_per_second"] for row in rows[1:])

    one, two = ray_rate(1), ray_rate(2)
    print(f"data: {len(train_refs)} training + {len(val_refs)} validation {kind} images, 128x128, batch 16 "
          f"(per worker), median of epochs 2..{args.epochs}, validation included")
    print(f"plain model.fit: {plain:.1f} samples/s")
    print(f"Ray Train, 1 worker: {one:.1f} samples/s")
    print(f"Ray Train, 2 workers (MWMS, 0.5 CPU each): {two:.1f} samples/s")
    print(f"ratio={one / plain:.2f}")


if __name__ == "__main__":
    main()
