"""ONNX: export a tf-keras U-Net with dynamic height and width, and run it with ONNX Runtime (no TensorFlow).

The exported graph takes `image` (N x H x W x 3 float32 in [0, 1], H and W multiples of 32) and returns
logits, like the Keras model; `OnnxModel` applies the softmax. The run's settings (run.json) travel in the
file's metadata (`run.json` key) and in a JSON file beside it, with the ONNX file's sha256.
"""
from __future__ import annotations

import json
import os

import numpy as np

from pipeline.data.augment import apply_appearance
from pipeline.io import fileio
from pipeline.io.images import normalise, resize_image
from pipeline.io.sources import list_images, load_sample
from pipeline.io.synthetic import synthetic_refs
from pipeline.model.registry import (ModelFileError, info_path, read_model_info, refuse_removed_options, resolve_model,
                                     sha256_of, specialist_files)
from pipeline.model.runinfo import RunInfo

OPSET = 17
INPUT_NAME = "image"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return exp / exp.sum(axis=-1, keepdims=True)


class OnnxModel:
    """An exported model in an ONNX Runtime session; `probabilities(batch)` is what Predictor calls."""

    def __init__(self, path: str, threads: int = 0, use_gpu: bool = False):
        import onnxruntime as ort

        self.info = read_model_info(path)
        options = ort.SessionOptions()
        # No memory pattern: it keeps a plan per input shape, and a whole slide's blocks and tiles come in many
        # (a 2-core box: 12 tile shapes 1.13 -> 0.72 GiB peak, the same time).
        options.enable_mem_pattern = False
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types for a bad file
            raise ModelFileError(f"{path} is not a loadable ONNX model: {str(error).splitlines()[0][:200]}") from None
        if not self.info.to_dict():  # no settings beside the file: those in its metadata
            metadata = self.session.get_modelmeta().custom_metadata_map
            where = f"{path} (its run.json metadata)"
            self.info = RunInfo.from_dict(json.loads(metadata.get("run.json", "{}")), where)
            refuse_removed_options(self.info, where)
        self.classes = int(self.session.get_outputs()[0].shape[-1])
        if self.info.num_classes is None:
            self.info.num_classes = self.classes

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(images, np.float32)})[0]
        return softmax(logits)


def open_forward(path: str, threads: int, use_gpu: bool = False) -> tuple[RunInfo, int, object]:
    """(run.json, classes, images -> softmax probabilities) of a model.onnx run by ONNX Runtime (no TensorFlow)."""
    model = OnnxModel(path, threads=max(1, threads), use_gpu=use_gpu)
    return model.info, model.classes, model.probabilities


def checked_info(path: str) -> RunInfo:
    """A model.onnx opened once to check it: its run.json settings (beside it, or in its metadata)."""
    return OnnxModel(path, threads=1).info


def export_onnx(model_path: str, output: str, check_images: list[np.ndarray], tolerance: float = 1e-4) -> dict:
    """Convert a Keras model to ONNX, check it against TensorFlow on `check_images`, write it with its settings.

    A model with kind specialists (run.json) gets an ONNX file for each beside it, `<output stem>.<kind>.onnx`,
    named in the settings. Returns {'max_abs_difference', 'images', 'onnx', 'json', 'specialists'}; raises (writing
    nothing) if any model's outputs differ by more than `tolerance` (softmax probabilities) on any image.
    """
    from pipeline.model.network import load_model  # here: exporting needs TensorFlow, running ONNX never does

    model, info = load_model(model_path)
    converted = {"": _converted_and_checked(model, check_images, tolerance)}
    for kind, path in specialist_files(model_path, info).items():  # kind specialists: an ONNX file each, beside
        converted[kind] = _converted_and_checked(load_model(path)[0], check_images, tolerance)
    stem = os.path.splitext(output)[0]
    files = {kind: output if not kind else f"{stem}.{kind}.onnx" for kind in converted}
    info.exported_from, info.onnx_opset = os.path.basename(model_path), OPSET
    if len(converted) > 1:
        info.postprocess.specialists = {kind: os.path.basename(files[kind]) for kind in converted if kind}
    metadata = {key: value for key, value in info.to_dict().items() if key != "sha256"}  # the files' hashes: beside
    for kind, (proto, _) in converted.items():
        _write_with_settings(proto, metadata, files[kind])
    info.sha256 = {os.path.basename(path): sha256_of(path) for path in files.values()}
    info.write(info_path(output))
    return {"max_abs_difference": max(worst for _, worst in converted.values()), "images": len(check_images),
            "onnx": output, "json": info_path(output), "specialists": [files[kind] for kind in converted if kind]}


