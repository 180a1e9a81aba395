"""run.json, the record beside each model file: what the model reads, how its outputs become nuclei, how it trained.

`RunInfo` holds its keys typed, each with the default that applies when a file lacks it (files written by hand or
by older versions hold only some), so readers use attributes instead of `.get(key, default)`. `Postprocess` is its
"postprocess" section: the inference settings training stores and jobs/tune.py chooses.

    info = RunInfo.read("runs/x/run.json")      # one clear line (file, key) for a broken file
    info.postprocess.threshold = 0.7
    info.write("runs/x/run.json")               # atomic; keys this version does not know are written back as read

A record read from a file writes back exactly what it read (the same keys, in the same order, plus the keys the
code set since), so reading and writing loses nothing; copy one with copy.deepcopy (dataclasses.replace makes a
new record, which writes its class's WRITTEN keys instead). Formats: "nuclei-unet/2" files (this version's training)
must hold the keys that decide how images are read (REQUIRED); "nuclei-unet/1" files and files without a format
(hand-written ones, older tests') may lack any key. A format this version does not know is refused in one line.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from pipeline.config import REMOVED_OPTIONS, TrainConfig, removed_options_used
from pipeline.io.fileio import write_text_atomic
from pipeline.labels.instances import DEFAULT_MIN_SIZE, DEFAULT_THRESHOLD

FORMAT = "nuclei-unet/2"  # what this version writes: the keys of /1, with REQUIRED always there
READABLE_FORMATS = ("", "nuclei-unet/1", FORMAT)  # "": files that record no format (by hand, older tests)
REQUIRED = ("image_size", "num_classes", "mode", "appearance")  # a FORMAT file must hold these
CLASS_NAMES = {2: ["background", "nucleus"], 3: ["background", "interior", "border"]}  # by num_classes, output order
DEFAULT_TILE = 1024  # pixels: whole-image prediction of native-mode models is tiled above this
# What a model given to --init-from must share with the run's flags: its weights are the run's starting point.
ARCHITECTURE = ("image_size", "num_classes", "mode", "appearance", "encoder_width", "decoder_width")
# The keys in which two models read images differently (so one cannot stand in for the other).
READING = ("mode", "num_classes", "appearance", "image_size")
_CHOICES = {item.name: item.metadata["choices"] for item in dataclasses.fields(TrainConfig)
            if item.name in ("mode", "appearance")}


class RunInfoError(ValueError):
    """A run.json that cannot be read: not JSON, an unknown format, a missing required key or a value of the wrong
    type. Its message is one line naming the file and the key."""


class _Wrong(Exception):
    """Raised by a check: `args[0]` says what the value must be ("an integer")."""


# ------------------------------------------------------------------ checks: a JSON value -> the typed value

def _integer(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Wrong("an integer")
    return value


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Wrong("a number")
    return float(value)


def _boolean(value):
    if not isinstance(value, bool):
        raise _Wrong("true or false")
    return value


def _text(value):
    if not isinstance(value, str):
        raise _Wrong("a string")
    return value


def _mapping(value):
    if not isinstance(value, dict):
        raise _Wrong("a JSON object")
    return value


def _texts(value):
    if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
        raise _Wrong("a list of strings")
    return value


def _numbers(value):
    if not isinstance(value, list) or not value:
        raise _Wrong("a non-empty list of numbers")
    return [_number(part) for part in value]


def _optional(check: Callable) -> Callable:
    def checked(value):
        if value is None:
            return None
        try:
            return check(value)
        except _Wrong as wrong:
            raise _Wrong(f"{wrong.args[0]} or null") from None
    return checked


def _choice(name: str) -> Callable:
    def checked(value):
        if value not in _CHOICES[name]:
            raise _Wrong(f"one of {', '.join(_CHOICES[name])}")
        return value
    return checked


def _item(default: Any, check: Callable, factory: Callable | None = None):
    """A run.json key: its default (or factory of one) where a file lacks it, and the check of its value."""
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _shown(value: Any) -> str:
    """A value for an error message: its repr, cut to keep the message one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Record:
    """Shared by RunInfo and Postprocess: JSON object <-> dataclass, unknown keys kept in `extra`, the keys of the
    file kept (in order) so that writing back loses nothing."""

    WRITTEN: ClassVar[tuple[str, ...]] = ()  # the keys a new record writes even at their defaults

    def __post_init__(self):
        object.__setattr__(self, "_keys", list(self.WRITTEN))

    @classmethod
    def _known(cls) -> dict[str, dataclasses.Field]:
        return {item.name: item for item in dataclasses.fields(cls) if item.name != "extra"}

    @classmethod
    def from_dict(cls, values: dict, where: str = "run.json", prefix: str = ""):
        """The record of a run.json object (or of its `prefix` section); RunInfoError, one line, if it is broken."""
        if not isinstance(values, dict):
            raise RunInfoError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a JSON object, "
                               f"got {_shown(values)}")
        known, parsed, extra = cls._known(), {}, {}
        for key, value in values.items():
            if key not in known:
                extra[key] = value
                continue
            check = known[key].metadata["check"]
            if isinstance(check, type) and issubclass(check, _Record):  # a section of its own
                parsed[key] = check.from_dict({} if value is None else value, where, f"{prefix}{key}.")
                continue
            try:
                parsed[key] = check(value)
            except _Wrong as wrong:
                raise RunInfoError(f"{where}: {prefix}{key} must be {wrong.args[0]}, got {_shown(value)}") from None
        for name, item in known.items():  # a section the file lacks is empty, not a new record's
            check = item.metadata["check"]
            if name not in parsed and isinstance(check, type) and issubclass(check, _Record):
                parsed[name] = check.from_dict({}, where, f"{prefix}{name}.")
        record = cls(**parsed, extra=extra)
        object.__setattr__(record, "_keys", list(values))
        return record

    def to_dict(self) -> dict:
        """The JSON object: the keys read (in their order), then the keys set since, then new unknown ones."""
        known, values = self._known(), {}

        def value_of(name: str):
            value = getattr(self, name)
            return value.to_dict() if isinstance(value, _Record) else copy.deepcopy(value)

        for key in self._keys:
            if key in known:
                values[key] = value_of(key)
            elif key in self.extra:
                values[key] = copy.deepcopy(self.extra[key])
        for name, item in known.items():
            default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            if name not in values and getattr(self, name) != default:
                values[name] = value_of(name)
        for key, value in self.extra.items():
            values.setdefault(key, copy.deepcopy(value))
        return values


