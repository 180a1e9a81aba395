"""Bulk segmentation with Ray Data: stream images through a pool of model replicas to instance labels.

read -> decode -> resize (tasks) -> batched prediction (actor pool, model loaded once per actor) ->
upsample probabilities to each image's original size -> instances -> 16-bit label PNG (tasks).
Finished images are skipped on a rerun; every bad file becomes a manifest line, never a stop.
"""
from __future__ import annotations

import csv
import io
import math
import os
import posixpath
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from pipeline import fileio
from pipeline.config import SegmentConfig
from pipeline.images import READING_COLUMNS
from pipeline.labelfiles import LABEL_SUFFIXES, decode_labels_file, encode_labels_file
from pipeline.sources import SampleRef, list_images
from pipeline.instances import DEFAULT_CLUMP_SPLIT
from pipeline.runinfo import DEFAULT_TILE, RunInfo
MANIFEST_COLUMNS = ("image_id", "path", "height", "width", "nuclei", "mean_area", "covered_fraction", "labels",
                    "pixel_size_um", "pixel_size_source", *READING_COLUMNS, "status", "error")
MEASUREMENTS = "measurements"  # OUTPUT/measurements/: the per-nucleus Parquet dataset, one part per block


def output_paths(output: str, image_path: str) -> tuple[str, str]:
    """(label PNG, overlay PNG) locations for an input's relative path; never outside `output`.

    A label image with more than 65,535 nuclei is written beside the PNG's place as `.tif` (see find_labels).
    """
    stem = posixpath.splitext(fileio.check_relative(image_path))[0] + ".png"
    return fileio.safe_join(output, "labels/" + stem), fileio.safe_join(output, "overlays/" + stem)


def _label_candidates(output: str, image_path: str) -> dict[str, str]:
    """{suffix: location} of the label file an input may have (see labelfiles.LABEL_SUFFIXES)."""
    stem = output_paths(output, image_path)[0][:-len(".png")]
    return {suffix: stem + suffix for suffix in LABEL_SUFFIXES}


def write_exports(output: str, image_path: str, labels: np.ndarray, exports: tuple[str, ...],
                  measurements: dict | None = None, pixel_size_um: float | None = None) -> None:
    """The --export files of one input beside its label image (labels/<input path>.geojson, .rois.zip, .ome.tif)."""
    from pipeline.exports import SUFFIXES, export_bytes

    stem = output_paths(output, image_path)[0][:-len(".png")]
    for name in exports:
        fileio.write_bytes_atomic(stem + SUFFIXES[name], export_bytes(name, labels, measurements, pixel_size_um))


def pixel_size_of(ref: SampleRef, given: float = 0.0) -> tuple[float | None, str]:
    """(micrometres per pixel, its source) for an input: --pixel-size when given, else a TIFF's or OME-Zarr's own
    metadata."""
    from pipeline.blocks import is_zarr, local_window_path
    from pipeline.sources import read_file
    from pipeline.units import TIFF_SUFFIXES, pixel_size_from_tiff, pixel_size_from_zarr

    if given > 0:
        return float(given), "--pixel-size"
    local = local_window_path(ref)
    if is_zarr(ref.image_path):
        return pixel_size_from_zarr(local) if local else (None, "")
    if ref.image_path.lower().endswith(TIFF_SUFFIXES):
        return pixel_size_from_tiff(local or read_file(ref, ref.image_path))  # a path: metadata only
    return None, ""


def find_labels(output: str, image_path: str) -> str | None:
    """The label file an earlier run wrote for an input (16-bit PNG, or 32-bit TIFF past 65,535 nuclei), or None."""
    return next((location for location in _label_candidates(output, image_path).values() if fileio.exists(location)),
                None)


def read_labels(location: str) -> np.ndarray:
    """A label image written by segmentation (PNG or TIFF)."""
    return decode_labels_file(fileio.read_bytes(location))


