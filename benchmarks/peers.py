"""StarDist 2D side by side with this project's model: same split, same training time, same metric, same images.

    pip install -e ".[peers]"                                   # StarDist and CSBDeep: an optional extra
    python benchmarks/peers.py                                  # train (45 min), score, time: ~1.5 h on 2 cores
    python benchmarks/peers.py --steps accuracy,speed           # again with the model OUTPUT/stardist holds
    python benchmarks/peers.py --minutes 1 --images 20 --large-side 1024 --limit 10    # a smoke test

train: StarDist 2D from scratch on the protocol's train split (pipeline/data/protocol.py), validated on the tune split,
stopped by the wall clock at --minutes (the preset's budget: data loading, training and the threshold step in 45
minutes on this machine); then its own `optimize_thresholds` on the tune split, as its training example does.
Settings follow that example (examples/2D/2_training.ipynb of stardist/stardist): 32 rays, grid (2, 2), 256 x 256
patches, its augmenter (flips and 90-degree turns, intensity scaling, Gaussian noise), each image normalised to its
1st-99.8th percentiles; colour input (3 channels, normalised jointly), which its Config2D supports, as this
project's model reads colour.
accuracy: the test split, the competition's metric (pipeline.labels.metric), per kind of image (pipeline.data.protocol), for
StarDist and for the shipped model `dsb2018` with plain prediction and with its stored settings (pipeline.api).
speed: on the same images, in turns: StarDist's `predict_instances` in a process of its own (one image after the
other; `n_tiles` for the large image) against `jobs/segment.py`'s library call (Ray Data, warm Ray) with plain
prediction and with the model's stored settings; images/s, Mpixel/s and the machine's peak memory rise; ratios
ours / StarDist. The images: the --images real ones of the shared zip, and one --large-side square mosaic of 256-pixel
tiles of real fluorescence images (benchmarks/large_image.py).
Results: OUTPUT/peers.json, the tables printed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import ROOT, PeakMemory, PeakOf, require_real_zip, used_memory

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # csbdeep then takes tf-keras (tensorflow.keras), as the project
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STEPS = ("train", "accuracy", "speed")
MODEL_NAME = "stardist"  # the model's folder inside --output (StarDist2D's `name`)

# StarDist's settings (see the module's docstring and docs/performance.md for why).
N_RAYS = 32
GRID = (2, 2)
PATCH = (256, 256)
PERCENTILES = (1, 99.8)
SEED = 42


def need_stardist():
    """StarDist2D, or one line on how to install it."""
    import pipeline.model.tfkeras  # noqa: F401 - TensorFlow imported once, quietly (its C++ start-up lines), with tf-keras

    try:
        from stardist.models import StarDist2D
    except ImportError as error:
        sys.exit(f"StarDist is not installed ({error}): pip install -e \".[peers]\" in the project's folder")
    return StarDist2D


def prepare(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 image as StarDist's example feeds it: float32, scaled by its 1st-99.8th percentiles, the three
    channels jointly (keeps stained tissue's colours in proportion)."""
    from csbdeep.utils import normalize

    return normalize(image, *PERCENTILES, axis=(0, 1, 2))


def augmenter(x: np.ndarray, y: np.ndarray):
    """StarDist's 2D training example's augmenter, as it is: a random axis permutation and flips, intensity scaled by
    0.6-2 and shifted by +-0.2, Gaussian noise of sigma up to 0.02."""
    axes = tuple(range(y.ndim))
    perm = tuple(np.random.permutation(axes))
    x = x.transpose(perm + tuple(range(y.ndim, x.ndim)))
    y = y.transpose(perm)
    for axis in axes:
        if np.random.rand() > 0.5:
            x = np.flip(x, axis=axis)
            y = np.flip(y, axis=axis)
    x = x * np.random.uniform(0.6, 2) + np.random.uniform(-0.2, 0.2)
    x = x + 0.02 * np.random.uniform(0, 1) * np.random.normal(0, 1, x.shape)
    return x, y


def protocol(limit: int = 0):
    """(splits: train / tune / test refs of the shared zip, kinds: image id -> kind); `limit` > 0 keeps that many
    tune and test images (smoke tests; train stays whole)."""
    from pipeline.data.datasets import image_kinds, protocol_refs
    from pipeline.io.sources import list_kaggle

    refs = list_kaggle(require_real_zip()).refs
    kinds = image_kinds(refs)
    splits = protocol_refs(refs, known=kinds)
    if limit > 0:
        splits = {name: refs if name == "train" else refs[:limit] for name, refs in splits.items()}
    return splits, kinds