@dataclass(eq=True)
class Postprocess(_Record):
    """run.json "postprocess": how probabilities become nuclei; training stores the first three, jobs/tune.py all
    it chose (pipeline.train.tuning.tuned_settings). Flags override them (pipeline.segment.postprocess.postprocess_settings)."""

    WRITTEN: ClassVar[tuple[str, ...]] = ("threshold", "seed_threshold", "min_size")

    threshold: float = _item(DEFAULT_THRESHOLD, _number)  # P(nucleus) above which a pixel is nucleus
    seed_threshold: float = _item(DEFAULT_THRESHOLD, _number)  # 3 classes: P(interior) above which a pixel seeds one
    min_size: int = _item(DEFAULT_MIN_SIZE, _integer)  # pixels: smaller predicted objects are dropped
    tta: bool = _item(False, _boolean)  # average the predictions over flips
    scales: list[float] = _item(None, _numbers, lambda: [1.0])  # native mode: averaged over these resizings
    # size normalisation: {nucleus_area, threshold, seed_threshold, min_size} (the last three measure the nuclei)
    size_normalisation: dict | None = _item(None, _optional(_mapping))
    clump_split: dict | None = _item(None, _optional(_mapping))  # pipeline.labels.instances.split_clumps' settings
    instance_filter: dict | None = _item(None, _optional(_mapping))  # the fitted false-positive filter
    outline_refiner: dict | None = _item(None, _optional(_mapping))  # the fitted outline refiner
    by_kind: dict[str, dict] = _item(None, _mapping, dict)  # {kind: {threshold, seed_threshold, min_size}}
    specialists: dict[str, str] = _item(None, _mapping, dict)  # {kind: file beside the model fine-tuned for it}
    tuned_on: str | None = _item(None, _optional(_text))  # where jobs/tune.py chose these (None: not tuned)
    tune_score: float | None = _item(None, _optional(_number))  # their score there
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def thresholds(self) -> tuple[float, float, int]:
        """(threshold, seed_threshold, min_size)."""
        return self.threshold, self.seed_threshold, self.min_size


