"""Bulk segmentation throughput, measured side by side on the same images and model.

(a) segment.py's pipeline end to end (Ray Data + actor pool, warm Ray), (b) the raw model forward pass on
already decoded and resized arrays, (c) a single-process per-image loop (read, resize, predict one
image, resize back, label, encode). Also peak memory of (a) for --images and --large images.
Last line: `ratio=<a/c>`.

`--compare runtimes`: TensorFlow and ONNX Runtime side by side (the model exported in the run): the
forward pass at 128x128, batch 32, in interleaved turns, then segment.py end to end over the folder with
each. `--compare measurements`: segment.py end to end with and without per-nucleus measurements.
`--compare outlines` / `--compare clumps`: segment.py end to end with and without the model's outline refiner
(run.json) / clump splitting (run.json's setting, else the default one).
These compare with plain prediction (no flips, one scale), whatever the model's run.json chooses.
`--compare stored`: segment.py with the model's stored settings (what it does with no flag) against plain
prediction (no flips, scales, size normalisation, clump splitting, filter or refiner); ratio = plain / stored time.
`--compare steps`: plain prediction, then clump splitting, the false-positive filter and the outline refiner added
one at a time, then the stored settings: each step's cost in seconds per image. `--split tune` takes the images
from the evaluation protocol's tune split, the images the tune step scored each step on.
`--compare throughput`: every throughput row of the project in one run, the forward pass the reference: in one
process over --images shared images (forward pass alone, Segmenter with plain prediction, with the stored settings);
a folder of --images as `python jobs/segment.py` (a fresh command: its first label file and its end) against a
one-process Segmenter loop writing label PNGs; a --mosaic-side tiled TIFF mosaic of real fluorescence images
block by block, with each Ray worker's peak memory. Stored settings unless said; last line `ratio=<job/loop>`.

    cd benchmarks && python segment.py --model dsb2018 --compare throughput --images 600
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import PeakMemory, REAL_ZIP


def make_folder(count: int, folder: str, split: str = "") -> None:
    """`count` test images in Kaggle's test layout: the real images (cycled; `split`: only the evaluation
    protocol's tune or test split), else synthetic ones."""
    from pipeline.data.datasets import protocol_refs
    from pipeline.io.images import encode_png
    from pipeline.io.sources import list_kaggle, read_file
    from pipeline.io.synthetic import render_sample

    refs = list_kaggle(REAL_ZIP).refs if os.path.isfile(REAL_ZIP) else []
    if refs and split:
        refs = protocol_refs(refs)[split]
    for index in range(count):
        image_id = f"img{index:06d}"
        target = os.path.join(folder, image_id, "images", image_id + ".png")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as stream:
            if refs:
                ref = refs[index % len(refs)]
                stream.write(read_file(ref, ref.image_path))
            else:
                stream.write(encode_png(render_sample(0, index, with_masks=False).image))


# --compare steps: the stored post-processing steps added one at a time, in the order jobs/tune.py keeps them.
STEPS = (("plain prediction", {}), ("+ clump splitting", dict(split_clumps=True)),
         ("+ false-positive filter", dict(instance_filter=True)), ("+ outline refiner", dict(refine_outlines=True)))

# --compare modes that switch one post-processing step on and off: the SegmentConfig field, and its name.
SWITCHES = {"outlines": ("refine_outlines", "the outline refiner"), "clumps": ("split_clumps", "clump splitting")}


PLAIN = dict(tta=False, scales="1", nucleus_area=0)  # one forward pass per image, whatever run.json says
BARE = dict(PLAIN, split_clumps=False, instance_filter=False, refine_outlines=False)  # and no post-processing step


def cumulative_steps() -> dict[str, dict]:
    """{side: segment.py's step switches} for --compare steps: each side has its step and every step above it."""
    switches, sides = {key: value for key, value in BARE.items() if key not in PLAIN}, {}
    for name, step in STEPS:
        switches = sides[name] = {**switches, **step}
    return sides