def add_onnx_twins(model_path: str, check_images: list[np.ndarray], tolerance: float = 1e-4) -> dict:
    """Export a Keras model and each of its kind specialists to ONNX beside them (`model.onnx`,
    `specialist-<kind>.onnx`), each checked against TensorFlow on `check_images` as export_onnx does, and record
    them in its run.json (`onnx`, sha256): CPU inference then runs them with ONNX Runtime (pipeline.model.registry's
    onnx_twin). Nothing is written if any disagrees. Returns {'max_abs_difference', 'images', 'files'}."""
    from pipeline.model.network import load_model  # here: exporting needs TensorFlow, running ONNX never does

    folder, info = os.path.dirname(os.path.abspath(model_path)), read_model_info(model_path)
    specialists = specialist_files(model_path, info)
    sources = [os.path.abspath(model_path), *specialists.values()]
    converted = {source: _converted_and_checked(load_model(source)[0], check_images, tolerance) for source in sources}
    names = {source: os.path.splitext(os.path.basename(source))[0] + ".onnx" for source in sources}
    metadata = info.to_dict()  # the settings travel inside each file too, its specialists named by their exports
    metadata.pop("sha256", None)
    metadata["postprocess"]["specialists"] = {kind: names[path] for kind, path in specialists.items()}
    for source, (proto, _) in converted.items():
        target = os.path.join(folder, names[source])
        _write_with_settings(proto, {**metadata, "exported_from": os.path.basename(source), "onnx_opset": OPSET},
                             target)
        info.onnx[os.path.basename(source)], info.sha256[names[source]] = names[source], sha256_of(target)
    info.write(info_path(model_path))
    return {"max_abs_difference": max(worst for _, worst in converted.values()), "images": len(check_images),
            "files": [os.path.join(folder, names[source]) for source in sources]}


def _write_with_settings(proto, settings: dict, target: str) -> None:
    """An exported model written to `target` with its run.json settings in its metadata (`run.json` key), checked."""
    import onnx

    entry = proto.metadata_props.add()
    entry.key, entry.value = "run.json", json.dumps(settings)
    onnx.checker.check_model(proto)
    fileio.write_bytes_atomic(target, proto.SerializeToString())


def _converted_and_checked(model, check_images: list[np.ndarray], tolerance: float):
    """(ONNX proto, max |difference| of softmax from TensorFlow's on check_images); raises when they disagree."""
    import onnxruntime as ort
    import tf2onnx

    from pipeline.model.tfkeras import tf  # here: exporting needs TensorFlow, running ONNX never does

    signature = (tf.TensorSpec((None, None, None, 3), tf.float32, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for image in check_images:
        height, width = (max(32, side - side % 32) for side in image.shape[:2])  # whole image, cut to multiples of 32
        batch = np.ascontiguousarray(np.asarray(image, np.float32)[:height, :width])[None]
        expected = tf.nn.softmax(model(batch, training=False), axis=-1).numpy()
        got = softmax(session.run(None, {INPUT_NAME: batch})[0])
        worst = max(worst, float(np.abs(expected - got).max()))
    if not check_images or worst > tolerance:
        raise ValueError(f"ONNX export disagrees with TensorFlow: max |difference| {worst:.2e} over "
                         f"{len(check_images)} images (tolerance {tolerance:.0e}); nothing written")
    return proto, worst


def check_refs(source: str, count: int) -> tuple[str, list]:
    """(where they come from, the first `count` images by id) of `source` (the model's training data, or
    --check-images) when it is there, else of synthetic nuclei."""
    if source and source != "synthetic" and (fileio.is_uri(source) or os.path.exists(source)):
        return source, sorted(list_images(source).refs, key=lambda ref: ref.image_id)[:count]
    return "synthetic", synthetic_refs(count, seed=0)


def check_images_for(config, info: RunInfo) -> tuple[str, list[np.ndarray]]:
    """(where they came from, model inputs) for the export check: real images when there are any, as the model sees them."""
    source, refs = check_refs(config.check_images or info.data, config.check_count)
    images = []
    for ref in refs:
        image = apply_appearance(load_sample(ref, with_masks=False).image, info.appearance)
        if info.mode == "native":
            image = image[:config.check_size, :config.check_size]
        else:
            image = resize_image(image, info.image_size or 128)
        images.append(normalise(image))
    return source, images


def run_export(config) -> dict:
    """jobs/export.py's work: export config.model to config.output, checked on real (or synthetic) images."""
    model_path = resolve_model(config.model)
    source, images = check_images_for(config, read_model_info(model_path))
    result = export_onnx(model_path, config.output or "model.onnx", images, config.tolerance)
    return {**result, "check_source": source}