@dataclass(eq=True)
class RunInfo(_Record):
    """A model's run.json (pipeline/train/training.py run_training writes it; jobs/tune.py, jobs/package.py and
    jobs/export.py rewrite it). Defaults are what a file without the key means."""

    WRITTEN: ClassVar[tuple[str, ...]] = (
        "format", "model", "keras", "image_size", "num_classes", "classes", "mode", "appearance", "tile",
        "normalisation", "resize", "backbone", "backbone_weights", "backbone_init", "encoder_width", "decoder_width",
        "postprocess", "data", "holdout", "train_images", "val_images", "train_crops", "workers", "epochs_run",
        "best_epoch", "kept_epoch", "final_metrics", "train_seconds", "config", "sha256")

    format: str = _item("", _text)  # FORMAT, "nuclei-unet/1", or "" (a file that records none)
    model: str | None = _item(None, _optional(_text))  # the weights file it describes ("model.keras")
    keras: str | None = _item(None, _optional(_text))  # the Keras that saved it ("tf-keras")
    image_size: int | None = _item(None, _optional(_integer))  # training input side in pixels (None: the model's)
    num_classes: int | None = _item(None, _optional(_integer))  # 2 (background, nucleus) or 3 (+ border)
    classes: list[str] | None = _item(None, _optional(_texts))  # the classes' names, in output order
    mode: str = _item("resize", _choice("mode"))  # resize: whole images resized; native: full resolution
    appearance: str = _item("rgb", _choice("appearance"))  # how images are turned into model input (augment.py)
    tile: int | None = _item(None, _optional(_integer))  # native mode: larger images are predicted in tiles
    normalisation: str | None = _item(None, _optional(_text))  # pixel values the model takes, in words
    resize: str | None = _item(None, _optional(_text))  # how images are sized for the model, in words
    backbone: str | None = _item(None, _optional(_text))  # the encoder ("MobileNetV2")
    backbone_weights: str | None = _item(None, _optional(_text))  # --backbone-weights
    backbone_init: str | None = _item(None, _optional(_text))  # where the encoder's first weights came from
    encoder_width: float | None = _item(None, _optional(_number))  # MobileNetV2 width multiplier
    decoder_width: float | None = _item(None, _optional(_number))  # decoder filters as a fraction of the notebook's
    postprocess: Postprocess = _item(None, Postprocess, Postprocess)  # inference settings (jobs/tune.py's)
    data: str = _item("", _text)  # the training data
    holdout: str | None = _item(None, _optional(_text))  # --holdout: random, protocol or refit
    train_images: int | None = _item(None, _optional(_integer))  # images trained on
    val_images: int | None = _item(None, _optional(_integer))  # images validated on
    train_crops: int | None = _item(None, _optional(_integer))  # training rows (crops in native mode)
    workers: int | None = _item(None, _optional(_integer))  # Ray Train workers
    epochs_run: int | None = _item(None, _optional(_integer))  # epochs trained (early stopping, time limit)
    best_epoch: int | None = _item(None, _optional(_integer))  # lowest validation loss
    kept_epoch: int | None = _item(None, _optional(_integer))  # whose weights model.keras holds (--keep)
    final_metrics: dict[str, float] = _item(None, _mapping, dict)  # the kept epoch's metrics
    train_seconds: float | None = _item(None, _optional(_number))  # wall time of the run
    config: dict = _item(None, _mapping, dict)  # the TrainConfig as a dict (old runs: options since removed too)
    sha256: dict[str, str] = _item(None, _mapping, dict)  # {file beside run.json: its sha256}, checked at load
    packaged_from: str | None = _item(None, _optional(_text))  # jobs/package.py: the run's model file
    exported_from: str | None = _item(None, _optional(_text))  # jobs/export.py: the Keras model file
    onnx_opset: int | None = _item(None, _optional(_integer))  # jobs/export.py: the ONNX opset
    onnx: dict[str, str] = _item(None, _mapping, dict)  # {model file beside run.json: its ONNX export beside it}
    extra: dict = field(default_factory=dict)  # keys this version does not know (e.g. "fine_head"), kept as read

    @classmethod
    def from_dict(cls, values: dict, where: str = "run.json", prefix: str = "") -> "RunInfo":
        """A run.json's content; RunInfoError (one line naming `where` and the key) if it cannot be read."""
        format_ = values.get("format", "") if isinstance(values, dict) else ""
        if isinstance(format_, str) and format_ not in READABLE_FORMATS:
            raise RunInfoError(f"{where}: format {format_!r} is not one this version reads "
                               f"({', '.join(name for name in READABLE_FORMATS if name)}): update the code")
        info = super().from_dict(values, where, prefix)
        if info.format == FORMAT:
            missing = [key for key in REQUIRED if values.get(key) is None]
            if missing:
                raise RunInfoError(f"{where}: {missing[0]} is missing or null (a {FORMAT} file must hold "
                                   f"{', '.join(REQUIRED)})")
        return info

    @classmethod
    def of(cls, info: "RunInfo | dict | None", where: str = "run.json") -> "RunInfo":
        """`info` itself, or the record of run.json's content given as a dict (None or {}: no run.json)."""
        return info if isinstance(info, RunInfo) else cls.from_dict(info or {}, where)

    @classmethod
    def read(cls, path: str) -> "RunInfo":
        """The run.json at `path` (a local file); RunInfoError, one line, if it is not one."""
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise RunInfoError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") \
                from None
        return cls.from_dict(values, where=path)

    def write(self, path: str) -> None:
        """Write run.json atomically, after checking that it reads back (nothing is written if it would not)."""
        values = self.to_dict()
        RunInfo.from_dict(values, where=path)
        write_text_atomic(path, json.dumps(values, indent=2))

    @property
    def effective_tile(self) -> int:
        """The side above which native-mode prediction tiles an image: run.json's `tile`, else DEFAULT_TILE."""
        return self.tile or DEFAULT_TILE

    def removed_options_used(self) -> str:
        """pipeline.config.removed_options_used of the run's training options ("config", and those recorded at
        the top level, as "fine_head" was): '' when it used nothing this version removed."""
        return removed_options_used({**self.config, **{key: self.extra[key] for key in REMOVED_OPTIONS
                                                        if key in self.extra}})

    def trained_options(self) -> dict:
        """The run's training options: "config", with the architecture keys the file records at the top level
        (what the saved model has) over it."""
        recorded = self.to_dict()
        return {**self.config, **{key: recorded[key] for key in ARCHITECTURE if key in recorded}}

    def kept_weights_config(self) -> dict:
        """The run's training options ("config") with `keep` as its weights are: `keep` only decides early stopping
        and restoring, so a --keep best run whose best epoch was its last kept exactly what --keep last keeps."""
        config = dict(self.config)
        if config.get("keep", "best") == "best" and self.best_epoch and self.best_epoch == self.epochs_run:
            config["keep"] = "last"
        return config