def segment_seconds(model: str, folder: str, output: str, measurements: bool = True, stored: bool = False,
                    **switches: bool) -> tuple[float, int]:
    """(seconds, images done) of one segment.py run (warm Ray) into a fresh output folder; `switches` are
    SegmentConfig's step flags (refine_outlines, split_clumps); `stored`: the model's stored settings instead of
    plain prediction."""
    from pipeline.config import SegmentConfig
    from pipeline.segment.run import run_segmentation

    shutil.rmtree(output, ignore_errors=True)
    began = time.perf_counter()
    # Plain prediction (no flips, scales or size normalisation, whatever run.json says): the cost of the
    # pipeline, not of test-time augmentation.
    settings = {} if stored else {**PLAIN, **switches}
    result = run_segmentation(SegmentConfig(model=model, input=folder, output=output, measurements=measurements,
                                            report=measurements, **settings), output)
    return time.perf_counter() - began, result.done


def compare(args, work: str, images: str, count: int) -> None:
    """The --compare modes: runtimes (TensorFlow vs ONNX Runtime), measurements, outlines or clumps (on vs off)."""
    from common import interleaved_medians
    from pipeline.config import ExportConfig
    from pipeline.data.datasets import ensure_ray
    from pipeline.io.images import normalise, resize_image
    from pipeline.segment.predictor import Predictor
    from pipeline.model.onnx import run_export
    from pipeline.model.registry import resolve_model
    from pipeline.io.sources import list_images, load_sample

    ensure_ray()
    model = os.path.abspath(resolve_model(args.model))
    output = os.path.join(work, "out")
    if args.compare == "measurements":
        seconds = {}
        for turn in range(args.repeats):
            for measure in (False, True):
                seconds.setdefault(measure, []).append(segment_seconds(model, images, output, measure)[0])
        off, on = (float(np.median(seconds[flag])) for flag in (False, True))
        print(f"segment.py over {count} images, medians of {args.repeats} interleaved runs: without measurements "
              f"{count / off:.1f} images/s ({off:.1f} s), with {count / on:.1f} images/s ({on:.1f} s); "
              f"ratio={off / on:.2f}")
        return
    if args.compare == "stored":
        seconds = {}
        for turn in range(args.repeats):
            for stored in (False, True):
                switches = {} if stored else {key: value for key, value in BARE.items() if key not in PLAIN}
                seconds.setdefault(stored, []).append(
                    segment_seconds(model, images, output, measurements=False, stored=stored, **switches)[0])
        plain, stored = (float(np.median(seconds[flag])) for flag in (False, True))
        print(f"segment.py over {count} images, medians of {args.repeats} interleaved runs: plain prediction "
              f"{count / plain:.2f} images/s ({plain:.1f} s), the model's stored settings {count / stored:.2f} "
              f"images/s ({stored:.1f} s); ratio={plain / stored:.2f}")
        return
    if args.compare == "steps":
        sides, seconds = cumulative_steps(), {}
        for turn in range(args.repeats):
            for name, switches in sides.items():
                seconds.setdefault(name, []).append(
                    segment_seconds(model, images, output, measurements=False, **switches)[0])
            seconds.setdefault("stored settings", []).append(
                segment_seconds(model, images, output, measurements=False, stored=True)[0])
        plain = float(np.median(seconds["plain prediction"]))
        print(f"segment.py over {count} images, medians of {args.repeats} interleaved runs (each step added to "
              f"those above it):")
        for name, values in seconds.items():
            median = float(np.median(values))
            print(f"  {name:24s} {median / count:.3f} s per image ({median:.1f} s), plain / this {plain / median:.2f}")
        print(f"ratio={plain / float(np.median(seconds['stored settings'])):.2f}")
        return
    if args.compare in SWITCHES:
        field, name = SWITCHES[args.compare]
        seconds = {}
        for turn in range(args.repeats):
            for switch in (False, True):
                seconds.setdefault(switch, []).append(
                    segment_seconds(model, images, output, measurements=False, **{field: switch})[0])
        off, on = (float(np.median(seconds[flag])) for flag in (False, True))
        print(f"segment.py over {count} images, medians of {args.repeats} interleaved runs: without {name} "
              f"{count / off:.2f} images/s ({off:.1f} s), with {count / on:.2f} images/s ({on:.1f} s); "
              f"ratio={off / on:.2f}")
        return
    onnx_path = os.path.join(work, "model.onnx")
    export = run_export(ExportConfig(model=model, output=onnx_path))
    print(f"exported {onnx_path}: max |TF - ONNX Runtime| {export['max_abs_difference']:.2e} on "
          f"{export['images']} images of {export['check_source']}")
    refs = list_images(images).refs[:args.batch_size * 4]
    arrays = np.stack([normalise(resize_image(load_sample(ref, with_masks=False).image, 128)) for ref in refs])
    predictors = {"tensorflow": Predictor(model, args.batch_size, threads=2),
                  "onnxruntime": Predictor(onnx_path, args.batch_size, threads=2)}
    for predictor in predictors.values():
        predictor.predict(arrays[:args.batch_size])  # warm up / trace
    medians = interleaved_medians({name: (lambda p=p: p.predict(arrays)) for name, p in predictors.items()},
                                  repeats=args.repeats)
    rates = {name: len(arrays) / seconds for name, seconds in medians.items()}
    print(f"forward pass, 128x128, batch {args.batch_size}, {len(arrays)} images, medians of {args.repeats} turns: "
          f"TensorFlow {rates['tensorflow']:.1f} images/s, ONNX Runtime {rates['onnxruntime']:.1f} images/s")
    ends = {}
    for name, path in (("tensorflow", model), ("onnxruntime", onnx_path)):
        seconds, done = segment_seconds(path, images, output)
        ends[name] = done / seconds
    print(f"segment.py end to end over {count} images: TensorFlow {ends['tensorflow']:.1f} images/s, "
          f"ONNX Runtime {ends['onnxruntime']:.1f} images/s")
    print(f"ratio={rates['onnxruntime'] / rates['tensorflow']:.2f}")