def write_labels(output: str, image_path: str, labels: np.ndarray) -> str:
    """Write an input's label image (PNG, or TIFF past 65,535 nuclei) atomically; returns its path under output."""
    data, suffix = encode_labels_file(labels)
    candidates = _label_candidates(output, image_path)
    fileio.write_bytes_atomic(candidates[suffix], data)
    for other, stale in candidates.items():  # a redo that changed format leaves no stale file for readers to find
        if other != suffix and not fileio.is_uri(stale) and os.path.exists(stale):
            os.unlink(stale)
    return candidates[suffix]


def _load_forward(model_path: str, threads: int, use_gpu: bool = False) -> tuple[RunInfo, int, object]:
    """(run.json, classes, images -> softmax probabilities) of a Keras or ONNX model file."""
    if model_path.endswith(".onnx"):  # ONNX Runtime: no TensorFlow in this process
        from pipeline.onnx_model import OnnxModel

        model = OnnxModel(model_path, threads=max(1, threads), use_gpu=use_gpu)
        return model.info, model.classes, model.probabilities
    from pipeline.tfkeras import tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already running in this process (a plain loop): keep its threads
        pass
    from pipeline.model import load_model

    keras_model, info = load_model(model_path)
    softmax = tf.function(lambda x: tf.nn.softmax(keras_model(x, training=False), axis=-1), reduce_retracing=True)
    return info, int(keras_model.output_shape[-1]), lambda images: softmax(images).numpy()


