"""A whole-slide-sized image segmented block by block: time, peak memory per process, and agreement with the
same pixels segmented whole.

    cd benchmarks && python large_image.py                  # 20,000 x 20,000, blocks of 2048 (the default)
    cd benchmarks && python large_image.py --side 6000      # a quicker look
    cd benchmarks && python large_image.py --folder F --compare-only   # the comparison again, on F's earlier run
    cd benchmarks && python large_image.py --side 8192 --half-empty   # then its right half empty: time, skipped blocks

The image is a mosaic of 256-pixel tiles of the real DSB2018 fluorescence images (the commonest kind), written
as a tiled, compressed TIFF without holding it in memory. `jobs/segment.py`'s library call segments it with the
shipped model's stored settings; every Ray worker process's peak resident memory is read from /proc at the end.
A centre crop that fits in memory is segmented whole, in one forward pass (pipeline.api.Segmenter), and compared
nucleus by nucleus with the blockwise labels of the same pixels: the nuclei inside the crop's inner part, their
count and IoU.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from common import PeakMemory, require_real_zip

TILE = 256


def fluorescence_tiles(count: int, seed: int = 0) -> list[np.ndarray]:
    """256 x 256 crops of `count` real fluorescence images of the shared zip."""
    import random

    from pipeline.data.protocol import image_kind
    from pipeline.io.sources import list_kaggle, load_sample

    refs = list_kaggle(require_real_zip()).refs
    random.Random(seed).shuffle(refs)
    tiles = []
    for ref in refs:
        image = load_sample(ref, with_masks=False).image
        if min(image.shape[:2]) >= TILE and image_kind(image) == "fluorescence":
            tiles.append(np.ascontiguousarray(image[:TILE, :TILE]))
        if len(tiles) == count:
            break
    return tiles


def background_tile(tiles: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """A tile of empty slide: the tiles' median background with a camera's noise (s.d. 2 grey levels)."""
    level = np.median(np.stack([np.median(tile, axis=(0, 1)) for tile in tiles]), axis=0)
    noise = np.random.default_rng(seed).normal(0, 2, (TILE, TILE, 1))
    return np.clip(level + noise, 0, 255).astype(np.uint8)


def write_mosaic(path: str, side: int, tiles: list[np.ndarray], empty_from: int | None = None) -> None:
    """A side x side RGB TIFF, tiled 256 x 256 and compressed, written tile by tile (bounded memory); from column
    `empty_from` (pixels) on, empty slide."""
    import tifffile

    per_row = -(-side // TILE)
    empty = background_tile(tiles)

    def chunks():
        for row in range(per_row):
            for col in range(per_row):
                if empty_from is not None and col * TILE >= empty_from:
                    yield empty
                else:
                    yield tiles[(row * 7 + col * 3 + row * col) % len(tiles)]

    tifffile.imwrite(path, chunks(), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="zlib", bigtiff=True)


def worker_peaks(others: frozenset = frozenset()) -> dict[int, int]:
    """Peak resident memory (VmHWM, bytes) of every live Ray worker process on this machine but `others`, by pid."""
    peaks = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in others:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as stream:
                command = stream.read().decode(errors="replace")
            if not command.startswith("ray::"):
                continue
            with open(f"/proc/{pid}/status") as stream:
                for line in stream:
                    if line.startswith("VmHWM:"):
                        peaks[int(pid)] = int(line.split()[1]) * 1024
        except OSError:
            continue
    return peaks


def inner_nuclei(labels: np.ndarray, margin: int) -> np.ndarray:
    """The labels of nuclei lying wholly in the crop's inner part (at least `margin` pixels from its edges)."""
    from scipy import ndimage

    boxes = ndimage.find_objects(labels)
    height, width = labels.shape
    keep = [index for index, box in enumerate(boxes, start=1) if box is not None
            and box[0].start >= margin and box[1].start >= margin
            and box[0].stop <= height - margin and box[1].stop <= width - margin]
    return np.where(np.isin(labels, keep), labels, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=20_000, help="image side in pixels")
    parser.add_argument("--block-size", type=int, default=2048, help="jobs/segment.py --block-size")
    parser.add_argument("--crop", type=int, default=4096, help="side of the centre crop segmented whole")
    parser.add_argument("--folder", default="", help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--compare-only", action="store_true",
                        help="only the comparison, with the mosaic and blockwise labels an earlier run left in --folder")
    parser.add_argument("--half-empty", action="store_true",
                        help="then the same mosaic with its right half empty slide: its time against the full one's "
                             "and how many blocks were skipped")
    args = parser.parse_args()

    from pipeline.api import Segmenter, segment_folder
    from pipeline.data.augment import fit_appearance
    from pipeline.io.blocks import ALIGN, TiffWindows, sample_mosaic
    from pipeline.labels.metric import matched_ious
    from pipeline.data.protocol import image_kind

    folder = args.folder or tempfile.mkdtemp(prefix="large-image-")
    os.makedirs(os.path.join(folder, "in"), exist_ok=True)
    image_path = os.path.join(folder, "in", "slide.tif")
    output = os.path.join(folder, "out")
    if not args.compare_only:
        started = time.perf_counter()
        write_mosaic(image_path, args.side, fluorescence_tiles(48))
        print(f"mosaic {args.side} x {args.side} ({args.side ** 2 / 1e6:.0f} Mpixel), "
              f"{os.path.getsize(image_path) / 1e6:.0f} MB tiled TIFF, written in {time.perf_counter() - started:.0f} s",
              flush=True)
        others = frozenset(worker_peaks())  # Ray workers of other runs on this machine are not ours
        with PeakMemory() as machine:
            started = time.perf_counter()
            result = segment_folder(os.path.join(folder, "in"), output, block_size=args.block_size, report=False)
            seconds = time.perf_counter() - started
        row = result.rows[0]
        assert row["status"] == "done", row
        workers = worker_peaks(others)
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"blockwise: {seconds:.0f} s, {row['nuclei']:,} nuclei, {args.side ** 2 / 1e6 / seconds:.2f} Mpixel/s; "
              f"peak memory: driver {driver / 2 ** 30:.2f} GiB, Ray workers "
              + ", ".join(f"{peak / 2 ** 30:.2f}" for peak in sorted(workers.values(), reverse=True)[:4])
              + f" GiB (largest of {len(workers)}); whole machine +{machine.mib / 1024:.2f} GiB", flush=True)

    # The crop starts on the encoder's 32-pixel grid, as every block's window does, and is segmented with the
    # kind and look the blockwise run measured on the whole slide: the same pixels, seen the same way, whole.
    top = (args.side - args.crop) // 2 // ALIGN * ALIGN
    window = (slice(top, top + args.crop), slice(top, top + args.crop))
    crop = read_window(image_path, window)
    blockwise = read_window(os.path.join(output, "labels", "slide.tif"), window)
    segmenter = Segmenter.load("dsb2018", tile=args.crop)  # whole: one forward pass, as each block is
    sample = sample_mosaic(TiffWindows(image_path))
    kind = image_kind(sample) if segmenter.needs_kind else ""
    started = time.perf_counter()
    whole = segmenter.segment(crop, kind=kind, appearance=fit_appearance(sample, segmenter.info.appearance))
    whole_seconds = time.perf_counter() - started
    margin = 64
    inner_whole, inner_blocks = inner_nuclei(whole, margin), inner_nuclei(blockwise, margin)
    count_whole, count_blocks = len(np.unique(inner_whole)) - 1, len(np.unique(inner_blocks)) - 1
    matched = matched_ious(inner_whole, inner_blocks)
    print(f"centre {args.crop} x {args.crop} segmented whole in {whole_seconds:.0f} s: {count_whole:,} nuclei inside "
          f"(>= {margin} px from its edges) against {count_blocks:,} blockwise, difference "
          f"{abs(count_blocks - count_whole) / max(1, count_whole):.2%}; matched {len(matched):,} "
          f"({len(matched) / max(1, count_whole):.1%}) with mean IoU {matched.mean():.3f}", flush=True)
    if args.half_empty and not args.compare_only:
        half_folder = os.path.join(folder, "half")
        os.makedirs(os.path.join(half_folder, "in"), exist_ok=True)
        write_mosaic(os.path.join(half_folder, "in", "slide.tif"), args.side, fluorescence_tiles(48),
                     empty_from=args.side // 2 // TILE * TILE)
        started = time.perf_counter()
        half = segment_folder(os.path.join(half_folder, "in"), os.path.join(half_folder, "out"),
                              block_size=args.block_size, report=False).rows[0]
        half_seconds = time.perf_counter() - started
        print(f"half empty: {half_seconds:.0f} s, {half['nuclei']:,} nuclei, {half['empty_blocks']} of "
              f"{half['blocks']} blocks empty (skipped), against {seconds:.0f} s for the full mosaic "
              f"({row['empty_blocks']} of {row['blocks']} empty)", flush=True)
        print(f"ratio={half_seconds / seconds:.3f}")
    if not args.folder:
        shutil.rmtree(folder, ignore_errors=True)


def read_window(path: str, window) -> np.ndarray:
    """Part of a tiled TIFF, decoding only its tiles."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tiff:
        return np.asarray(zarr.open(tiff.aszarr(), mode="r")[window])


if __name__ == "__main__":
    main()