def throughput(args, work: str, images: str) -> None:
    """--compare throughput: the rows of the throughput table, side by side in this run (see the module's doc)."""
    from common import interleaved_medians
    from large_image import fluorescence_tiles, worker_peaks, write_mosaic
    from pipeline.api import Segmenter, segment_folder
    from pipeline.data.augment import apply_appearance
    from pipeline.data.protocol import image_kind
    from pipeline.io.images import encode_png, normalise
    from pipeline.io.sources import list_images, load_sample

    refs = list_images(images).refs
    decoded = [load_sample(ref, with_masks=False).image for ref in refs]
    mpx = sum(image.shape[0] * image.shape[1] for image in decoded) / 1e6
    inside = decoded[:args.in_process]
    inside_mpx = sum(image.shape[0] * image.shape[1] for image in inside) / 1e6
    plain, stored = Segmenter.load(args.model, **BARE), Segmenter.load(args.model)
    prepared = [(normalise(apply_appearance(image, plain.info.appearance)),
                 image_kind(image) if stored.needs_kind else "") for image in inside]

    def forward() -> None:
        for array, kind in prepared:
            plain.predictor.predict_whole(array, kind)

    forward()  # warm up: TensorFlow builds its function for each new image size once
    for image in inside[:2]:
        stored.segment(image)

    medians = interleaved_medians({"forward": forward,
                                   "plain": lambda: [plain.segment(image) for image in inside],
                                   "stored": lambda: [stored.segment(image) for image in inside]}, args.repeats)
    reference = inside_mpx / medians["forward"]
    print(f"in one process, {len(inside)} shared images ({inside_mpx:.1f} Mpx), medians of {args.repeats} "
          f"interleaved turns:", flush=True)
    for name, label in (("forward", "forward pass alone (the reference)"),
                        ("plain", "Segmenter.segment, plain prediction"),
                        ("stored", "Segmenter.segment, stored settings")):
        rate = inside_mpx / medians[name]
        print(f"  {label:40s} {rate:5.2f} Mpx/s  {medians[name] / medians['forward']:.2f}x the forward pass's time "
              f"(+{medians[name] / medians['forward'] - 1:.2f} beyond it)", flush=True)

    def loop() -> float:
        began = time.perf_counter()
        for ref in refs:  # what a user would write without Ray: read, segment, write the label PNG
            labels = stored.segment(load_sample(ref, with_masks=False).image)
            target = os.path.join(work, "loop", ref.image_id + ".png")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as stream:
                stream.write(encode_png(labels.astype(np.uint16)))
        return time.perf_counter() - began

    flag_sets = [[], *(shlex.split(flags) for flags in args.job_flags.split(";") if flags.strip())]
    loops, jobs = [], [[] for _ in flag_sets]
    for _ in range(args.repeats):  # interleaved turns: the box's noise falls on every side alike
        loops.append(loop())
        for runs, flags in zip(jobs, flag_sets):
            runs.append(job_seconds(args.model, images, os.path.join(work, "job"), flags))
    looped = float(np.median(loops))
    print(f"a folder of {len(refs)} shared images ({mpx:.1f} Mpx), stored settings, label PNGs, medians of "
          f"{args.repeats} interleaved turns:", flush=True)
    print(f"  one-process Segmenter loop                {mpx / looped:5.2f} Mpx/s  {looped:.1f} s "
          f"({', '.join(f'{seconds:.1f}' for seconds in loops)})", flush=True)
    ratios = []
    for runs, flags in zip(jobs, flag_sets):
        seconds, first = (float(np.median([run[index] for run in runs])) for index in (0, 1))
        ratios.append(looped / seconds)
        print(f"  python jobs/segment.py {' '.join(flags) or '(a fresh command)':18s} {mpx / seconds:5.2f} Mpx/s  "
              f"{seconds:.1f} s ({', '.join(f'{run[0]:.1f}' for run in runs)}), first image done after {first:.1f} s; "
              f"loop / job {looped / seconds:.2f}", flush=True)

    if args.mosaic_side:
        slide = os.path.join(work, "slide")
        os.makedirs(slide)
        write_mosaic(os.path.join(slide, "slide.tif"), args.mosaic_side, fluorescence_tiles(48))
        others = frozenset(worker_peaks())
        began = time.perf_counter()
        row = segment_folder(slide, os.path.join(work, "slide-out"), report=False).rows[0]
        slide_seconds = time.perf_counter() - began
        peaks = sorted(worker_peaks(others).values(), reverse=True)
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"a {args.mosaic_side:,} x {args.mosaic_side:,} tiled TIFF mosaic of real fluorescence images, block by "
              f"block: {args.mosaic_side ** 2 / 1e6 / slide_seconds:.2f} Mpx/s ({slide_seconds:.0f} s, "
              f"{row['nuclei']:,} nuclei, {row.get('empty_blocks', 0)} of {row.get('blocks', 1)} blocks empty), "
              f"{args.mosaic_side ** 2 / 1e6 / slide_seconds / reference:.2f}x the forward pass's rate; peak memory "
              f"per Ray worker {', '.join(f'{peak / 2 ** 30:.2f}' for peak in peaks[:4])} GiB, this process "
              f"{driver / 2 ** 30:.2f} GiB", flush=True)
    print(f"ratio={ratios[0]:.2f}")


