"""Decode + resize + normalise the 600 real images: Ray Data pipeline against a plain OpenCV loop.

Prints both rates (images/s, medians of 5 runs taken in turns), Ray's start-up time, peak memory for 600
and 6,000 images (the same files repeated), and a last line `ratio=<ray/loop>`. For context it also measures,
in the same turns, a process pool doing the loop's work on every CPU (what the cores allow without Ray: no
results leave the workers), and Ray Data's fixed cost per run (the same pipeline over the refs, no decoding).
Ray Data's progress bars are off while timing (they are for a person watching; ~10% of a 2-second run).
"""
from __future__ import annotations

import multiprocessing
import os
import time

from common import PeakMemory, interleaved_medians, require_real_zip


def decode_chunk(refs) -> int:
    """The loop's work on a chunk of refs, in a pool process."""
    from pipeline.images import normalise, resize_image
    from pipeline.sources import load_sample

    for ref in refs:
        normalise(resize_image(load_sample(ref, with_masks=False).image, 128))
    return len(refs)


def main() -> None:
    zip_path = require_real_zip()
    from pipeline.sources import list_images

    refs = list_images(zip_path).refs
    cpus = os.cpu_count() or 2
    chunks = [refs[i:i + 75] for i in range(0, len(refs), 75)]
    pool = multiprocessing.get_context("spawn").Pool(cpus)
    pool.map(decode_chunk, [refs[:4]] * cpus)  # start the processes and their imports

    os.environ["NUCLEI_PROGRESS"] = "0"
    started = time.perf_counter()
    from pipeline.data import ensure_ray, inference_dataset, refs_dataset

    ensure_ray()
    inference_dataset(refs[:8], 128, 10**8, blocks=4).materialize()  # start the worker processes
    startup = time.perf_counter() - started

    def ray_pipeline(items=refs):
        count = 0
        for batch in inference_dataset(items, 128, 10**8).iter_batches(batch_size=None, batch_format="numpy"):
            count += len(batch["image"])
        assert count == len(items)

    def ray_fixed_cost():
        for _ in refs_dataset(refs).iter_batches(batch_size=None, batch_format="numpy"):
            pass

    medians = interleaved_medians({"loop": lambda: decode_chunk(refs), "ray": ray_pipeline,
                                   "pool": lambda: pool.map(decode_chunk, chunks, chunksize=1),
                                   "fixed": ray_fixed_cost})
    pool.close()
    pool.join()
    with PeakMemory() as small:
        ray_pipeline(refs)
    with PeakMemory() as large:
        ray_pipeline(refs * 10)
    loop_rate, ray_rate, pool_rate = (len(refs) / medians[name] for name in ("loop", "ray", "pool"))
    print(f"images: {len(refs)} real DSB2018 PNGs from the zip -> 128x128 float32")
    print(f"plain OpenCV loop: {loop_rate:.0f} images/s")
    print(f"process pool, {cpus} processes: {pool_rate:.0f} images/s (ratio {pool_rate / loop_rate:.2f}: what the "
          f"cores allow without Ray)")
    print(f"Ray Data pipeline: {ray_rate:.0f} images/s (start-up {startup:.1f}s, not included; fixed cost per run "
          f"{medians['fixed'] * 1000:.0f} ms: the same pipeline over the refs, no decoding)")
    print(f"peak memory rise: {small.mib:.0f} MiB for {len(refs)} images, {large.mib:.0f} MiB for {len(refs) * 10}")
    print(f"ratio={ray_rate / loop_rate:.2f}")


if __name__ == "__main__":
    main()
