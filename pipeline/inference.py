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

from pipeline import fileio
from pipeline.config import SegmentConfig
from pipeline.sources import SampleRef, list_images
from submission.instances import DEFAULT_MIN_SIZE, DEFAULT_THRESHOLD

DEFAULT_TILE = 1024  # pixels: whole-image prediction of native-mode models is tiled above this
MANIFEST_COLUMNS = ("image_id", "path", "height", "width", "nuclei", "status", "error")


def output_paths(output: str, image_path: str) -> tuple[str, str]:
    """(label PNG, overlay PNG) locations for an input's relative path; never outside `output`."""
    stem = posixpath.splitext(fileio.check_relative(image_path))[0] + ".png"
    return fileio.safe_join(output, "labels/" + stem), fileio.safe_join(output, "overlays/" + stem)


class Predictor:
    """Ray Data actor: holds one model replica and turns image batches into class probabilities.

    Resize-mode models get fixed-size batches; native-mode models get each image whole (padded to a
    multiple of 32, tiled when larger than `tile`). `tta` averages over flips in both modes.
    """

    def __init__(self, model_path: str, batch_size: int, threads: int, tta: bool = False, tile: int = DEFAULT_TILE,
                 overlap: int = 64):
        from pipeline.tfkeras import tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already running in this process (a plain loop): keep its threads
            pass
        from pipeline.model import load_model

        self.model, self.info = load_model(model_path)
        self.batch_size, self.tta, self.tile, self.overlap = batch_size, tta, tile, overlap
        self.native = self.info.get("mode") == "native"
        self.forward = tf.function(lambda x: tf.nn.softmax(self.model(x, training=False), axis=-1),
                                   reduce_retracing=True)

    def _forward(self, images: np.ndarray) -> np.ndarray:
        return self.forward(images).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities; batches are padded to a fixed size so results never depend on batching."""
        from pipeline.augment import flip_average

        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), np.float32)
            padded[:len(chunk)] = chunk
            probabilities = flip_average(padded, self._forward) if self.tta else self._forward(padded)
            outputs.append(probabilities[:len(chunk)])
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    def predict_whole(self, image: np.ndarray) -> np.ndarray:
        """Probabilities of one image at its own size (native-mode models)."""
        from pipeline.augment import predict_full_image

        return predict_full_image(np.asarray(image, np.float32), self._forward, self.tile, self.overlap, self.tta)

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray(batch["ok"], bool)
        result = {key: value for key, value in batch.items() if key != "image"}
        classes = self.model.output_shape[-1]
        if self.native:
            probabilities = np.empty(len(ok), dtype=object)
            for row in range(len(ok)):
                probabilities[row] = (self.predict_whole(batch["image"][row]).astype(np.float16) if ok[row]
                                      else np.zeros((1, 1, classes), np.float16))
        else:
            probabilities = np.zeros((len(ok), *batch["image"].shape[1:3], classes), np.float16)
            if ok.any():
                probabilities[ok] = self.predict(np.asarray(batch["image"])[ok]).astype(np.float16)
        result["probabilities"] = probabilities
        return result


def labels_at_original_size(probabilities: np.ndarray, height: int, width: int, threshold: float,
                            min_size: int, seed_threshold: float | None = None) -> np.ndarray:
    """Upsample model-size probabilities to the image's own size, then split them into nuclei."""
    import cv2

    from submission.instances import instances_from_probabilities

    upsampled = probabilities.astype(np.float32)
    if upsampled.shape[:2] != (int(height), int(width)):
        upsampled = cv2.resize(upsampled, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
    if upsampled.ndim == 2:
        upsampled = upsampled[..., None]
    return instances_from_probabilities(upsampled, threshold=threshold, min_size=min_size,
                                        seed_threshold=seed_threshold)


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image with each nucleus outlined, for a person to look at."""
    from skimage.segmentation import find_boundaries

    picture = image.copy()
    picture[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    return picture


def postprocess(batch: dict, output: str, threshold: float, min_size: int, overlay_ids: frozenset,
                max_pixels: int, encode: bool, seed_threshold: float | None = None) -> dict:
    """Ray Data UDF: labels at original size, written atomically; returns manifest fields (+ RLE rows)."""
    from pipeline.images import encode_png
    from pipeline.sources import load_sample
    from submission.rle import encode_labels

    count = len(batch["image_id"])
    nuclei, status, errors, rles = np.zeros(count, np.int64), [], [], []
    for row in range(count):
        error = str(batch["error"][row] or "")
        encoded = ""
        if batch["ok"][row]:
            try:
                labels = labels_at_original_size(batch["probabilities"][row], batch["height"][row],
                                                 batch["width"][row], threshold, min_size, seed_threshold)
                label_path, overlay_path = output_paths(output, str(batch["path"][row]))
                fileio.write_bytes_atomic(label_path, encode_png(labels.astype(np.uint16)))
                if str(batch["image_id"][row]) in overlay_ids:
                    ref = SampleRef(image_id=str(batch["image_id"][row]), kind=str(batch["kind"][row]),
                                    source=str(batch["source"][row]), image_path=str(batch["path"][row]))
                    image = load_sample(ref, with_masks=False, max_pixels=max_pixels).image
                    fileio.write_bytes_atomic(overlay_path, encode_png(overlay(image, labels)))
                nuclei[row] = int(labels.max())
                encoded = "\n".join(encode_labels(labels)) if encode else ""
            except Exception as failure:  # noqa: BLE001 - reported in the manifest, the run goes on
                error = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
        status.append("error" if error else "done")
        errors.append(error)
        rles.append(encoded)
    return {"image_id": np.asarray(batch["image_id"]), "path": np.asarray(batch["path"]),
            "height": np.asarray(batch["height"]), "width": np.asarray(batch["width"]), "nuclei": nuclei,
            "status": np.asarray(status), "error": np.asarray(errors, dtype=object),
            "rles": np.asarray(rles, dtype=object)}


def postprocess_settings(config: SegmentConfig, info: dict) -> dict:
    """threshold, seed_threshold and min_size: the flags when given, else the model's run.json, else defaults."""
    saved = info.get("postprocess") or {}
    return {"threshold": config.threshold or float(saved.get("threshold", DEFAULT_THRESHOLD)),
            "seed_threshold": config.seed_threshold or float(saved.get("seed_threshold", DEFAULT_THRESHOLD)),
            "min_size": config.min_size or int(saved.get("min_size", DEFAULT_MIN_SIZE))}


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


def _existing_row(ref: SampleRef, label_path: str, encode: bool) -> tuple[dict, list[str]]:
    """Manifest row (and RLEs) of an image finished by an earlier run, read back from its label PNG."""
    import cv2

    from submission.rle import encode_labels

    labels = cv2.imdecode(np.frombuffer(fileio.read_bytes(label_path), np.uint8), cv2.IMREAD_UNCHANGED)
    row = {"image_id": ref.image_id, "path": ref.image_path, "height": labels.shape[0], "width": labels.shape[1],
           "nuclei": int(labels.max()), "status": "existing", "error": ""}
    return row, (encode_labels(labels) if encode else [])


def write_manifest(location: str, rows: list[dict]) -> None:
    """The manifest CSV: one line per input file with its outcome, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: (str(row["path"]), str(row["image_id"]))))
    fileio.write_text_atomic(location, buffer.getvalue())


def run_segmentation(config: SegmentConfig, output: str, encode: bool = False) -> SegmentationResult:
    """Segment every image under config.input into `output` (labels/, overlays/, manifest.csv)."""
    import ray

    from pipeline.data import ensure_ray, inference_dataset
    from pipeline.model import load_model

    started = time.time()
    _, info = load_model(config.model)  # fail fast, on the driver, with a clear message for a bad model file
    image_size = int(info.get("image_size", config.image_size))
    listing = list_images(config.input)
    result = SegmentationResult()
    for path, reason in listing.problems:
        result.rows.append({"image_id": "", "path": path, "height": 0, "width": 0, "nuclei": 0,
                            "status": "skipped", "error": reason})
    todo = []
    for ref in listing.refs:
        label_path, _ = output_paths(output, ref.image_path)
        if not config.redo and fileio.exists(label_path):
            row, rles = _existing_row(ref, label_path, encode)
            result.rows.append(row)
            result.rles[ref.image_id] = rles
        else:
            todo.append(ref)
    print(f"{len(listing.refs)} images in {config.input}: {len(todo)} to segment, "
          f"{len(listing.refs) - len(todo)} already done, {len(listing.problems)} other files left out", flush=True)
    if todo:
        ensure_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = config.gpu == "yes" or (config.gpu == "auto" and gpus >= config.concurrency)
        wanted = len(todo) if config.overlays < 0 else config.overlays
        overlay_ids = frozenset(ref.image_id for ref in sorted(todo, key=lambda r: r.image_id)[:wanted])
        dataset = inference_dataset(todo, image_size, config.max_pixels, config.blocks,
                                    mode=info.get("mode", "resize"), appearance=info.get("appearance", "rgb"))
        dataset = dataset.map_batches(
            Predictor, batch_size=config.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"model_path": os.path.abspath(config.model), "batch_size": config.batch_size,
                                   "threads": max(1, math.ceil(config.cpus_per_actor * 2)), "tta": config.tta,
                                   "tile": config.tile or int(info.get("tile") or DEFAULT_TILE), "overlap": config.overlap},
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_cpus=config.cpus_per_actor, num_gpus=1 if use_gpu else 0)
        dataset = dataset.map_batches(
            postprocess, batch_size=8, batch_format="numpy",
            fn_kwargs={"output": output if fileio.is_uri(output) else os.path.abspath(output),
                       **postprocess_settings(config, info), "overlay_ids": overlay_ids,
                       "max_pixels": config.max_pixels, "encode": encode})
        for row in dataset.iter_rows():
            rles = str(row.pop("rles") or "")
            result.rows.append({key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()})
            result.rles[str(row["image_id"])] = rles.split("\n") if rles else []
    write_manifest(fileio.safe_join(output, "manifest.csv") if not fileio.is_uri(output)
                   else output.rstrip("/") + "/manifest.csv", result.rows)
    result.seconds = time.time() - started
    return result