def job_seconds(model: str, images: str, output: str, flags: list[str]) -> tuple[float, float]:
    """(seconds, seconds to its first label file) of `python jobs/segment.py` over `images` as a user starts it: a
    fresh process and its own Ray, label files only."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs", "segment.py"),
               "--model", model, "--input", images, "--output", output, "--no-measurements", "--no-report",
               "--overlays", "0", *flags]
    began, first = time.perf_counter(), float("nan")
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as job:
        while job.poll() is None:
            if np.isnan(first) and any(files for _, _, files in os.walk(os.path.join(output, "labels"))):
                first = time.perf_counter() - began
            time.sleep(0.25)
    if job.returncode:
        raise SystemExit(f"jobs/segment.py failed with exit status {job.returncode}: {' '.join(command)}")
    return time.perf_counter() - began, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="runs/quickstart/run/model.keras")
    parser.add_argument("--images", type=int, default=1000, help="images for the rates and the first memory reading")
    parser.add_argument("--large", type=int, default=10000, help="image count for the second memory reading")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compare", choices=("", "throughput", "runtimes", "measurements", "stored", "steps",
                                              *SWITCHES),
                        default="",
                        help="runtimes: TensorFlow vs ONNX Runtime; measurements / outlines / clumps: segment.py "
                             "with and without them (the model's outline refiner; clump splitting); stored: the "
                             "model's stored settings against plain prediction; steps: plain prediction, then "
                             "each post-processing step added in turn, then the stored settings; throughput: every "
                             "row of the throughput table in one run (forward pass, Segmenter, a folder, a mosaic)")
    parser.add_argument("--in-process", type=int, default=120,
                        help="throughput: images of the folder segmented in one process for the first rows")
    parser.add_argument("--job-flags", default="",
                        help="throughput: also run jobs/segment.py with these flags (sets apart by ';'), e.g. "
                             "'--concurrency 1 --cpus-per-actor 1; --model dsb2018.onnx'")
    parser.add_argument("--mosaic-side", type=int, default=8192,
                        help="throughput: side of the tiled TIFF mosaic segmented block by block (0: none)")
    parser.add_argument("--split", choices=("", "tune", "test"), default="",
                        help="take the images from this split of the evaluation protocol (the shared 600 images)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved turns of each side (--compare)")
    args = parser.parse_args()
    if args.compare:
        work = tempfile.mkdtemp()
        images = os.path.join(work, "images")
        make_folder(args.images, images, args.split)
        if args.compare == "throughput":
            throughput(args, work, images)
        else:
            compare(args, work, images, args.images)
        shutil.rmtree(work, ignore_errors=True)
        return
    if not os.path.isfile(args.model):
        raise SystemExit(f"no model at {args.model}: run jobs/quickstart.py first or pass --model")

    from pipeline.config import SegmentConfig
    from pipeline.data.datasets import ensure_ray
    from pipeline.io.images import normalise, resize_image
    from pipeline.segment.postprocess import PostSettings, labels_at_original_size
    from pipeline.segment.predictor import Predictor
    from pipeline.segment.run import run_segmentation
    from pipeline.io.sources import list_images, load_sample
    from submission.rle import encode_labels

    work = tempfile.mkdtemp()
    images = os.path.join(work, "images")
    make_folder(args.images, images)
    refs = list_images(images).refs
    started = time.perf_counter()
    ensure_ray()
    startup = time.perf_counter() - started

    def pipeline_rate(folder: str, count: int) -> tuple[float, float]:
        output = os.path.join(work, "out")
        shutil.rmtree(output, ignore_errors=True)
        config = SegmentConfig(model=args.model, input=folder, output=output, batch_size=args.batch_size,
                               cpus_per_actor=1.0)
        with PeakMemory() as memory:
            began = time.perf_counter()
            result = run_segmentation(config, output)
            seconds = time.perf_counter() - began
        assert result.done == count, (result.done, count)
        return count / seconds, memory.mib

    rate_a, memory_small = pipeline_rate(images, len(refs))

    predictor = Predictor(os.path.abspath(args.model), args.batch_size, threads=2)
    arrays = np.stack([normalise(resize_image(load_sample(ref, with_masks=False).image, 128)) for ref in refs])
    predictor.predict(arrays[: args.batch_size])  # trace once
    began = time.perf_counter()
    predictor.predict(arrays)
    rate_b = len(arrays) / (time.perf_counter() - began)

    single = Predictor(os.path.abspath(args.model), 1, threads=2)
    single.predict(arrays[:1])
    loop_refs = refs[:200]
    began = time.perf_counter()
    for ref in loop_refs:
        image = load_sample(ref, with_masks=False).image
        probabilities = single.predict(normalise(resize_image(image, 128))[None])[0]
        encode_labels(labels_at_original_size(probabilities, image.shape[0], image.shape[1],
                                                    PostSettings(threshold=0.5, min_size=10)))
    rate_c = len(loop_refs) / (time.perf_counter() - began)

    large = os.path.join(work, "large")
    make_folder(args.large, large)
    rate_large, memory_large = pipeline_rate(large, args.large)

    print(f"images: {len(refs)} {'real DSB2018' if os.path.isfile(REAL_ZIP) else 'synthetic'} PNGs, batch "
          f"{args.batch_size}, Ray start-up {startup:.1f}s (not included)")
    print(f"(a) segment pipeline end to end: {rate_a:.1f} images/s ({len(refs)} images; {rate_large:.1f} images/s "
          f"over {args.large}, where start-up weighs less)")
    print(f"(b) raw forward pass on resized arrays: {rate_b:.1f} images/s  (a/b = {rate_a / rate_b:.2f})")
    print(f"(c) single-process per-image loop: {rate_c:.1f} images/s ({len(loop_refs)} images)")
    print(f"peak memory rise of (a): {memory_small:.0f} MiB for {len(refs)} images, "
          f"{memory_large:.0f} MiB for {args.large}")
    print(f"ratio={rate_a / rate_c:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