def load_pairs(refs) -> tuple[list, list]:
    """Normalised images and labels (holes filled, as StarDist's example does) of refs; images smaller than a
    training patch are left out (none of the shared zip's)."""
    from stardist import fill_label_holes

    from pipeline.io.sources import load_sample

    images, labels = [], []
    for ref in refs:
        sample = load_sample(ref, with_masks=True)
        if sample.height < PATCH[0] or sample.width < PATCH[1]:
            print(f"left out {ref.image_id}: {sample.width} x {sample.height}, smaller than a {PATCH} patch")
            continue
        images.append(prepare(sample.image))
        labels.append(fill_label_holes(sample.labels))
    return images, labels


def train(args, splits, started: float) -> dict:
    """Train StarDist 2D from scratch on the train split within --minutes from `started` (time.monotonic(), before
    the protocol's listing), validated on tune; then its thresholds."""
    StarDist2D = need_stardist()
    from csbdeep.utils.tf import keras_import
    from stardist import calculate_extents
    from stardist.models import Config2D

    deadline = started + args.minutes * 60 * (1 - args.threshold_share)
    import tensorflow as tf

    np.random.seed(SEED)
    tf.random.set_seed(SEED)
    x_train, y_train = load_pairs(splits["train"])
    x_tune, y_tune = load_pairs(splits["tune"])
    loaded = time.monotonic() - started
    print(f"StarDist training data: {len(x_train)} train, {len(x_tune)} tune images, ready after {loaded:.0f} s",
          flush=True)

    config = Config2D(n_rays=N_RAYS, grid=GRID, n_channel_in=3, train_patch_size=PATCH, use_gpu=False,
                      train_tensorboard=False)
    folder = os.path.join(args.output, MODEL_NAME)
    if os.path.isfile(os.path.join(folder, "config.json")):
        shutil.rmtree(folder)  # a StarDist model of an earlier run: start from scratch
    model = StarDist2D(config, name=MODEL_NAME, basedir=args.output)
    median_size = calculate_extents(list(y_train), np.median)
    field_of_view = np.array(model._axes_tile_overlap("YX"))
    print(f"median nucleus extent {median_size}, the network's field of view {field_of_view}", flush=True)

    Callback = keras_import("callbacks", "Callback")

    class Deadline(Callback):
        """Stops training at the wall-clock deadline (after the running step; the epoch's validation and
        checkpoint still run)."""

        def __init__(self):
            super().__init__()
            self.steps = 0
            self.epochs = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if time.monotonic() >= deadline:
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            self.epochs = epoch + 1
            print(f"  epoch {self.epochs}: {time.monotonic() - started:.0f} s of {args.minutes * 60:.0f}", flush=True)

    model.prepare_for_training()
    stopper = Deadline()
    model.callbacks.append(stopper)
    began = time.monotonic()
    history = model.train(x_train, y_train, validation_data=(x_tune, y_tune), augmenter=augmenter, seed=SEED)
    trained = time.monotonic() - began
    # its own threshold search (probability, NMS overlap) on the tune split, asked to score the IoUs the competition
    # metric averages (0.50-0.95) unless --threshold-ious stardist (its default 0.3, 0.5, 0.7)
    from pipeline.labels.metric import THRESHOLDS

    ious = [0.3, 0.5, 0.7] if args.threshold_ious == "stardist" else [round(float(t), 2) for t in THRESHOLDS]
    began = time.monotonic()
    thresholds = model.optimize_thresholds(x_tune, y_tune, iou_threshs=ious, optimize_kwargs={"verbose": 0})
    thresholded = time.monotonic() - began
    total = time.monotonic() - started
    val_losses = [float(value) for value in history.history.get("val_loss", [])]
    summary = {"stardist": stardist_versions(), "model_dir": os.path.abspath(folder),
               "train_images": len(x_train), "tune_images": len(x_tune), "epochs": stopper.epochs,
               "steps": stopper.steps, "steps_per_epoch": config.train_steps_per_epoch,
               "batch_size": config.train_batch_size, "patch": list(PATCH), "n_rays": N_RAYS, "grid": list(GRID),
               "channels": 3, "normalisation": f"percentiles {PERCENTILES}, channels jointly",
               "augmentation": "example's augmenter: permute axes and flip, intensity x0.6-2 +-0.2, noise <= 0.02",
               "best_val_loss": min(val_losses) if val_losses else None, "val_loss": val_losses,
               "threshold_ious": ious, "thresholds": {key: float(value) for key, value in dict(thresholds).items()},
               "seconds": {"loading": round(loaded, 1), "training": round(trained, 1),
                           "thresholds": round(thresholded, 1), "total": round(total, 1)},
               "budget_seconds": args.minutes * 60,
               "median_extent": [float(v) for v in median_size], "field_of_view": [int(v) for v in field_of_view]}
    print(f"StarDist trained {stopper.epochs} epochs ({stopper.steps} steps of {config.train_batch_size} patches) in "
          f"{trained:.0f} s; thresholds {summary['thresholds']} in {thresholded:.0f} s; total {total:.0f} s of the "
          f"{args.minutes * 60:.0f} s budget" + ("  (OVER BUDGET)" if total > args.minutes * 60 * 1.02 else ""),
          flush=True)
    return summary


