"""The Ray Data image pipeline: listing -> parallel decode, resize, normalise -> training/inference rows.

Rows carry `image` (HxWx3 float32 in [0, 1]), `image_id`, the original `height` and `width`, and for
training a `mask` (HxWx1 uint8 class targets). Inference rows also carry `path`, `ok` and `error`, so a
bad file travels to the manifest instead of being dropped, and `image_kind` (fluorescence, stained, bright-field).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import zlib

import numpy as np

from pipeline.data.augment import apply_appearance, random_crops, size_normalising_zoom, true_median_area
from pipeline.data.protocol import KINDS, SPLIT_SEED, image_kind, protocol_splits
from pipeline.io.images import READING_COLUMNS, BadImageError, normalise, resize_image, resize_mask
from pipeline.io.sources import SampleRef, describe, list_kaggle, load_sample
from pipeline.io.synthetic import synthetic_refs
from pipeline.labels.instances import border_targets

# The Keras that trains under MultiWorkerMirroredStrategy is tf-keras (see pipeline/model/network.py); TensorFlow
# reads this variable at import time, so every process Ray starts must have it from the beginning.
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """Connect to the cluster of a Ray job (RAY_ADDRESS set, or one `ray start` runs on this machine), or start a quiet
    local Ray of this process."""
    import ray

    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
    if os.environ.get("NUCLEI_BACKBONE_WEIGHTS"):  # as the user's shell meant it: Ray's workers run elsewhere
        os.environ["NUCLEI_BACKBONE_WEIGHTS"] = os.path.abspath(os.environ["NUCLEI_BACKBONE_WEIGHTS"])
    if ray.is_initialized():
        return
    quiet = dict(logging_level=logging.ERROR, log_to_driver=log_to_driver or os.environ.get("NUCLEI_RAY_LOGS") == "1")
    verbose = os.environ.get("NUCLEI_VERBOSE") == "1"
    if not verbose:
        # Ray's C++ core logs internal notes at ERROR level on the console (e.g. every Ray Data actor "has
        # constructor arguments in the object store", ray#57733); real failures still reach us as exceptions.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    with _console_lines_kept_unless_failed(quiet=not verbose):  # the C++ logger's own start-up line
        if _joins_a_cluster(num_cpus):
            # Its workers do not have this process's environment: object-store credentials and endpoints, the local
            # ImageNet weights and --verbose go with the job.
            forwarded = {k: v for k, v in os.environ.items()
                         if k.startswith(("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "NUCLEI_BACKBONE_WEIGHTS",
                                          "NUCLEI_VERBOSE"))}
            ray.init(runtime_env={"env_vars": {**WORKER_ENV, **forwarded}}, **quiet)
        else:
            # Its workers inherit this environment, so no runtime_env (Ray cannot give an actor with one a worker
            # it started in advance) and no dashboard (the job prints its own progress): together 2-3 s sooner to
            # the first actor on two cores.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    from ray.data import DataContext

    context = DataContext.get_current()
    if os.environ.get("NUCLEI_VERBOSE") != "1":  # the progress bars show each stage; its INFO lines repeat them,
        # and its warnings are about its own scheduling (e.g. "no available CPUs" while Ray Train holds them)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    context.enable_progress_bars = os.environ.get("NUCLEI_PROGRESS", "1") == "1"
    context.print_on_execution_start = False
    # Ray Data reserves half the CPUs per operator by default; on a small machine that leaves a
    # one-operator pipeline running one task at a time. Let every CPU work on whatever is ready.
    context.op_resource_reservation_enabled = False


def _joins_a_cluster(num_cpus: int | None) -> bool:
    """Whether ray.init() would join a running cluster: RAY_ADDRESS (as `ray job submit` sets it), else the address
    `ray start` leaves for ray.init to find (its documented /tmp/ray/ray_current_cluster). A given CPU count means
    a Ray of this process's own (tests), never a cluster found on the machine."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    if num_cpus:
        return False
    try:
        from ray._common.utils import get_ray_address_file
        return os.path.exists(get_ray_address_file(None))
    except ImportError:  # another Ray's layout: join as ray.init would, with the environment sent along
        return True


