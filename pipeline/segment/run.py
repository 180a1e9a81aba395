"""Bulk segmentation with Ray Data (jobs/segment.py): stream images through a pool of model replicas to label files.

read -> decode -> a pool of model replicas (actors, the model loaded once per actor) -> label file and outputs. A CPU
replica of a native-mode model segments each image and writes its files itself (Labeller: only manifest rows leave
it); a GPU replica or a resize-mode batch sends probabilities on to output tasks, which make the nuclei at each
image's size and write them.
Large images go block by block (pipeline.segment.blockwise). Finished images are skipped on a rerun with the same
model and options (made_with.json); every bad file becomes a manifest line, never a stop.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import SegmentConfig
from pipeline.data.datasets import ensure_ray, inference_dataset
from pipeline.io import fileio
from pipeline.io.blocks import image_shape, is_large
from pipeline.io.images import READING_COLUMNS, encode_png
from pipeline.io.sources import SampleRef, list_images, load_sample, pixel_size_of
from pipeline.model.registry import info_path, resolve_model, sha256_of, specialist_files
from pipeline.model.runinfo import RunInfo
from pipeline.outputs.exports import parse_exports
from pipeline.outputs.folder import (clear_measurements, find_labels, measured_image_ids, output_file, output_paths,
                                     overlay, read_labels, relative_label_path, write_exports, write_labels,
                                     write_manifest, write_measurement_part, write_report)
from pipeline.outputs.measure import image_summary, measure_nuclei
from pipeline.segment.blockwise import segment_large_image
from pipeline.segment.postprocess import (PostSettings, labels_at_zoom, needs_image_kind, postprocess_settings,
                                          prediction_settings)
from pipeline.segment.predictor import Predictor, inspect_model, threads_for
from pipeline.segment.segmenter import Segmenter


FINISH_BATCH = 8  # predicted images per output task (a measurement part each)
# Blocks queued at each replica: with Ray Data's default (two) one of two replicas waited up to 10 s at a time for its
# next block (600 shared images, 80 s against 68 s with four; every block was read long before).
TASKS_IN_FLIGHT = 4
NATIVE_BATCH = 4  # images per batch to a native-mode predictor: the first image done 3 s sooner (600 shared images)


@dataclass
class SegmentationResult:
    """What a run produced: one manifest row per input (and per left-out file), RLEs per image id."""

    rows: list[dict] = field(default_factory=list)
    rles: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return sum(row["status"] in ("done", "existing") for row in self.rows)

    @property
    def failed(self) -> int:
        return sum(row["status"] == "error" for row in self.rows)


@dataclass(frozen=True)
class Writing:
    """What a run writes for each image besides its label file: overlays of some images (by id), --export files,
    per-nucleus measurements (pixel size in micrometres, 0: each file's own), read with its --nuclear-channel."""

    overlay_ids: frozenset = frozenset()
    exports: tuple[str, ...] = ()
    pixel_size: float = 0.0
    channel: str = ""
    max_pixels: int = 100_000_000
    measure: bool = False


class Labeller:
    """Ray Data actor for a CPU replica of a native-mode model: each image segmented and its files written where it
    was predicted (Segmenter.labels, then finish_batch): only manifest rows leave it, the size measurement's nuclei
    are reused and the image is not read again. A failing image is its manifest line."""

    def __init__(self, model_path: str, config: SegmentConfig, threads: int, output: str, writing: Writing,
                 encoder=None):
        self.segmenter = Segmenter(model_path, config, threads)
        self.output, self.writing, self.encoder = output, writing, encoder

    def __call__(self, batch: dict) -> dict:
        kinds = batch["image_kind"] if "image_kind" in batch else [""] * len(batch["ok"])
        return finish_batch(batch, self.output, self.segmenter.post, self.writing, self.encoder,
                            segment=lambda row: self.segmenter.labels(batch["image"][row], str(kinds[row])))


def _existing_row(ref: SampleRef, output: str, label_path: str, encoder=None) -> tuple[dict, list[str]]:
    """Manifest row (and RLEs) of an image finished by an earlier run, read back from its label file."""
    labels = read_labels(label_path)
    row = {"image_id": ref.image_id, "path": ref.image_path, "height": labels.shape[0], "width": labels.shape[1],
           **image_summary(labels), "labels": relative_label_path(output, label_path), "status": "existing",
           "error": ""}
    return row, (encoder(labels) if encoder else [])


def finish_image(batch: dict, row: int, output: str, settings: PostSettings, writing: Writing, encoder=None,
                 segment=None):
    """One image's labels at its own size (`segment(row)`'s, a Labeller's, else made here from a Predictor's
    probabilities) and every file of it (exports first, then the label file: a finished image always has them all,
    so a rerun may skip it). Returns (summary, label file, (pixel size, its source), measurement rows or None, RLE
    text)."""
    kind = str(batch["image_kind"][row]) if "image_kind" in batch else ""
    path, image_id = str(batch["path"][row]), str(batch["image_id"][row])
    ref = SampleRef(image_id=image_id, kind=str(batch["kind"][row]), source=str(batch["source"][row]), image_path=path)
    # the TIFF is read again for its metadata only where the size is used
    size = pixel_size_of(ref, writing.pixel_size) if writing.measure or "ome-tiff" in writing.exports else (None, "")
    image = None
    if segment is not None:  # a Labeller's, of the image as read
        labels, image = segment(row), batch["image"][row]
    else:
        if settings.outline_refiner:
            image = load_sample(ref, with_masks=False, max_pixels=writing.max_pixels, channel=writing.channel).image
        zoom = float(batch["zoom"][row]) if "zoom" in batch else 1.0
        labels = labels_at_zoom(batch["probabilities"][row], batch["height"][row], batch["width"][row], zoom, image,
                                settings.for_kind(kind))
    rows, measuring = None, (writing.measure or "geojson" in writing.exports) and labels.max()
    if image_id in writing.overlay_ids or measuring:
        if image is None:
            image = load_sample(ref, with_masks=False, max_pixels=writing.max_pixels, channel=writing.channel).image
        if image_id in writing.overlay_ids:
            fileio.write_bytes_atomic(output_paths(output, path)[1], encode_png(overlay(image, labels)))
        if measuring:
            rows = measure_nuclei(labels, image, image_id, size[0])
    write_exports(output, path, labels, writing.exports, rows, size[0])
    label_file = relative_label_path(output, write_labels(output, path, labels))
    return (image_summary(labels), label_file, size, rows if writing.measure else None,
            "\n".join(encoder(labels)) if encoder else "")


def finish_batch(batch: dict, output: str, settings: PostSettings, writing: Writing, encoder=None,
                 segment=None) -> dict:
    """Ray Data UDF: each image of a batch finished in turn (finish_image; `segment`: row -> its labels, else the
    batch's probabilities), its failure its manifest line; the batch's nuclei written as one measurement part (after
    the label files: an image whose labels exist but whose rows do not is redone by the next run). Returns the
    manifest fields (+ RLE rows)."""
    count = len(batch["image_id"])
    summaries, status, errors, rles, label_files, measured, sizes = [], [], [], [], [], [], []
    for row in range(count):
        error = str(batch["error"][row] or "")
        finished = (image_summary(np.zeros((1, 1), np.int32)), "", (None, ""), None, "")
        if batch["ok"][row]:
            try:
                finished = finish_image(batch, row, output, settings, writing, encoder, segment)
            except Exception as failure:  # noqa: BLE001 - reported in the manifest, the run goes on
                error = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
        summary, label_file, size, rows, encoded = finished
        if rows is not None:
            measured.append(rows)
        status.append("error" if error else "done")
        errors.append(error)
        rles.append(encoded)
        summaries.append(summary)
        label_files.append(label_file)
        sizes.append(size)
    if measured:
        write_measurement_part(output, measured)
    return {"image_id": np.asarray(batch["image_id"]), "path": np.asarray(batch["path"]),
            "height": np.asarray(batch["height"]), "width": np.asarray(batch["width"]),
            **{name: np.asarray([summary[name] for summary in summaries]) for name in summaries[0]},
            "labels": np.asarray(label_files, dtype=object),
            "pixel_size_um": np.asarray([np.nan if um is None else um for um, _ in sizes], np.float64),
            "pixel_size_source": np.asarray([source for _, source in sizes], dtype=object),
            **{name: np.asarray(batch[name] if name in batch else [""] * count, dtype=object)
               for name in READING_COLUMNS},
            "status": np.asarray(status), "error": np.asarray(errors, dtype=object),
            "rles": np.asarray(rles, dtype=object)}


def run_segmentation(config: SegmentConfig, output: str, encoder=None) -> SegmentationResult:
    """Segment every image under config.input into `output` (labels/, overlays/, manifest.csv).

    `encoder` (labels -> strings, e.g. submission.rle.encode_labels) is applied to each image's labels where they
    are made, and its strings are returned in `rles` by image id: the Kaggle side plugs in here, so this
    package never imports it."""
    started = time.time()
    parse_exports(config.export)  # a bad --export stops here, before any work
    model_path = os.path.abspath(resolve_model(config.model))
    info = inspect_model(model_path)  # fail fast, on the driver, with a clear message for a bad model file
    fileio.remove_partials(output, older_than=started)  # half-written files of an earlier run that was killed
    _check_made_with(output, config, model_path, info)
    listing = list_images(config.input)
    result = SegmentationResult()
    todo = _still_to_do(listing, config, output, encoder, result)
    large = _large_images(todo, config.block_size) if info.mode == "native" else {}  # resize-mode: whole
    todo = [ref for ref in todo if ref.image_id not in large]
    if large:
        _segment_large_images(large.values(), config, model_path, info, output, encoder, result)
    if todo:
        _segment_images(todo, config, model_path, info, output, encoder, result)
    write_manifest(output_file(output, "manifest.csv"), result.rows)
    guessed = [row for row in result.rows if "--nuclear-channel picks another" in str(row.get("channel", ""))]
    if guessed:
        print(f"{len(guessed)} multi-channel files name no nuclear stain, e.g. {guessed[0]['path']}: "
              f"{guessed[0]['channel']} (manifest.csv's channel column says which each used)", flush=True)
    if config.report:  # pictures of images that fit in memory only
        pictured = [ref for ref in listing.refs if ref.image_id not in large]
        write_report(output, result.rows, pictured, config.max_pixels, title=f"{config.input} -> {output}",
                     channel=config.nuclear_channel)
    result.seconds = time.time() - started
    return result


MADE_WITH = "made_with.json"  # in the output folder: the model files and settings its labels were made with
# the options that change the labels (the others change how fast, or what else is written)
LABEL_OPTIONS = ("min_size", "threshold", "seed_threshold", "tta", "scales", "nucleus_area", "diameter",
                 "instance_filter", "split_clumps", "refine_outlines", "tile", "overlap", "block_size",
                 "nuclear_channel", "pixel_size")


def _made_with(config: SegmentConfig, model_path: str, info: RunInfo) -> dict:
    """What an output folder's labels depend on: the sha256 of the model, its run.json and its specialists (those
    run.json records, checked when the model was inspected, are taken from it), and the options that change labels."""
    files = {"model": model_path, "run.json": info_path(model_path), **specialist_files(model_path, info)}
    return {"files": {name: info.sha256.get(os.path.basename(path)) or sha256_of(path)
                      for name, path in files.items() if os.path.isfile(path)},
            "options": {name: getattr(config, name) for name in LABEL_OPTIONS}}


def _check_made_with(output: str, config: SegmentConfig, model_path: str, info: RunInfo) -> None:
    """A rerun into a folder resumes only with the model and options its labels were made with (else one error,
    nothing overwritten): finished images are skipped, so labels of two models must not mix. --redo remakes them."""
    record, wanted = output_file(output, MADE_WITH), _made_with(config, model_path, info)
    if not config.redo and fileio.exists(record):
        earlier = json.loads(fileio.read_bytes(record))
        before, now = ({**made.get("files", {}), **made.get("options", {})} for made in (earlier, wanted))
        changed = sorted(name for name in {*before, *now} if before.get(name) != now.get(name))
        if changed:
            raise ValueError(f"{output} holds labels made with another model or options ({', '.join(changed)}): "
                             f"give --redo to make them again, or another --output")
    fileio.write_text_atomic(record, json.dumps(wanted, indent=1, sort_keys=True))


def _still_to_do(listing, config: SegmentConfig, output: str, encoder, result: SegmentationResult) -> list[SampleRef]:
    """The listed images an earlier run has not finished; rows for the finished ones and the left-out files."""
    for path, reason in listing.problems:
        result.rows.append({"image_id": "", "path": path, "height": 0, "width": 0, "nuclei": 0,
                            "status": "skipped", "error": reason})
    todo = []
    if config.redo and config.measurements:
        clear_measurements(output)
    measured = measured_image_ids(output) if config.measurements and not config.redo else set()
    for ref in listing.refs:
        label_path = None if config.redo else find_labels(output, ref.image_path)
        if label_path:
            row, rles = _existing_row(ref, output, label_path, encoder)
            # labels written but the block's measurement part not (a crash between the two): redo the image
            if not config.measurements or row["nuclei"] == 0 or ref.image_id in measured:
                result.rows.append(row)
                result.rles[ref.image_id] = rles
                continue
        todo.append(ref)
    print(f"{len(listing.refs)} images in {config.input}: {len(todo)} to segment, "
          f"{len(listing.refs) - len(todo)} already done, {len(listing.problems)} other files left out", flush=True)
    return todo


READING_CPUS = 1.0  # what Ray Data's read-and-decode tasks reserve (its default): a plan leaves them that much
REPLICA_MEMORY = 3 * 2 ** 30  # memory per replica started by default (600 shared images: peaks of 1.4-1.6 GiB)
# Images per replica started by default: a replica's start (TensorFlow and the model, ~6 CPU-seconds; less with ONNX
# Runtime) pays for itself from about 35 DSB2018-sized images (0.17 s each on one thread), so a small folder gets fewer
# replicas.
IMAGES_PER_REPLICA = 32


@dataclass(frozen=True)
class Replicas:
    """A folder run's model replicas: how many, the CPUs each reserves, whether each holds a GPU."""

    count: int
    cpus: float
    gpu: bool

    @property
    def threads(self) -> int:
        """TensorFlow's threads in each replica (threads_for its CPUs)."""
        return threads_for(self.cpus)


def plan_replicas(config: SegmentConfig, cpus: float, gpus: float, memory: float, images: int) -> Replicas:
    """--concurrency, --cpus-per-actor and --gpu against the cluster's CPUs, GPUs and memory (bytes) and the number of
    images. By default one replica per GPU; without GPUs, replicas of one thread that reserve half the CPUs, the other
    half left for reading and writing (on two cores two replicas overlap one's forward pass with the other's
    post-processing); never more than one per IMAGES_PER_REPLICA images. A plan that leaves reading no whole CPU is
    refused: Ray Data's read tasks would never start."""
    enough = max(1, math.ceil(images / IMAGES_PER_REPLICA))
    if config.gpu == "yes" or (config.gpu == "auto" and gpus >= max(1, config.concurrency)):
        plan = Replicas(config.concurrency or max(1, min(int(gpus), enough)), config.cpus_per_actor or 1.0, True)
    else:
        each = config.cpus_per_actor or min(0.5, max(0.0, cpus - READING_CPUS))  # one CPU: the replica reserves none
        fit = int(memory // REPLICA_MEMORY) if memory else 1
        plan = Replicas(config.concurrency or max(1, min(int(cpus / (2 * each)) if each else 1, fit, enough)), each,
                        False)
    if plan.count * plan.cpus > cpus - READING_CPUS + 1e-9:
        raise ValueError(f"--concurrency {plan.count} x --cpus-per-actor {plan.cpus:g} reserve {plan.count * plan.cpus:g} "
                         f"of the cluster's {cpus:g} CPUs, and reading the images needs {READING_CPUS:g} of its own "
                         f"(else the run waits for ever): give fewer replicas or a smaller --cpus-per-actor")
    return plan


def _segment_images(todo: list[SampleRef], config: SegmentConfig, model_path: str, info: RunInfo, output: str,
                    encoder, result: SegmentationResult) -> None:
    """Images that fit in memory, streamed through Ray Data: reading, a pool of model replicas (plan_replicas) that
    segment and write (Labeller), or predict for output tasks (Predictor, finish_batch)."""
    import ray  # here, not at the top: a Segmenter in a plain process never starts Ray

    ensure_ray()
    resources = ray.cluster_resources()
    replicas = plan_replicas(config, resources.get("CPU", 1), resources.get("GPU", 0), resources.get("memory", 0),
                             len(todo))
    wanted = len(todo) if config.overlays < 0 else config.overlays
    overlay_ids = frozenset(ref.image_id for ref in sorted(todo, key=lambda r: r.image_id)[:wanted])
    post = postprocess_settings(config, info)
    dataset = inference_dataset(todo, info.image_size or config.image_size, config.max_pixels, config.blocks,
                                mode=info.mode, appearance=info.appearance,
                                kinds=needs_image_kind(post, model_path, info), channel=config.nuclear_channel)
    # A native-mode model predicts each image alone whatever the batch: small batches only send the first on sooner.
    batch_size = min(config.batch_size, NATIVE_BATCH) if info.mode == "native" else config.batch_size
    finishing = {"output": output if fileio.is_uri(output) else os.path.abspath(output),
                 "writing": Writing(overlay_ids=overlay_ids, exports=parse_exports(config.export),
                                    pixel_size=config.pixel_size, channel=config.nuclear_channel,
                                    max_pixels=config.max_pixels, measure=config.measurements),
                 "encoder": encoder}
    pool = {"batch_size": batch_size, "batch_format": "numpy", "num_cpus": replicas.cpus,
            "compute": ray.data.ActorPoolStrategy(size=replicas.count, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT)}
    if info.mode == "native" and not replicas.gpu:  # a CPU replica finishes its own images: only manifest rows leave it
        dataset = dataset.map_batches(Labeller, fn_constructor_kwargs={"model_path": model_path, "config": config,
                                                                        "threads": replicas.threads, **finishing},
                                      **pool)
    else:  # a GPU replica (or a resize-mode batch) sends probabilities on: post-processing off its critical path
        dataset = dataset.map_batches(
            Predictor, num_gpus=1 if replicas.gpu else 0, **pool,
            fn_constructor_kwargs={"model_path": model_path, "batch_size": config.batch_size,
                                   "threads": replicas.threads, **prediction_settings(config, info),
                                   "tile": config.tile or info.effective_tile, "overlap": config.overlap,
                                   "use_gpu": replicas.gpu})
        dataset = dataset.map_batches(finish_batch, batch_size=min(batch_size, FINISH_BATCH), batch_format="numpy",
                                      fn_kwargs={"settings": post, **finishing})
    for row in dataset.iter_rows():
        rles = str(row.pop("rles") or "")
        result.rows.append({key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()})
        result.rles[str(row["image_id"])] = rles.split("\n") if rles else []


def _large_images(refs: list[SampleRef], block_size: int) -> dict[str, SampleRef]:
    """The refs segmented block by block (pipeline.io.blocks.is_large, from their headers), by image id."""
    if block_size <= 0:
        return {}
    shapes = {ref.image_id: image_shape(ref) for ref in refs}
    return {ref.image_id: ref for ref in refs if shapes[ref.image_id] and is_large(*shapes[ref.image_id], block_size)}


def _segment_large_images(refs, config: SegmentConfig, model_path: str, info: RunInfo, output: str, encoder,
                          result: SegmentationResult) -> None:
    """Each large image in turn, its blocks spread over the cluster (pipeline.segment.blockwise); a failure is its row."""
    ensure_ray()
    target = output if fileio.is_uri(output) else os.path.abspath(output)
    for ref in refs:
        try:
            row, measured, rles = segment_large_image(ref, config, model_path, info, target, config.measurements,
                                                      parse_exports(config.export), encoder)
        except Exception as failure:  # noqa: BLE001 - reported in the manifest, the run goes on
            message = str(failure).splitlines()[0] if str(failure) else ""
            row, measured, rles = ({"image_id": ref.image_id, "path": ref.image_path, "height": 0, "width": 0,
                                    "nuclei": 0, "status": "error", "error": f"{type(failure).__name__}: {message}"},
                                   None, [])
        if measured is not None and len(measured["label"]):
            write_measurement_part(target, [measured])
        result.rows.append(row)
        result.rles[ref.image_id] = rles