def stardist_versions() -> dict:
    import csbdeep
    import stardist
    import tensorflow as tf

    from csbdeep.utils.tf import keras

    return {"stardist": stardist.__version__, "csbdeep": csbdeep.__version__, "tensorflow": tf.__version__,
            "keras": f"{keras.__name__} {getattr(keras, '__version__', '') or _tf_keras_version()}"}


def _tf_keras_version() -> str:
    try:
        import tf_keras

        return tf_keras.__version__
    except ImportError:
        return "?"


def load_stardist(model_dir: str):
    StarDist2D = need_stardist()
    model_dir = os.path.abspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        sys.exit(f"no StarDist model in {model_dir} (config.json): run the train step first or pass --model-dir")
    return StarDist2D(None, name=os.path.basename(model_dir), basedir=os.path.dirname(model_dir))


# Plain prediction: one forward pass, no flips or scales, and no post-processing step (benchmarks/segment.py's BARE).
PLAIN = dict(tta=False, scales="1", nucleus_area=0, split_clumps=False, instance_filter=False, refine_outlines=False)


def accuracy(args, splits, kinds) -> dict:
    """The test split's DSB score per kind: StarDist with its tuned thresholds, ours plain and with stored settings."""
    from pipeline.api import Segmenter
    from pipeline.train.evaluation import summarise
    from pipeline.labels.metric import image_scores
    from pipeline.io.sources import load_sample

    model = load_stardist(args.model_dir)
    predictors = {
        "StarDist": lambda image: model.predict_instances(prepare(image), show_tile_progress=False)[0],
        "ours plain": Segmenter.load(args.model, **PLAIN).segment,
        "ours stored": Segmenter.load(args.model).segment,
    }
    rows = {name: [] for name in predictors}
    refs = splits["test"]
    print(f"scoring the test split: {len(refs)} images", flush=True)
    for ref in refs:
        sample = load_sample(ref, with_masks=True)
        for name, predict in predictors.items():
            scores = image_scores(sample.labels, np.asarray(predict(sample.image)).astype(np.int32))
            rows[name].append({"image_id": ref.image_id, "kind": kinds[ref.image_id], "score": float(scores.mean()),
                               "score_iou50": float(scores[0])})
    thresholds = {key: float(value) for key, value in model.thresholds._asdict().items()}
    return {"images": len(refs), "thresholds": thresholds,
            "table": {name: summarise(chosen) for name, chosen in rows.items()}}


def format_accuracy(result: dict) -> str:
    label = 24
    lines = [f"test split ({result['images']} images), mean DSB score (score at IoU 0.5); StarDist's thresholds "
             f"{result['thresholds']}",
             f"{'':<{label}}" + "".join(f"{row['kind'] + ' (' + str(row['images']) + ')':>22}"
                                        for row in result["table"]["StarDist"])]
    for name, table in result["table"].items():
        lines.append(f"{name:<{label}}" + "".join(f"{row['score']:>14.3f} ({row['score_iou50']:.3f})" for row in table))
    ours, theirs = result["table"]["ours stored"], result["table"]["StarDist"]
    lines.append(f"{'ours stored - StarDist':<{label}}" + "".join(f"{a['score'] - b['score']:>+14.3f}{'':8}"
                                                                  for a, b in zip(ours, theirs)))
    return "\n".join(lines)