@contextlib.contextmanager
def _console_lines_kept_unless_failed(quiet: bool):
    """With `quiet`, what native code writes to stderr (file descriptor 2) inside the block is held back, and shown
    only if the block fails."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def auto_blocks(count: int, requested: int = 0, per_block: int = 96) -> int:
    """Blocks for `count` images: enough to keep every CPU busy, few enough to keep overhead low.

    Every Ray task and block costs ~15 ms here: blocks of up to `per_block` images, at least 4 per CPU,
    measured fastest (smaller blocks only for full-resolution images, which a block holds all at once).
    """
    if requested > 0:
        return min(count, requested) or 1
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 2)) if ray.is_initialized() else 2
    return max(1, min(count, max(4 * cpus, math.ceil(count / per_block))))


def split_refs(refs: list[SampleRef], val_fraction: float, seed: int) -> tuple[list[SampleRef], list[SampleRef]]:
    """Seeded, reproducible train/validation split of a listing (by image id, independent of order)."""
    ordered = sorted(refs, key=lambda ref: ref.image_id)
    random.Random(seed).shuffle(ordered)
    n_val = int(round(len(ordered) * val_fraction)) if len(ordered) > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and len(ordered) > 1 else 0), len(ordered) - 1)
    return ordered[n_val:], ordered[:n_val]


def image_kinds(refs: list[SampleRef]) -> dict[str, str]:
    """Each image's kind (pipeline.data.protocol.image_kind: fluorescence, stained, bright-field), by image id."""
    return {ref.image_id: image_kind(load_sample(ref, with_masks=False).image) for ref in refs}


def refs_of_kinds(refs: list[SampleRef], kinds: str, known: dict[str, str] | None = None) -> list[SampleRef]:
    """The refs whose image is of one of `kinds` (comma-separated); all of them when `kinds` is empty.
    `known` (image id -> kind, from image_kinds) saves decoding the images again."""
    wanted = {part.strip() for part in kinds.split(",") if part.strip()}
    if not wanted:
        return refs
    if wanted - set(KINDS):
        raise ValueError(f"--kinds: choose among {', '.join(KINDS)}, got {kinds}")
    of = known if known is not None else image_kinds(refs)
    return [ref for ref in refs if of[ref.image_id] in wanted]


def protocol_refs(refs: list[SampleRef], seed: int | None = None,
                  known: dict[str, str] | None = None) -> dict[str, list[SampleRef]]:
    """The evaluation protocol's train / tune / test refs (pipeline.data.protocol); each image is decoded once for its kind
    (unless `known` gives the kinds already)."""
    by_id = {ref.image_id: ref for ref in refs}
    splits = protocol_splits(known if known is not None else image_kinds(refs), SPLIT_SEED if seed is None else seed)
    return {name: [by_id[image_id] for image_id in ids] for name, ids in splits.items()}


def training_refs(data: str, synthetic_count: int, seed: int) -> list[SampleRef]:
    """Refs of a training source: 'synthetic', or a Kaggle-layout folder/zip (every sample must have masks)."""
    if data == "synthetic":
        return synthetic_refs(synthetic_count, seed)
    listing = list_kaggle(data)
    if listing.problems:
        path, reason = listing.problems[0]
        raise BadImageError(f"{data}: {path}: {reason}" +
                            (f" (and {len(listing.problems) - 1} more problems)" if len(listing.problems) > 1 else ""))
    if not listing.refs:
        raise BadImageError(f"{data}: no samples in Kaggle layout <id>/images/<id>.png found")
    missing = [ref for ref in listing.refs if not ref.has_masks]
    if missing:
        raise BadImageError(f"{describe(missing[0])}: no masks/ folder (training needs masks)")
    return listing.refs


