"""Inference preprocessing of the 600 real images: Ray Data against the same work in one process.

Both sides run `pipeline.data.datasets.preprocess_inference`, the function segment.py's Ray Data pipeline maps over blocks
of refs (decode, appearance, resize to 128, normalise, and with --kinds each image's kind): the loop calls it here
on blocks of the same size, so the two do equal work and the ratio is what Ray Data's parallelism earns after its
overhead. Prints each step's cost per image (one process), then both rates over the 600 images and over them
repeated --repeat times (6,000 by default), medians of --turns interleaved turns, Ray Data's peak memory rise, and a
last line `ratio=<ray/loop>` at the larger size. Ray Data's progress bars are off while timing.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common import PeakMemory, interleaved_medians, require_real_zip

BLOCK = 96  # refs per block: what pipeline.data.datasets.auto_blocks gives resize-mode inference (per_block=96)


def as_batch(refs) -> dict:
    """The numpy columns Ray Data hands preprocess_inference for a block of refs."""
    from pipeline.data.refs_source import ref_rows

    table = ref_rows(refs)[0]
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def step_costs(refs, appearance: str) -> dict[str, float]:
    """Milliseconds per image of each step of preprocess_inference, one process, over `refs`."""
    from pipeline.data.augment import apply_appearance
    from pipeline.io.images import normalise, resize_image
    from pipeline.data.protocol import image_kind
    from pipeline.io.sources import load_sample

    costs, images = {}, []
    began = time.perf_counter()
    for ref in refs:
        images.append(load_sample(ref, with_masks=False).image)
    costs["decode"] = time.perf_counter() - began
    steps = {"appearance": lambda image: apply_appearance(image, appearance),
             "resize": lambda image: resize_image(image, 128), "kind": image_kind}
    for name, step in steps.items():
        began = time.perf_counter()
        for image in images:
            step(image)
        costs[name] = time.perf_counter() - began
    resized = [resize_image(image, 128) for image in images]
    out = np.zeros((128, 128, 3), np.float32)
    began = time.perf_counter()
    for image in resized:
        normalise(image, out=out)
    costs["normalise"] = time.perf_counter() - began
    return {name: 1000 * seconds / len(refs) for name, seconds in costs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="the larger run: the 600 images this many times over")
    parser.add_argument("--turns", type=int, default=3, help="interleaved turns of each side per size")
    parser.add_argument("--kinds", action="store_true", help="classify each image's kind too (a model with per-kind "
                                                             "settings or a specialist); default: as segment.py "
                                                             "does for a model without them")
    parser.add_argument("--appearance", default="rgb", choices=("rgb", "colour"),
                        help="the model's appearance step (rgb: none; colour: the dsb2018 preset's)")
    args = parser.parse_args()
    zip_path = require_real_zip()
    os.environ["NUCLEI_PROGRESS"] = "0"
    from pipeline.data.datasets import ensure_ray, inference_dataset, preprocess_inference
    from pipeline.io.sources import list_images

    refs = list_images(zip_path).refs
    costs = step_costs(refs, args.appearance)
    print(f"images: {len(refs)} real DSB2018 PNGs from the zip -> 128x128 float32, appearance {args.appearance}, "
          f"kinds {'on' if args.kinds else 'off'}")
    print("per image, one process: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in costs.items()))
    options = dict(image_size=128, max_pixels=10**8, appearance=args.appearance, kinds=args.kinds)

    def loop(items):
        for start in range(0, len(items), BLOCK):
            preprocess_inference(as_batch(items[start:start + BLOCK]), **options)

    def ray_pipeline(items):
        count = 0
        for batch in inference_dataset(items, 128, 10**8, appearance=args.appearance,
                                       kinds=args.kinds).iter_batches(batch_size=None, batch_format="numpy"):
            count += len(batch["image"])
        assert count == len(items)

    started = time.perf_counter()
    ensure_ray()
    ray_pipeline(refs[:8])  # start the worker processes
    print(f"Ray start-up {time.perf_counter() - started:.1f} s (not included)")
    ratio = 0.0
    for repeat in sorted({1, args.repeat}):
        items = refs * repeat
        medians = interleaved_medians({"loop": lambda: loop(items), "ray": lambda: ray_pipeline(items)},
                                      repeats=args.turns)
        loop_rate, ray_rate = (len(items) / medians[name] for name in ("loop", "ray"))
        ratio = ray_rate / loop_rate
        print(f"{len(items)} images, medians of {args.turns} interleaved turns: one process {loop_rate:.0f} images/s, "
              f"Ray Data {ray_rate:.0f} images/s, ratio {ratio:.2f}")
    with PeakMemory() as memory:
        ray_pipeline(refs * args.repeat)
    print(f"peak memory rise of Ray Data over {len(refs) * args.repeat} images: {memory.mib:.0f} MiB")
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