# --- speed ---------------------------------------------------------------------------------------------------------

def stardist_speed_child(args) -> None:
    """(In a process of its own.) StarDist's model loaded, then every image of the folder read, normalised and
    segmented one after the other; one JSON line: seconds (load + images), load seconds, images, pixels, nuclei,
    this process's peak resident memory."""
    from pipeline.io.sources import list_images, load_sample

    began = time.perf_counter()
    model = load_stardist(args.model_dir)
    loaded = time.perf_counter() - began
    refs = list_images(args.stardist_speed).refs
    pixels = nuclei = 0
    for ref in refs:
        image = load_sample(ref, with_masks=False, max_pixels=10 ** 9).image
        n_tiles = None
        if args.n_tiles_side:  # tiles of about this side, as ours predicts large images in tiles of 1024
            n_tiles = (math.ceil(image.shape[0] / args.n_tiles_side), math.ceil(image.shape[1] / args.n_tiles_side), 1)
        labels = model.predict_instances(prepare(image), n_tiles=n_tiles, show_tile_progress=False)[0]
        pixels += image.shape[0] * image.shape[1]
        nuclei += int(labels.max())
    seconds = time.perf_counter() - began
    print("RESULT " + json.dumps({"seconds": seconds, "load_seconds": loaded, "images": len(refs), "pixels": pixels,
                                  "nuclei": nuclei,
                                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
          flush=True)


def settle(limit: float = 60.0) -> None:
    """Wait (at most `limit` seconds) until the machine's used memory stops moving (within 32 MiB over 2 s): the
    processes of the run before (Ray's actors, StarDist's process) gone, so the next run's peak starts from a level."""
    began = time.monotonic()
    readings = [used_memory()]
    while time.monotonic() - began < limit:
        time.sleep(0.5)
        readings = (readings + [used_memory()])[-5:]
        if len(readings) == 5 and max(readings) - min(readings) < 32 * 2 ** 20:
            return


def _pss(pid: int) -> int:
    """Proportional resident memory of a process in bytes (shared pages split among the processes sharing them)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as stream:
            for line in stream:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            return stream.read()
    except OSError:
        return b""


def _parent(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return int(stream.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def ray_workers():
    """A function listing the worker processes (`ray::...`: actors, tasks, idle workers) of this driver's Ray on this
    machine: the children of its raylet, not another Ray's on the same machine, nor Ray's daemons."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path().encode()
    raylets = {int(pid) for pid in os.listdir("/proc") if pid.isdigit()
               and b"raylet" in _cmdline(pid).split(b"\0")[0] and session in _cmdline(pid)}

    def select() -> list[int]:
        return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid).startswith(b"ray::")
                and _parent(pid) in raylets]

    return select


def process_peak(select) -> PeakOf:
    """Peak of the summed PSS of the processes `select()` names, sampled every 0.2 s while a block runs: the memory
    of the processes doing the work (StarDist's process; Ray's worker processes), shared libraries counted once."""
    return PeakOf(lambda: sum(_pss(pid) for pid in select()), interval=0.2)


def time_stardist(args, folder: str, n_tiles_side: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--model-dir", args.model_dir, "--stardist-speed", folder,
               "--n-tiles-side", str(n_tiles_side)]
    settle()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        with PeakMemory() as memory:
            began = time.perf_counter()
            child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
            with process_peak(lambda: [child.pid]) as processes:
                child.wait()
            wall = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(command, child.returncode, out.read(), err.read())
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"StarDist's timing process failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    return {**result, "peak_mib": memory.mib, "process_mib": processes.peak_mib, "process_seconds": wall}


