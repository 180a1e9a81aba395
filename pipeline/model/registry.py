"""Shipped models (`models/<name>/`) and model files on disk: name resolution, run.json, sha256 check.

`--model dsb2018` means `models/dsb2018/model.keras`; a path is used as it is. A model's run.json may carry
the sha256 of its weights file: loading refuses a file whose hash differs (changed or corrupted).
No TensorFlow here: the driver resolves and checks a model before any worker loads it.
"""
from __future__ import annotations

import hashlib
import os

from pipeline.data.protocol import KINDS
from pipeline.model.runinfo import READING, RunInfo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: pipeline/model/ is two below
MODELS_DIR = os.path.join(ROOT, "models")
MODEL_FILES = ("model.keras", "model.onnx")
DEFAULT_MODEL = "dsb2018"


class ModelFileError(ValueError):
    """A model file that is missing, not a model, changed since it was recorded, or does not match its run.json."""


def shipped_models() -> list[str]:
    """Names of the models shipped in models/ (folders holding a model file)."""
    if not os.path.isdir(MODELS_DIR):
        return []
    return sorted(name for name in os.listdir(MODELS_DIR)
                  if any(os.path.isfile(os.path.join(MODELS_DIR, name, file)) for file in MODEL_FILES))


def resolve_model(name_or_path: str) -> str:
    """A model file path from a shipped model's name or a path; one clear line for an unknown name."""
    if os.path.exists(name_or_path) or os.sep in name_or_path or "/" in name_or_path \
            or name_or_path.endswith((".keras", ".onnx", ".h5")):
        return name_or_path
    names = shipped_models()
    if name_or_path in names:
        folder = os.path.join(MODELS_DIR, name_or_path)
        return next(os.path.join(folder, file) for file in MODEL_FILES if os.path.isfile(os.path.join(folder, file)))
    raise ModelFileError(f"no model named {name_or_path!r}: shipped models are {', '.join(names) or 'none'} "
                         f"(or give the path of a model.keras or model.onnx file)")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def info_path(model_path: str) -> str:
    """run.json beside a Keras model; `<name>.json` beside an ONNX file (what jobs/export.py writes)."""
    if model_path.endswith(".onnx"):
        return os.path.splitext(model_path)[0] + ".json"
    return os.path.join(os.path.dirname(model_path), "run.json")


def read_model_info(model_path: str) -> RunInfo:
    """The model's run.json (all defaults when there is none), read and checked (pipeline.model.runinfo: one clear line
    for a broken one), after checking the model file exists and matches its sha256, and that it was not trained
    with an option this version removed (pipeline.config.REMOVED_OPTIONS)."""
    if not os.path.isfile(model_path):
        raise ModelFileError(f"model file not found: {model_path}")
    path = info_path(model_path)
    info = RunInfo.read(path) if os.path.isfile(path) else RunInfo.of(None)
    refuse_removed_options(info, path)
    expected = info.sha256.get(os.path.basename(model_path))
    if expected and sha256_of(model_path) != expected:
        raise ModelFileError(f"{model_path}: sha256 differs from the one recorded in {info_path(model_path)}: "
                             f"the file was changed or corrupted; refusing to load it")
    return info


def refuse_removed_options(info: RunInfo, where: str) -> None:
    """One clear line for a model whose run.json records a training option this version removed, switched on."""
    used = info.removed_options_used()
    if used:
        raise ModelFileError(f"{where}: {used}; retrain it")


def reading_differences(theirs: RunInfo | dict, mine: RunInfo | dict) -> list[str]:
    """The run.json keys in which two models read images differently (so one cannot stand in for the other)."""
    theirs, mine = RunInfo.of(theirs), RunInfo.of(mine)
    return [key for key in READING if getattr(theirs, key) != getattr(mine, key)]


def onnx_twin(model_path: str) -> str | None:
    """The ONNX export recorded beside a Keras model file (run.json `onnx`: jobs/package.py --onnx), checked against
    its sha256, else None: CPU inference runs it with ONNX Runtime instead of TensorFlow (the same probabilities to
    1e-4, checked when it was written; no TensorFlow import)."""
    if not model_path.endswith(".keras"):
        return None
    folder = os.path.dirname(os.path.abspath(model_path))
    run_json = os.path.join(folder, "run.json")
    if not os.path.isfile(run_json):
        return None
    info = RunInfo.read(run_json)
    name = info.onnx.get(os.path.basename(model_path))
    if not name:
        return None
    if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".onnx"):
        raise ModelFileError(f"{run_json}: onnx export {name!r}: must be an .onnx file beside the model")
    path = os.path.join(folder, name)
    expected = info.sha256.get(name)
    if not os.path.isfile(path) or not expected or sha256_of(path) != expected:
        raise ModelFileError(f"{path}: the ONNX export named in {run_json} is missing or its sha256 differs from the "
                             f"recorded one; refusing to load it")
    return path


def specialist_files(model_path: str, info: RunInfo | dict) -> dict[str, str]:
    """{kind: path} of the model's kind specialists (run.json `postprocess.specialists`: kind -> a file beside the
    model), each checked against the sha256 in the model's run.json; a name that leaves the folder is refused."""
    info = RunInfo.of(info, info_path(model_path))
    named = info.postprocess.specialists
    folder = os.path.dirname(os.path.abspath(model_path))
    files = {}
    for kind, name in named.items():
        if kind not in KINDS or not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ModelFileError(f"{info_path(model_path)}: specialist {kind}={name!r}: must be a kind of image and "
                                 f"a file beside the model")
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ModelFileError(f"{path}: the {kind} specialist named in {info_path(model_path)} is missing")
        expected = info.sha256.get(name)
        if expected and sha256_of(path) != expected:
            raise ModelFileError(f"{path}: sha256 differs from the one recorded in {info_path(model_path)}: "
                                 f"the file was changed or corrupted; refusing to load it")
        files[kind] = path
    return files