def extra_training_refs(sources: str, taken: set[str]) -> list[SampleRef]:
    """Refs of training-only sources (comma-separated Kaggle-layout folders/zips with masks); an image id that is
    already among `taken` (the main data's) or repeats is refused, so no image is trained on twice or held out
    under two names."""
    refs: list[SampleRef] = []
    seen = set(taken)
    for source in (part.strip() for part in sources.split(",") if part.strip()):
        for ref in training_refs(source, 0, 0):
            if ref.image_id in seen:
                raise BadImageError(f"--extra-data {source}: image id {ref.image_id} is already in the training data")
            seen.add(ref.image_id)
            refs.append(ref)
    return refs


def _training_target(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class targets from instance labels: 2 classes (nucleus) or 3 (interior, and the border of every nucleus)."""
    if num_classes != 3:
        return (labels > 0).astype(np.uint8)
    return border_targets(labels)


def preprocess_training(batch: dict, image_size: int, max_pixels: int, num_classes: int, mode: str = "resize",
                        appearance: str = "rgb", crops_per_image: int = 1, augment: bool = False,
                        seed: int = 0, crops_per_rare_image: int = 0, nucleus_area: float = 0.0) -> dict:
    """Ray Data UDF: decode refs and their masks into model-size training rows; strict (raises naming the file).

    mode 'resize': each image resized to image_size (the notebook's recipe). mode 'native':
    `crops_per_image` random image_size crops at full resolution (augmented when `augment`), so small
    nuclei keep their pixels; the crops are seeded by image id, so a rerun gives the same rows.
    `crops_per_rare_image` (when > 0) replaces that count for stained and bright-field images, the rare kinds.
    `nucleus_area` (when > 0) zooms each image's crops so its median true nucleus has about that many pixels,
    as size normalisation does at inference.
    """
    images, masks, ids = [], [], []
    for ref in _refs(batch):
        try:
            sample = load_sample(ref, with_masks=True, max_pixels=max_pixels)
        except BadImageError as error:
            raise BadImageError(f"{describe(ref)}: {error}") from None
        image = apply_appearance(sample.image, appearance)
        if mode == "native":
            rng = np.random.default_rng([seed, zlib.crc32(ref.image_id.encode())])
            count = crops_per_image
            if crops_per_rare_image > 0 and image_kind(sample.image) != "fluorescence":
                count = crops_per_rare_image
            zoom = size_normalising_zoom(true_median_area(sample.labels), nucleus_area)
            for crop, labels in random_crops(image, sample.labels, image_size, count, rng, augment, zoom=zoom):
                images.append(normalise(crop))
                masks.append(_training_target(labels, num_classes)[..., None])
                ids.append(ref.image_id)
        else:
            images.append(normalise(resize_image(image, image_size)))
            masks.append(_training_target(resize_mask(sample.labels, image_size), num_classes)[..., None])
            ids.append(ref.image_id)
    return {"image": np.stack(images), "mask": np.stack(masks).astype(np.uint8), "image_id": np.asarray(ids)}


def preprocess_inference(batch: dict, image_size: int, max_pixels: int, mode: str = "resize",
                         appearance: str = "rgb", kinds: bool = True, channel: str = "") -> dict:
    """Ray Data UDF: decode images for prediction; lenient (a bad file becomes ok=False + error).

    mode 'resize': image_size x image_size arrays (the model's look, normalised), written in place into one batch
    array; mode 'native': each image at its own size (ragged) as read, RGB uint8: the replica that predicts it gives
    it the model's look (a quarter of the bytes through the object store, and the image itself for the outline
    refiner). `kinds`: classify each image (pipeline.data.protocol.image_kind), which only a
    model with per-kind settings or a specialist needs; otherwise the column is left empty. `channel`:
    --nuclear-channel; the channel, plane and intensity columns say what reading each file chose.
    """
    count = len(batch["image_id"])
    native = mode == "native"
    images = [np.zeros((1, 1, 3), np.uint8)] * count if native else np.zeros((count, image_size, image_size, 3),
                                                                                np.float32)
    heights, widths = np.zeros(count, np.int64), np.zeros(count, np.int64)
    ok, errors, kind_of = np.zeros(count, bool), [""] * count, [""] * count
    readings = {name: [""] * count for name in READING_COLUMNS}
    for row, ref in enumerate(_refs(batch)):
        try:
            sample = load_sample(ref, with_masks=False, max_pixels=max_pixels, channel=channel)
        except Exception as error:  # noqa: BLE001 - lenient: every failure is reported, none stops the run
            errors[row] = str(error).splitlines()[0] or type(error).__name__
            continue
        if native:
            images[row] = sample.image
        else:
            normalise(resize_image(apply_appearance(sample.image, appearance), image_size), out=images[row])
        heights[row], widths[row], ok[row] = sample.height, sample.width, True
        for name in READING_COLUMNS:
            readings[name][row] = getattr(sample.reading, name, "")
        if kinds:
            kind_of[row] = image_kind(sample.image)  # stained / bright-field images may have their own settings
    if native:
        ragged = np.empty(count, dtype=object)
        ragged[:] = images
        images = ragged
    return {"image": images, "image_id": np.asarray(batch["image_id"]), "path": np.asarray(batch["image_path"]),
            "source": np.asarray(batch["source"]), "kind": np.asarray(batch["kind"]),
            "image_kind": np.asarray(kind_of), "height": heights, "width": widths, "ok": ok,
            "error": np.asarray(errors, dtype=object),
            **{name: np.asarray(values, dtype=object) for name, values in readings.items()}}


def _refs(batch: dict) -> list[SampleRef]:
    names = ("image_id", "kind", "source", "image_path", "mask_paths", "has_masks", "index")
    return [SampleRef.from_row({name: batch[name][i] for name in names}) for i in range(len(batch["image_id"]))]


def refs_dataset(refs: list[SampleRef], blocks: int = 0, per_block: int = 96):
    """A Ray dataset of ref rows, split into blocks that the next stages process in parallel."""
    import ray

    from pipeline.data.refs_source import RefsDatasource  # here: it imports Ray Data, which a training crop needs not

    return ray.data.read_datasource(RefsDatasource(refs), override_num_blocks=auto_blocks(len(refs), blocks,
                                                                                           per_block))


def training_dataset(refs: list[SampleRef], image_size: int, max_pixels: int, num_classes: int, blocks: int = 0, *,
                     mode: str = "resize", appearance: str = "rgb", crops_per_image: int = 1, augment: bool = False,
                     seed: int = 0, crops_per_rare_image: int = 0, nucleus_area: float = 0.0):
    """Preprocessed training rows for `refs`, materialised (decoding masks is the expensive part: do it once)."""
    dataset = refs_dataset(refs, blocks).map_batches(
        preprocess_training, batch_size=None, batch_format="numpy",
        fn_kwargs={"image_size": image_size, "max_pixels": max_pixels, "num_classes": num_classes, "mode": mode,
                   "appearance": appearance, "crops_per_image": crops_per_image, "augment": augment, "seed": seed,
                   "crops_per_rare_image": crops_per_rare_image, "nucleus_area": nucleus_area})
    return dataset.materialize()


def inference_dataset(refs: list[SampleRef], image_size: int, max_pixels: int, blocks: int = 0, *,
                      mode: str = "resize", appearance: str = "rgb", kinds: bool = True, channel: str = ""):
    """Streaming (lazy) dataset of decoded images for prediction (resized, or at native size); `kinds`: fill the
    image_kind column (preprocess_inference)."""
    return refs_dataset(refs, blocks, per_block=24 if mode == "native" else 96).map_batches(
        preprocess_inference, batch_size=None, batch_format="numpy",
        fn_kwargs={"image_size": image_size, "max_pixels": max_pixels, "mode": mode, "appearance": appearance,
                   "kinds": kinds, "channel": channel})
