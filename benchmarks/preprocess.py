"""Decode + resize + normalise the 600 real images: Ray Data pipeline against a plain OpenCV loop.

Prints both rates (images/s, medians of 5 runs taken in turns), Ray's start-up time, peak memory for 600
and 6,000 images (the same files repeated), and a last line `ratio=<ray/loop>`. Ray Data's progress bars are
off while timing (they are for a person watching; here they cost ~10% of a 2-second run).
"""
from __future__ import annotations

import os
import time

from common import PeakMemory, interleaved_medians, require_real_zip


def main() -> None:
    zip_path = require_real_zip()
    from pipeline.images import normalise, resize_image
    from pipeline.sources import list_images, load_sample

    refs = list_images(zip_path).refs

    def plain_loop():
        for ref in refs:
            normalise(resize_image(load_sample(ref, with_masks=False).image, 128))

    os.environ["NUCLEI_PROGRESS"] = "0"
    started = time.perf_counter()
    from pipeline.data import ensure_ray, inference_dataset

    ensure_ray()
    inference_dataset(refs[:8], 128, 10**8, blocks=4).materialize()  # start the worker processes
    startup = time.perf_counter() - started

    def ray_pipeline(items=refs):
        count = 0
        for batch in inference_dataset(items, 128, 10**8).iter_batches(batch_size=None, batch_format="numpy"):
            count += len(batch["image"])
        assert count == len(items)

    medians = interleaved_medians({"loop": plain_loop, "ray": ray_pipeline})
    loop_seconds, ray_seconds = medians["loop"], medians["ray"]
    with PeakMemory() as small:
        ray_pipeline(refs)
    with PeakMemory() as large:
        ray_pipeline(refs * 10)
    loop_rate, ray_rate = len(refs) / loop_seconds, len(refs) / ray_seconds
    print(f"images: {len(refs)} real DSB2018 PNGs from the zip -> 128x128 float32")
    print(f"plain OpenCV loop: {loop_rate:.0f} images/s")
    print(f"Ray Data pipeline: {ray_rate:.0f} images/s (start-up {startup:.1f}s, not included)")
    print(f"peak memory rise: {small.mib:.0f} MiB for {len(refs)} images, {large.mib:.0f} MiB for {len(refs) * 10}")
    print(f"ratio={ray_rate / loop_rate:.2f}")


if __name__ == "__main__":
    main()
