"""The model's forward pass over images: a Keras or ONNX model (and its kind specialists) loaded once, resize-mode
batches or native-mode whole images (tiled, flipped, rescaled, size-normalised): images in, class probabilities out.

TensorFlow or ONNX Runtime is imported only when a model is loaded, so importing this module stays light.
"""
from __future__ import annotations

import copy
import functools
import math
import os

import numpy as np

from pipeline.data.augment import apply_appearance, flip_average, predict_scales, size_normalisation_for
from pipeline.io.images import normalise
from pipeline.model.registry import info_path, onnx_twin, read_model_info, resolve_model, specialist_files
from pipeline.model.runinfo import DEFAULT_TILE, RunInfo


def _runtime(model_path: str):
    """The module that runs a model file: pipeline.model.onnx (ONNX Runtime) for .onnx, else pipeline.model.network
    (TensorFlow); each has open_forward and checked_info."""
    if model_path.endswith(".onnx"):
        from pipeline.model import onnx  # here: an ONNX model's process never imports TensorFlow

        return onnx
    from pipeline.model import network  # here: TensorFlow is imported only when a Keras model is loaded

    return network


def _file_state(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)  # a Ray worker's blocks, a Segmenter and its Predictor share one load
def _opened(path: str, model_state, info_state, threads: int, use_gpu: bool) -> tuple[RunInfo, int, object]:
    twin = None if use_gpu else onnx_twin(path)
    if twin:  # on CPUs a Keras model's recorded ONNX export: 0.8x the forward pass's time, no TensorFlow import
        _, classes, forward = _runtime(twin).open_forward(twin, threads)
        return read_model_info(path), classes, forward
    return _runtime(path).open_forward(path, threads, use_gpu)


def load_forward(model_path: str, threads: int, use_gpu: bool = False) -> tuple[RunInfo, int, object]:
    """(run.json, classes, images -> softmax probabilities) of a Keras or ONNX model file, loaded (and checked) once
    per process while the file and its run.json stay as they are; each caller gets its own copy of the run.json."""
    path = os.path.abspath(resolve_model(model_path))
    info, classes, forward = _opened(path, _file_state(path), _file_state(info_path(path)), threads, use_gpu)
    return copy.deepcopy(info), classes, forward


def threads_for(cpus: float) -> int:
    """TensorFlow's (or ONNX Runtime's) threads in a Ray worker that reserves `cpus`: twice that, rounded up (half a
    CPU: one thread)."""
    return max(1, math.ceil(cpus * 2))


def _loaded_when_called(model_path: str, threads: int, use_gpu: bool):
    """A model's forward pass that loads it at its first call: a replica that meets no image of a specialist's kind
    never loads it, and the others start sooner (1.8 s a model)."""
    loaded = []

    def forward(images):
        if not loaded:
            loaded.append(load_forward(model_path, threads, use_gpu)[2])
        return loaded[0](images)

    return forward


class Predictor:
    """Ray Data actor: holds one model replica and turns image batches into class probabilities.

    Resize-mode models get fixed-size batches; native-mode models get each image whole, as read (RGB uint8: given
    the model's look here; padded to a multiple of 32, tiled when larger than `tile`). `tta` averages over flips in both modes; `scales`
    (native-mode models) averages over the image resized by each factor, and `size_normalisation` first
    zooms each image so its median nucleus has about the model's `nucleus_area` pixels.
    """

    def __init__(self, model_path: str, batch_size: int, threads: int, tta: bool = False, tile: int = DEFAULT_TILE,
                 overlap: int = 64, use_gpu: bool = False, scales: tuple[float, ...] = (1.0,),
                 size_normalisation: dict | None = None, specialists: dict | None = None):
        self.batch_size, self.tta, self.tile, self.overlap, self.scales = batch_size, tta, tile, overlap, tuple(scales)
        self.size_normalisation = size_normalisation
        self.info, self.classes, self.forward = load_forward(model_path, threads, use_gpu)
        self.native = self.info.mode == "native"
        # Kinds of image routed to a model fine-tuned for them: run.json's (their files checked here), or those given
        # (jobs/tune.py trying one); each loaded at its first image.
        files = specialist_files(model_path, self.info) if specialists is None else specialists
        self.forwards = {kind: _loaded_when_called(path, threads, use_gpu) for kind, path in files.items()}

    def forward_for(self, kind: str = ""):
        """The model function for an image of `kind`: its specialist's, else the model's own."""
        return self.forwards.get(kind, self.forward)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities; batches are padded to a fixed size so results never depend on batching."""
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
        `keep_zoom`: an AtZoom (probabilities at the size normalisation's zoom, the zoom, the size measurement's
        nuclei), for labels_at_zoom."""
        return predict_scales(np.asarray(image, np.float32), self.forward_for(kind), self.scales, self.tile,
                              self.overlap, self.tta, size_normalisation_for(self.size_normalisation, kind),
                              keep_zoom=keep_zoom)

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
                    # the size measurement's nuclei stay here: they are of float32 probabilities, these are sent
                    # on as float16, from which the finishing step finds its own
                    image = normalise(apply_appearance(batch["image"][row], self.info.appearance))  # RGB as read
                    found, zooms[row], _ = self.predict_whole(image, str(kinds[row]), keep_zoom=True)
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


def inspect_model(model_path: str) -> RunInfo:
    """A model's run.json settings, checked before any work. A packaged Keras model (its run.json records the file's
    sha256, which matches, and its classes and input size) is not loaded here: the same bytes loaded when they were
    packaged, and a driver that only schedules then never imports TensorFlow (4 s); any other file is loaded once
    (Keras or ONNX) to check it."""
    if not model_path.endswith(".onnx"):
        info = read_model_info(model_path)  # refuses a file whose sha256 differs from the recorded one
        if info.sha256.get(os.path.basename(model_path)) and info.num_classes and info.image_size:
            specialist_files(model_path, info)  # checks theirs too
            return info
    return _runtime(model_path).checked_info(model_path)