class Predictor:
    """Ray Data actor: holds one model replica and turns image batches into class probabilities.

    Resize-mode models get fixed-size batches; native-mode models get each image whole (padded to a
    multiple of 32, tiled when larger than `tile`). `tta` averages over flips in both modes; `scales`
    (native-mode models) averages over the image resized by each factor, and `size_normalisation` first
    zooms each image so its median nucleus has about the model's `nucleus_area` pixels.
    """

    def __init__(self, model_path: str, batch_size: int, threads: int, tta: bool = False, tile: int = DEFAULT_TILE,
                 overlap: int = 64, use_gpu: bool = False, scales: tuple[float, ...] = (1.0,),
                 size_normalisation: dict | None = None, specialists: dict | None = None):
        from pipeline.registry import specialist_files

        self.batch_size, self.tta, self.tile, self.overlap, self.scales = batch_size, tta, tile, overlap, tuple(scales)
        self.size_normalisation = size_normalisation
        self.info, self.classes, self.forward = _load_forward(model_path, threads, use_gpu)
        self.native = self.info.mode == "native"
        # Kinds of image routed to a model fine-tuned for them: run.json's, or those given (jobs/tune.py trying one).
        files = specialist_files(model_path, self.info) if specialists is None else specialists
        self.forwards = {kind: _load_forward(path, threads, use_gpu)[2] for kind, path in files.items()}

    def forward_for(self, kind: str = ""):
        """The model function for an image of `kind`: its specialist's, else the model's own."""
        return self.forwards.get(kind, self.forward)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities; batches are padded to a fixed size so results never depend on batching."""
        from pipeline.augment import flip_average

        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), np.float32)
            padded[:len(chunk)] = chunk
            probabilities = flip_average(padded, self.forward) if self.tta else self.forward(padded)
            outputs.append(probabilities[:len(chunk)])
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    def predict_whole(self, image: np.ndarray, kind: str = "", keep_zoom: bool = False):
        """Probabilities of one image at its own size (native-mode models), by its kind's specialist if it has one;
        `keep_zoom`: (probabilities at the size normalisation's zoom, the zoom), for labels_at_zoom."""
        from pipeline.augment import predict_scales

        return predict_scales(np.asarray(image, np.float32), self.forward_for(kind), self.scales, self.tile,
                              self.overlap, self.tta, self.size_normalisation, keep_zoom=keep_zoom)

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray(batch["ok"], bool)
        result = {key: value for key, value in batch.items() if key != "image"}
        classes = self.classes
        if self.native:
            probabilities = np.empty(len(ok), dtype=object)
            zooms = np.ones(len(ok), np.float64)
            kinds = batch["image_kind"] if "image_kind" in batch else [""] * len(ok)
            for row in range(len(ok)):
                if ok[row]:
                    found, zooms[row] = self.predict_whole(batch["image"][row], str(kinds[row]), keep_zoom=True)
                    probabilities[row] = found.astype(np.float16)
                else:
                    probabilities[row] = np.zeros((1, 1, classes), np.float16)
            result["zoom"] = zooms
        else:
            probabilities = np.zeros((len(ok), *batch["image"].shape[1:3], classes), np.float16)
            if ok.any():
                probabilities[ok] = self.predict(np.asarray(batch["image"])[ok]).astype(np.float16)
        result["probabilities"] = probabilities
        return result


def labels_at_zoom(probabilities: np.ndarray, height: int, width: int, zoom: float, image: np.ndarray | None,
                   **settings) -> np.ndarray:
    """Labels of an image whose probabilities were predicted at `zoom` (size normalisation): nuclei made at that
    size, where they have the sizes the post-processing was tuned on, then brought to the image's own size."""
    import cv2
    from skimage.segmentation import relabel_sequential

    if zoom == 1.0:
        return labels_at_original_size(probabilities, height, width, image=image, **settings)
    zoomed_h, zoomed_w = probabilities.shape[:2]
    if image is not None:
        image = cv2.resize(image, (zoomed_w, zoomed_h), interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR)
    labels = labels_at_original_size(probabilities, zoomed_h, zoomed_w, image=image, **settings)
    labels = cv2.resize(labels.astype(np.int32), (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
    return relabel_sequential(labels)[0]


def labels_at_original_size(probabilities: np.ndarray, height: int, width: int, threshold: float,
                            min_size: int, seed_threshold: float | None = None,
                            instance_filter: dict | None = None, outline_refiner: dict | None = None,
                            image: np.ndarray | None = None, clump_split: dict | None = None) -> np.ndarray:
    """Upsample model-size probabilities to the image's own size, split them into nuclei (cutting merged clumps
    when `clump_split` is given), drop rejected ones, and re-decide their outlines from the probabilities and the
    original `image` (when a refiner is given)."""
    import cv2

    from pipeline.instance_filter import apply_filter
    from pipeline.instances import CLUMP_SPLIT_KEYS, instances_from_probabilities, split_clumps
    from pipeline.outlines import refine_outlines

    upsampled = probabilities.astype(np.float32)
    if upsampled.shape[:2] != (int(height), int(width)):
        upsampled = cv2.resize(upsampled, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
    if upsampled.ndim == 2:
        upsampled = upsampled[..., None]
    labels = instances_from_probabilities(upsampled, threshold=threshold, min_size=min_size,
                                          seed_threshold=seed_threshold)
    if clump_split and upsampled.shape[-1] == 3:
        labels = split_clumps(labels, upsampled[..., 2], **{key: clump_split[key] for key in CLUMP_SPLIT_KEYS})
    labels = apply_filter(labels, upsampled, instance_filter)
    if outline_refiner and image is not None:
        labels = refine_outlines(labels, upsampled, image, outline_refiner)
    return labels


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image with each nucleus outlined, for a person to look at."""
    from skimage.segmentation import find_boundaries

    picture = image.copy()
    picture[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    return picture


def _relative_label_path(output: str, location: str) -> str:
    return posixpath.relpath(location, output) if fileio.is_uri(output) else os.path.relpath(location, output)


def write_measurement_part(output: str, columns: list[dict]) -> None:
    """One Parquet part of OUTPUT/measurements/ holding the nuclei of a block of images (named by their ids)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.measure import COLUMNS

    table = pa.table({name: np.concatenate([part[name] for part in columns]) for name in COLUMNS})
    ids = sorted(set(str(part["image_id"][0]) for part in columns if len(part["image_id"])))
    name = "part-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20] + ".parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    fileio.write_bytes_atomic(_output_file(output, f"{MEASUREMENTS}/{name}"), sink.getvalue().to_pybytes())


def settings_for_kind(threshold: float, seed_threshold: float | None, min_size: int, by_kind: dict | None,
                      kind: str) -> tuple[float, float | None, int]:
    """(threshold, seed_threshold, min_size) for an image of `kind`: its own tuned values if any, else the global."""
    own = (by_kind or {}).get(kind) or {}
    return (float(own.get("threshold", threshold)), own.get("seed_threshold", seed_threshold),
            int(own.get("min_size", min_size)))


def postprocess(batch: dict, output: str, threshold: float, min_size: int, overlay_ids: frozenset,
                max_pixels: int, encoder=None, seed_threshold: float | None = None, measure: bool = False,
                instance_filter: dict | None = None, by_kind: dict | None = None,
                outline_refiner: dict | None = None, clump_split: dict | None = None,
                exports: tuple[str, ...] = (), pixel_size: float = 0.0, channel: str = "") -> dict:
    """Ray Data UDF: labels at original size, written atomically; returns manifest fields (+ RLE rows).

    `by_kind` (from jobs/tune.py) gives stained or bright-field images their own thresholds and minimum size.

    With `measure`, the block's nuclei are measured on the original images and written as one Parquet part
    (after the label files: an image whose labels exist but whose rows do not is redone by the next run).
    `exports` (pipeline.exports.EXPORTS) are written beside each label image, before it. `pixel_size` (micrometres,
    0: each TIFF's own) gives the measurements' micron columns and the OME-TIFF its physical size. `channel`:
    --nuclear-channel, for the image read again here.
    """
    from pipeline.measure import image_summary, measure_nuclei
    from pipeline.images import encode_png
    from pipeline.sources import load_sample

    count = len(batch["image_id"])
    summaries, status, errors, rles, label_files, measured, sizes = [], [], [], [], [], [], []
    for row in range(count):
        error = str(batch["error"][row] or "")
        encoded, summary, label_file, size = "", image_summary(np.zeros((1, 1), np.int32)), "", (None, "")
        if batch["ok"][row]:
            try:
                kind = str(batch["image_kind"][row]) if "image_kind" in batch else ""
                own_threshold, own_seed, own_min_size = settings_for_kind(threshold, seed_threshold, min_size,
                                                                          by_kind, kind)
                path, image_id = str(batch["path"][row]), str(batch["image_id"][row])
                ref = SampleRef(image_id=image_id, kind=str(batch["kind"][row]), source=str(batch["source"][row]),
                                image_path=path)
                image = load_sample(ref, with_masks=False, max_pixels=max_pixels,
                                    channel=channel).image if outline_refiner else None
                # the TIFF is read again for its metadata only where the size is used
                size = pixel_size_of(ref, pixel_size) if measure or "ome-tiff" in exports else (None, "")
                zoom = float(batch["zoom"][row]) if "zoom" in batch else 1.0
                labels = labels_at_zoom(batch["probabilities"][row], batch["height"][row], batch["width"][row], zoom,
                                        image, threshold=own_threshold, min_size=own_min_size,
                                        seed_threshold=own_seed, instance_filter=instance_filter,
                                        outline_refiner=outline_refiner, clump_split=clump_split)
                rows, measuring = None, (measure or "geojson" in exports) and labels.max()
                if image_id in overlay_ids or measuring:
                    if image is None:
                        image = load_sample(ref, with_masks=False, max_pixels=max_pixels, channel=channel).image
                    if image_id in overlay_ids:
                        fileio.write_bytes_atomic(output_paths(output, path)[1], encode_png(overlay(image, labels)))
                    if measuring:
                        rows = measure_nuclei(labels, image, image_id, size[0])
                # exports first: a finished image (its label file) always has them, so a rerun may skip it
                write_exports(output, path, labels, exports, rows, size[0])
                label_file = _relative_label_path(output, write_labels(output, path, labels))
                if measure and rows is not None:
                    measured.append(rows)
                summary = image_summary(labels)
                encoded = "\n".join(encoder(labels)) if encoder else ""
            except Exception as failure:  # noqa: BLE001 - reported in the manifest, the run goes on
                error = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
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


def needs_image_kind(post: dict, model_path: str, info: RunInfo | dict) -> bool:
    """Whether inference must classify each image's kind: only for per-kind settings (postprocess_settings'
    by_kind) or a kind specialist; otherwise it is not computed."""
    from pipeline.registry import specialist_files

    return bool(post["by_kind"]) or bool(specialist_files(model_path, info))


def postprocess_settings(config: SegmentConfig, info: RunInfo | dict) -> dict:
    """threshold, seed_threshold, min_size, clump splitting, instance filter, outline refiner: the flags when given,
    else run.json (`info`, or its content as a dict), else defaults (pipeline.runinfo.Postprocess).

    The per-kind values of run.json (`by_kind`) apply only when no threshold or size flag is given.
    """
    saved = RunInfo.of(info).postprocess
    flagged = bool(config.threshold or config.seed_threshold or config.min_size)
    use_filter = saved.instance_filter is not None if config.instance_filter is None else config.instance_filter
    if use_filter and not saved.instance_filter:
        raise ValueError("--instance-filter: this model's run.json has no fitted instance filter (jobs/tune.py fits one)")
    use_refiner = saved.outline_refiner is not None if config.refine_outlines is None else config.refine_outlines
    if use_refiner and not saved.outline_refiner:
        raise ValueError("--refine-outlines: this model's run.json has no fitted outline refiner (jobs/tune.py fits one)")
    use_split = saved.clump_split is not None if config.split_clumps is None else config.split_clumps
    return {"threshold": config.threshold or saved.threshold,
            "seed_threshold": config.seed_threshold or saved.seed_threshold,
            "min_size": config.min_size or saved.min_size,
            "instance_filter": saved.instance_filter if use_filter else None,
            "outline_refiner": saved.outline_refiner if use_refiner else None,
            "clump_split": (saved.clump_split or dict(DEFAULT_CLUMP_SPLIT)) if use_split else None,
            "by_kind": {} if flagged else dict(saved.by_kind)}


def prediction_settings(config: SegmentConfig, info: RunInfo | dict) -> dict:
    """tta (flips), scales and size normalisation: the flags when given, else the model's run.json (`info`, or its
    content as a dict), else none.

    Size normalisation measures nuclei with the settings stored beside its target (run.json), else with the
    model's global post-processing settings.
    """
    info = RunInfo.of(info)
    saved = info.postprocess
    scales = tuple(float(part) for part in config.scales.split(",") if part.strip()) if config.scales else \
        tuple(saved.scales)
    if any(not 0.25 <= scale <= 4 for scale in scales):
        raise ValueError(f"--scales: each factor must be between 0.25 and 4, got {config.scales}")
    stored = dict(saved.size_normalisation or {})
    nucleus_area = float(stored.get("nucleus_area") or 0.0) if config.nucleus_area is None else config.nucleus_area
    if nucleus_area < 0:
        raise ValueError(f"--nucleus-area: pixels (0 = off), got {config.nucleus_area}")
    if nucleus_area and not info.mode == "native":
        raise ValueError("--nucleus-area: only native-mode models predict whole images at any size")
    if config.diameter and not nucleus_area:
        raise ValueError("--diameter: this model stores no nucleus size to zoom to; give --nucleus-area too")
    if config.diameter < 0:
        raise ValueError(f"--diameter: pixels (0 = measured), got {config.diameter}")
    size_normalisation = None
    if nucleus_area:  # a target given on the command line zooms every image; the stored one only out of its range
        size_normalisation = {"threshold": saved.threshold, "seed_threshold": saved.seed_threshold,
                              "min_size": saved.min_size, **stored, "nucleus_area": nucleus_area}
        if config.nucleus_area is not None:
            size_normalisation.pop("within", None)
        if config.diameter:
            size_normalisation["diameter"] = float(config.diameter)
    return {"tta": saved.tta if config.tta is None else config.tta, "scales": scales,
            "size_normalisation": size_normalisation}


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


def _existing_row(ref: SampleRef, output: str, label_path: str, encoder=None) -> tuple[dict, list[str]]:
    """Manifest row (and RLEs) of an image finished by an earlier run, read back from its label file."""
    from pipeline.measure import image_summary

    labels = read_labels(label_path)
    row = {"image_id": ref.image_id, "path": ref.image_path, "height": labels.shape[0], "width": labels.shape[1],
           **image_summary(labels), "labels": _relative_label_path(output, label_path), "status": "existing",
           "error": ""}
    return row, (encoder(labels) if encoder else [])


def _measurements_folder(output: str) -> tuple[pafs.FileSystem, str | None]:
    """(filesystem, OUTPUT/measurements path), the path None when the folder does not exist."""
    fs, path = fileio.resolve(output)
    folder = posixpath.join(path, MEASUREMENTS)
    return fs, folder if fs.get_file_info(folder).type == pafs.FileType.Directory else None


def measured_image_ids(output: str) -> set[str]:
    """Image ids that already have rows in OUTPUT/measurements/ (one column read; empty when there is none)."""
    import pyarrow.dataset as pads

    fs, folder = _measurements_folder(output)
    if folder is None:
        return set()
    table = pads.dataset(folder, filesystem=fs, format="parquet").to_table(columns=["image_id"])
    return set(table.column("image_id").unique().to_pylist())


def clear_measurements(output: str) -> None:
    """Remove OUTPUT/measurements/ (a --redo run measures every image again)."""
    fs, folder = _measurements_folder(output)
    if folder is not None:
        fs.delete_dir(folder)


def write_manifest(location: str, rows: list[dict]) -> None:
    """The manifest CSV: one line per input file with its outcome, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: (str(row["path"]), str(row["image_id"]))))
    fileio.write_text_atomic(location, buffer.getvalue())


def inspect_model(model_path: str) -> RunInfo:
    """Load a model once (Keras or ONNX) to check it; returns its run.json settings."""
    if model_path.endswith(".onnx"):
        from pipeline.onnx_model import OnnxModel

        return OnnxModel(model_path, threads=1).info
    from pipeline.model import load_model

    return load_model(model_path)[1]


def run_segmentation(config: SegmentConfig, output: str, encoder=None) -> SegmentationResult:
    """Segment every image under config.input into `output` (labels/, overlays/, manifest.csv).

    `encoder` (labels -> strings, e.g. submission.rle.encode_labels) is applied to each image's labels where they
    are made, and its strings are returned in `rles` by image id: the Kaggle side plugs in here, so this
    package never imports it."""
    import ray

    from pipeline.data import ensure_ray, inference_dataset
    from pipeline.exports import parse_exports
    from pipeline.registry import resolve_model

    started = time.time()
    parse_exports(config.export)  # a bad --export stops here, before any work
    model_path = os.path.abspath(resolve_model(config.model))
    info = inspect_model(model_path)  # fail fast, on the driver, with a clear message for a bad model file
    fileio.remove_partials(output, older_than=started)  # half-written files of an earlier run that was killed
    image_size = info.image_size or config.image_size
    listing = list_images(config.input)
    result = SegmentationResult()
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
    large = _large_images(todo, config.block_size) if info.mode == "native" else {}  # resize-mode: whole
    todo = [ref for ref in todo if ref.image_id not in large]
    if large:
        _segment_large_images(large.values(), config, model_path, info, output, encoder, result)
    if todo:
        ensure_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = config.gpu == "yes" or (config.gpu == "auto" and gpus >= config.concurrency)
        wanted = len(todo) if config.overlays < 0 else config.overlays
        overlay_ids = frozenset(ref.image_id for ref in sorted(todo, key=lambda r: r.image_id)[:wanted])
        post = postprocess_settings(config, info)
        dataset = inference_dataset(todo, image_size, config.max_pixels, config.blocks,
                                    mode=info.mode, appearance=info.appearance,
                                    kinds=needs_image_kind(post, model_path, info), channel=config.nuclear_channel)
        dataset = dataset.map_batches(
            Predictor, batch_size=config.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"model_path": model_path, "batch_size": config.batch_size,
                                   "threads": max(1, math.ceil(config.cpus_per_actor * 2)),
                                   **prediction_settings(config, info),
                                   "tile": config.tile or info.effective_tile, "overlap": config.overlap,
                                   "use_gpu": use_gpu},
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_cpus=config.cpus_per_actor, num_gpus=1 if use_gpu else 0)
        dataset = dataset.map_batches(
            postprocess, batch_size=8, batch_format="numpy",
            fn_kwargs={"output": output if fileio.is_uri(output) else os.path.abspath(output),
                       **post, "overlay_ids": overlay_ids, "exports": parse_exports(config.export),
                       "pixel_size": config.pixel_size, "channel": config.nuclear_channel,
                       "max_pixels": config.max_pixels, "encoder": encoder, "measure": config.measurements})
        for row in dataset.iter_rows():
            rles = str(row.pop("rles") or "")
            result.rows.append({key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()})
            result.rles[str(row["image_id"])] = rles.split("\n") if rles else []
    write_manifest(_output_file(output, "manifest.csv"), result.rows)
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


def _large_images(refs: list[SampleRef], block_size: int) -> dict[str, SampleRef]:
    """The refs segmented block by block (pipeline.blocks.is_large, from their headers), by image id."""
    from pipeline.blocks import image_shape, is_large

    if block_size <= 0:
        return {}
    shapes = {ref.image_id: image_shape(ref) for ref in refs}
    return {ref.image_id: ref for ref in refs if shapes[ref.image_id] and is_large(*shapes[ref.image_id], block_size)}


def _segment_large_images(refs, config: SegmentConfig, model_path: str, info: RunInfo, output: str, encoder,
                          result: SegmentationResult) -> None:
    """Each large image in turn, its blocks spread over the cluster (pipeline.blockwise); a failure is its row."""
    from pipeline.blockwise import segment_large_image
    from pipeline.data import ensure_ray
    from pipeline.exports import parse_exports

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


def _output_file(output: str, name: str) -> str:
    return fileio.safe_join(output, name) if not fileio.is_uri(output) else output.rstrip("/") + "/" + name


def measured_areas(output: str) -> np.ndarray:
    """Every measured nucleus' area from OUTPUT/measurements/ (one column), empty when nothing was measured."""
    import pyarrow.dataset as pads

    fs, folder = _measurements_folder(output)
    if folder is None:
        return np.zeros(0)
    return pads.dataset(folder, filesystem=fs, format="parquet").to_table(columns=["area"]).column("area").to_numpy()


def write_report(output: str, rows: list[dict], refs: list[SampleRef], max_pixels: int, title: str = "",
                 channel: str = "") -> None:
    """OUTPUT/report.png (pipeline.report) for a run's manifest rows; pictures of at most three images."""
    from pipeline.report import draw_report
    from pipeline.sources import load_sample

    by_path = {ref.image_path: ref for ref in refs}

    def overlay_of(row: dict) -> np.ndarray | None:
        ref, label_path = by_path.get(row["path"]), find_labels(output, str(row["path"]))
        if ref is None or label_path is None:
            return None
        return overlay(load_sample(ref, with_masks=False, max_pixels=max_pixels, channel=channel).image,
                       read_labels(label_path))

    fileio.write_bytes_atomic(_output_file(output, "report.png"),
                              draw_report(rows, measured_areas(output), overlay_of, title=title))