def time_ours(args, folder: str, output: str, stored: bool) -> dict:
    """jobs/segment.py's library call over the folder (warm Ray): plain prediction or the stored settings; no
    measurements or report (StarDist makes neither), labels written as segment.py writes them."""
    from pipeline.config import SegmentConfig
    from pipeline.segment.run import run_segmentation

    shutil.rmtree(output, ignore_errors=True)
    settings = {} if stored else PLAIN
    config = SegmentConfig(model=args.model, input=folder, output=output, measurements=False, report=False, **settings)
    settle()
    with PeakMemory() as memory, process_peak(ray_workers()) as processes:
        began = time.perf_counter()
        result = run_segmentation(config, output)
        seconds = time.perf_counter() - began
    failed = [row for row in result.rows if row["status"] not in ("done", "existing")]
    if failed:
        raise RuntimeError(f"segment.py failed on {len(failed)} images, e.g. {failed[0]}")
    return {"seconds": seconds, "images": result.done, "nuclei": int(sum(row["nuclei"] for row in result.rows)),
            "peak_mib": memory.mib, "process_mib": processes.peak_mib}


def speed(args) -> dict:
    """The two image sets, each timed for StarDist, ours plain and ours stored in --repeats interleaved turns."""
    from large_image import fluorescence_tiles, write_mosaic
    from segment import make_folder

    from pipeline.data.datasets import ensure_ray

    require_real_zip()
    work = tempfile.mkdtemp(prefix="peers-")
    sets = {}
    try:
        small = os.path.join(work, "images")
        make_folder(args.images, small)
        large = os.path.join(work, "large")
        os.makedirs(large)
        write_mosaic(os.path.join(large, "mosaic.tif"), args.large_side, fluorescence_tiles(48))
        ensure_ray()
        warm = os.path.join(work, "warm")
        make_folder(2, warm)
        time_ours(args, warm, os.path.join(work, "out"), stored=True)  # Ray Data's first run, not timed
        for name, folder, tiles in ((f"{args.images} images", small, 0),
                                    (f"{args.large_side} x {args.large_side}", large, args.tile)):
            print(f"timing {name}: StarDist, ours plain, ours stored; {args.repeats} turn(s)", flush=True)
            runs = {"StarDist": [], "ours plain": [], "ours stored": []}
            for _ in range(args.repeats):
                runs["StarDist"].append(time_stardist(args, folder, tiles))
                runs["ours plain"].append(time_ours(args, folder, os.path.join(work, "out"), stored=False))
                runs["ours stored"].append(time_ours(args, folder, os.path.join(work, "out"), stored=True))
            pixels = runs["StarDist"][0]["pixels"]
            sets[name] = {}
            for side, turns in runs.items():
                seconds = statistics.median(turn["seconds"] for turn in turns)
                images = turns[0]["images"]
                sets[name][side] = {"seconds": seconds, "images": images, "images_per_s": images / seconds,
                                    "mpixel_per_s": pixels / 1e6 / seconds,
                                    "peak_mib": max(turn["peak_mib"] for turn in turns),
                                    "process_mib": max(turn["process_mib"] for turn in turns),
                                    "nuclei": turns[0]["nuclei"], "turns": turns}
            print(format_speed({name: sets[name]}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"repeats": args.repeats, "tile": args.tile, "cpus": os.cpu_count(), "sets": sets}


def format_speed(sets: dict) -> str:
    """The speed table: per image set, StarDist and ours, then the ratios ours / StarDist."""
    lines = [f"{'images':<14}{'side':<13}{'seconds':>9}{'images/s':>10}{'Mpixel/s':>10}{'machine MiB':>13}"
             f"{'process MiB':>13}{'nuclei':>9}"]
    for name, sides in sets.items():
        for side, row in sides.items():
            lines.append(f"{name:<14}{side:<13}{row['seconds']:>9.1f}{row['images_per_s']:>10.2f}"
                         f"{row['mpixel_per_s']:>10.2f}{row['peak_mib']:>13.0f}{row['process_mib']:>13.0f}"
                         f"{row['nuclei']:>9,}")
        theirs = sides["StarDist"]
        for side in ("ours plain", "ours stored"):
            ours = sides[side]
            lines.append(f"{'':<14}ratio {side} / StarDist: speed {ours['images_per_s'] / theirs['images_per_s']:.2f}, "
                         f"memory {ours['peak_mib'] / max(theirs['peak_mib'], 1):.2f} (machine), "
                         f"{ours['process_mib'] / max(theirs['process_mib'], 1):.2f} (processes)")
    lines.append("machine MiB: peak rise of the machine's used memory; process MiB: peak summed PSS of StarDist's "
                 "process / of Ray's worker processes (Ray's daemons not counted); StarDist's seconds include its "
                 "model load, ours its actors' start-up")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="pip install -e \".[peers]\" brings StarDist; see docs/performance.md")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help="comma-separated, of: train (StarDist from scratch), accuracy (test split), speed")
    parser.add_argument("--skip-training", action="store_true", help="--steps accuracy,speed with --model-dir's model")
    parser.add_argument("--minutes", type=float, default=45.0,
                        help="StarDist's wall-clock budget: data loading, training and its threshold step (the "
                             "preset's 45 minutes)")
    parser.add_argument("--threshold-share", type=float, default=0.1,
                        help="part of --minutes kept for the threshold step after training")
    parser.add_argument("--threshold-ious", choices=("metric", "stardist"), default="metric",
                        help="IoUs StarDist's optimize_thresholds scores: the competition metric's 0.50-0.95 "
                             "(default) or StarDist's default 0.3, 0.5, 0.7")
    parser.add_argument("--images", type=int, default=600, help="real images of the speed comparison")
    parser.add_argument("--large-side", type=int, default=4096, help="side of the large mosaic image")
    parser.add_argument("--tile", type=int, default=1024,
                        help="StarDist's n_tiles on the large image: tiles of about this side (ours: 1024)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timing turns of each side")
    parser.add_argument("--limit", type=int, default=0,
                        help="tune and test images used (0: all; a smoke test's shortcut, train stays whole)")
    parser.add_argument("--model", default="dsb2018", help="this project's model (a shipped name or a path)")
    parser.add_argument("--output", default=os.path.join(ROOT, "runs", "peers"),
                        help="folder for the StarDist model (OUTPUT/stardist) and peers.json")
    parser.add_argument("--model-dir", default="", help="a trained StarDist model's folder (default OUTPUT/stardist)")
    parser.add_argument("--stardist-speed", default="", help=argparse.SUPPRESS)  # the timing child process
    parser.add_argument("--n-tiles-side", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.output = os.path.abspath(args.output)
    args.model_dir = os.path.abspath(args.model_dir or os.path.join(args.output, MODEL_NAME))
    if args.stardist_speed:
        stardist_speed_child(args)
        return
    steps = [part.strip() for part in args.steps.split(",") if part.strip()]
    if args.skip_training:
        steps = [step for step in steps if step != "train"]
    if not steps or set(steps) - set(STEPS):
        parser.error(f"--steps: choose among {', '.join(STEPS)}")
    need_stardist()
    require_real_zip()
    os.makedirs(args.output, exist_ok=True)
    results_path = os.path.join(args.output, "peers.json")
    results = {}
    if os.path.isfile(results_path):
        with open(results_path) as stream:
            results = json.load(stream)  # a step run alone keeps the others' results
    results["arguments"] = {key: value for key, value in vars(args).items() if key not in ("stardist_speed",
                                                                                          "n_tiles_side")}

    def save():
        with open(results_path, "w") as stream:
            json.dump(results, stream, indent=2)

    splits = kinds = None
    started = time.monotonic()
    if "train" in steps or "accuracy" in steps:
        splits, kinds = protocol(args.limit)
        print("protocol: " + ", ".join(f"{name} {len(refs)}" for name, refs in splits.items()), flush=True)
    if "train" in steps:
        results["training"] = train(args, splits, started)
        save()
    if "accuracy" in steps:
        results["accuracy"] = accuracy(args, splits, kinds)
        save()
        print(format_accuracy(results["accuracy"]), flush=True)
    if "speed" in steps:
        results["speed"] = speed(args)
        save()
    print()
    if "training" in results:
        training = results["training"]
        print(f"StarDist {training['stardist']['stardist']} (CSBDeep {training['stardist']['csbdeep']}, "
              f"{training['stardist']['keras']}): {training['epochs']} epochs, {training['steps']} steps in "
              f"{training['seconds']['training']:.0f} s, thresholds {training['thresholds']}")
    if "accuracy" in results:
        print(format_accuracy(results["accuracy"]))
    if "speed" in results:
        print(f"speed, {results['speed']['cpus']} CPU cores, medians of {results['speed']['repeats']} turn(s)")
        print(format_speed(results["speed"]["sets"]))
    print(f"results: {results_path}")


if __name__ == "__main__":
    main()
