"""The one configuration object of each job, and the command line generated from it.

Each field carries its own help text; `parse_args` builds argparse from the dataclass, so a flag is
defined once and the same object travels to Ray workers (it is a plain, picklable dataclass).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field


def option(default, help: str, choices=None, flag: str | None = None):
    """A config field with its command-line help."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass
class DataConfig:
    """How images become model inputs (shared by training and inference)."""

    image_size: int = option(128, "model input size in pixels (a multiple of 32)")
    max_pixels: int = option(100_000_000, "refuse images with more pixels than this (decompression-bomb guard)")
    blocks: int = option(0, "Ray Data blocks to split the listing into (0 = automatic)")


@dataclass
class TrainConfig(DataConfig):
    """Everything jobs/train.py needs; saved as config.json in the run folder."""

    data: str = option("synthetic", "training data: a Kaggle-layout folder or .zip (local path or URI such as "
                                    "s3://bucket/stage1_train.zip), or 'synthetic' for generated nuclei")
    extra_data: str = option("", "training-only images with masks, Kaggle-layout folders or zips (comma-separated): "
                                 "added to the training images, never to validation, tune or test (e.g. "
                                 "../shared/data/tnbc/tnbc.zip, H&E tissue)")
    synthetic_count: int = option(96, "number of synthetic images when --data synthetic")
    output: str = option("runs/latest", "run folder: model.keras, run.json, TensorBoard logs, snapshots")
    storage: str = option("", "where Ray keeps checkpoints (local path or URI); default: <output>/ray")
    epochs: int = option(30, "maximum number of epochs")
    batch_size: int = option(16, "images per batch on each worker")
    workers: int = option(1, "Ray Train workers (MultiWorkerMirroredStrategy replicas)")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker; fractional values leave room for Ray Data")
    placement: str = option("PACK", "where workers go: PACK (fill nodes first) or SPREAD (one per node where possible)",
                            choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    gpu: str = option("auto", "use a GPU per worker: auto (when the cluster has one), yes or no",
                      choices=("auto", "yes", "no"))
    backbone_weights: str = option("auto", "MobileNetV2 weights: imagenet (download, needs internet), none "
                                           "(random init), a local .h5 weights file, or auto (imagenet, else none)")
    encoder_width: float = option(1.0, "MobileNetV2 width multiplier alpha (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)")
    decoder_width: float = option(1.0, "decoder filters as a fraction of the notebook's (512, 256, 128, 64); 0.5 "
                                       "trains ~1.4x faster on a CPU")
    freeze_encoder: bool = option(False, "keep the encoder's weights fixed (useful with imagenet weights)")
    encoder_lr_scale: float = option(1.0, "the encoder's learning rate as a fraction of --learning-rate: pretrained "
                                          "features move slower than the new decoder")
    frozen_encoder_epochs: int = option(0, "the first epochs train the decoder alone (the encoder's weights fixed, "
                                           "its batch statistics adapting), then everything trains")
    init_from: str = option("", "start from this trained model.keras's weights (fine-tuning) instead of a new model; "
                                "its architecture flags must match (give the same --preset)")
    kinds: str = option("", "train and validate only on these kinds of image, comma-separated: fluorescence, stained, "
                            "bright-field (empty: all). With --init-from, a specialist that jobs/tune.py "
                            "--specialists can route that kind of image to")
    mode: str = option("resize", "resize: whole images resized to --image-size (the notebook's recipe); native: "
                                 "train on --image-size crops at full resolution, predict whole images",
                       choices=("resize", "native"))
    appearance: str = option("rgb", "rgb: colours as they are; standardised: grey, bright-field and stained images "
                                    "inverted, contrast stretched per image (one model for all kinds); colour: "
                                    "the same but colours kept (stained nuclei told from red tissue by hue)",
                             choices=("rgb", "standardised", "colour"))
    crops_per_image: int = option(8, "native mode: random crops cut from each training image")
    crops_per_rare_image: int = option(0, "native mode: training crops cut from each stained or bright-field image, "
                                          "the rare kinds (0: --crops-per-image); validation keeps --crops-per-image")
    nucleus_area: float = option(0.0, "native mode: zoom each training image (within 0.5x-2x) so its median nucleus "
                                      "has about this many pixels, as --nucleus-area does at inference (0: off)")
    augment: bool = option(False, "augment training data: scale jitter, flips, 90-degree turns, brightness/contrast")
    colour_augment: bool = option(False, "with --augment: each epoch, a random channel order for half the crops and "
                                         "grey for one in five (stained tissue; DSB2018 1st place)")
    stain_augment: float = option(0.0, "with --augment: each epoch, scale each stain's amount (haematoxylin, eosin, "
                                       "DAB) in coloured crops by 1 +- this and shift it by a quarter of it, as "
                                       "staining varies between labs (0: off; e.g. 0.25)")
    low_resolution: float = option(0.0, "with --augment: each epoch, this share of the crops shown at 0.4-0.7x their "
                                        "resolution and zoomed back (their outlines kept), as images at half the "
                                        "training magnification reach the model once inference zooms them (0: off)")
    loss: str = option("ce", "ce: cross-entropy; ce+dice: plus soft Dice of the nucleus classes (DSB2018 1st place)",
                       choices=("ce", "ce+dice"))
    border_weight: float = option(1.0, "loss weight of the border class (3 classes), which is rare but splits nuclei")
    num_classes: int = option(2, "2: background/nucleus; 3: background/interior/border (splits touching nuclei)",
                              choices=(2, 3))
    holdout: str = option("random", "random: hold out --val-fraction of the images (seeded by --seed) for validation; "
                                    "protocol: the fixed evaluation protocol (pipeline/data/protocol.py): train on its "
                                    "train split, validate on its tune split, never see its test split; refit: "
                                    "train on its train and tune splits (the final model, once the tune split has "
                                    "made every choice; it still never sees the test split)",
                          choices=("random", "protocol", "refit"))
    val_fraction: float = option(0.2, "--holdout random: fraction of images held out for validation (seeded split)")
    learning_rate: float = option(1e-3, "peak Adam learning rate")
    warmup_epochs: int = option(2, "epochs of linear learning-rate warm-up; early stopping waits for them")
    patience: int = option(8, "early stopping: epochs without validation-loss improvement")
    keep: str = option("best", "which weights the run keeps: best = the epoch with the lowest validation loss (early "
                               "stopping restores them); last = the last epoch's, with no early stopping (the "
                               "preset's: the tune split scored them higher; and for a fine-tune whose validation "
                               "images are too few to pick an epoch by)",
                       choices=("best", "last"))
    bn_momentum: float = option(0.9, "BatchNorm momentum (Keras' 0.999 lags ~1000 steps from random init)")
    threshold: float = option(0.5, "written to run.json as inference's default: probability above which a pixel "
                                   "is nucleus")
    seed_threshold: float = option(0.5, "written to run.json: 3 classes, P(interior) above which a pixel seeds a "
                                        "nucleus")
    min_size: int = option(10, "written to run.json: inference drops predicted nuclei smaller than this (pixels)")
    snapshots: int = option(3, "validation images drawn each epoch as input | truth | prediction")
    time_limit: float = option(0.0, "minutes: stop after the last epoch that can finish within this much time from "
                                    "the start of the job (weights kept as --keep says), leaving time for the "
                                    "--tune step when there is one (about 3 epochs' worth); 0 = no limit")
    tune: bool = option(False, "after training, choose the inference settings on the protocol's tune split "
                               "(what jobs/tune.py does) and store them in run.json, so segment, submit and "
                               "evaluate use them with no flag (--holdout protocol runs of all kinds of image "
                               "only; the preset's)")
    max_failures: int = option(2, "worker failures Ray Train recovers from (restarting from the last checkpoint)")
    resume: bool = option(False, "continue the interrupted run in --output from its last checkpoint, with the "
                                 "settings saved in its config.json (other flags are ignored, but for a new "
                                 "--time-limit counted from the resumed job's start)")
    seed: int = option(42, "seed for the split, synthetic data and initialisation")
    preset: str = option("", "named configuration whose values replace the defaults (flags given still win): "
                             "dsb2018 = the best measured recipe for the DSB2018 data", choices=("", "dsb2018"))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


# What may differ between two runs of one recipe: seeds, run lengths, where they ran, and which split held out.
NOT_RECIPE = frozenset({"holdout", "seed", "output", "storage", "resume", "epochs", "time_limit", "tune"})

# Options of dropped trials, removed from the code, that the config.json and run.json of older runs still hold,
# each with the value it had when off: a run that had them all off trained as this version trains. None: any
# value (crash_at_epoch, a test hook, changed nothing a run learnt). REMOVED_CHOICES: values of kept options that
# went with them. A run.json with one of them on is refused where its model is loaded (pipeline/model/registry.py).
REMOVED_OPTIONS = {"border": "all", "fine_head": 0, "crop_pool": 1, "nucleus_crops": 0.0, "weight_average": 0.0,
                   "crash_at_epoch": None}
REMOVED_CHOICES = {"loss": ("ce+dice+lovasz",)}


def removed_options_used(options: dict) -> str:
    """'' when a run's training options (config.json, run.json "config") use nothing this version removed, else
    what they use, for an error message: "trained with fine_head=64, an option this version no longer has"."""
    used = [f"{name}={options[name]}" for name, off in REMOVED_OPTIONS.items()
            if off is not None and name in options and options[name] != off]
    used += [f"{name}={options[name]}" for name, gone in REMOVED_CHOICES.items() if options.get(name) in gone]
    if not used:
        return ""
    return f"trained with {', '.join(used)}, {'an option' if len(used) == 1 else 'options'} this version no longer has"


def recipe_differences(mine: dict, theirs: dict) -> list[str]:
    """The training options (config.json / run.json "config") in which two runs' recipes differ; options newer
    than a run count at their defaults, options since removed at the value that had them off."""
    defaults = {**REMOVED_OPTIONS, **{item.name: item.default for item in dataclasses.fields(TrainConfig)}}
    ignored = NOT_RECIPE | {name for name, off in REMOVED_OPTIONS.items() if off is None}
    return sorted(key for key in set(mine) | set(theirs) if key not in ignored
                  and not _same_option(key, mine.get(key, defaults.get(key)), theirs.get(key, defaults.get(key))))


def _same_option(name: str, mine, theirs) -> bool:
    """Equal values; for data sources, also the same local file given by two paths (relative and absolute)."""
    if mine == theirs:
        return True
    if name not in ("data", "extra_data") or not mine or not theirs or "://" in f"{mine}{theirs}":
        return False
    import os

    resolve = lambda text: [os.path.realpath(part.strip()) for part in str(text).split(",")]  # noqa: E731
    return resolve(mine) == resolve(theirs)


# Named configurations for `--preset`: values replace the defaults; flags given on the command line still win.
TRAIN_PRESETS = {
    "dsb2018": dict(mode="native", num_classes=3, appearance="colour", loss="ce+dice", image_size=128,
                    crops_per_image=8, augment=True, border_weight=2.0, encoder_width=1.0, decoder_width=0.5,
                    batch_size=16, learning_rate=2e-3, epochs=40, warmup_epochs=2, patience=10, keep="last",
                    holdout="protocol", time_limit=45.0, threshold=0.6, seed_threshold=0.5, min_size=30, tune=True),
}


@dataclass
class SegmentConfig(DataConfig):
    """Everything jobs/segment.py and jobs/submit.py need."""

    model: str = option("dsb2018", "a shipped model's name (models/<name>/, its card in models/<name>/README.md) or the path of a "
                                   "model.keras (run.json beside it) or model.onnx (jobs/export.py)")
    input: str = option("", "folder or .zip of images (Kaggle test layout or any tree), local or URI")
    output: str = option("", "output folder (segment.py) or submission CSV (submit.py)")
    batch_size: int = option(32, "images per model call")
    concurrency: int = option(0, "model replicas (Ray actors); 0: one per GPU where GPUs are used, else as many as "
                                 "reserve half the cluster's CPUs (one per CPU by default), at most one per 3 GiB "
                                 "of its memory and one per 32 images")
    cpus_per_actor: float = option(0.0, "CPUs reserved per model replica (its TensorFlow threads: twice this, "
                                        "rounded up) and per block of a large image; 0: half a CPU per replica "
                                        "on CPUs (the rest reads and writes), one per GPU replica and per block")
    gpu: str = option("auto", "use a GPU per model replica: auto, yes or no", choices=("auto", "yes", "no"))
    min_size: int = option(0, "drop predicted nuclei smaller than this many pixels (0: the model's run.json, else 10)")
    threshold: float = option(0.0, "probability above which a pixel is nucleus (0: the model's run.json, else 0.5)")
    seed_threshold: float = option(0.0, "3-class models: P(interior) above which a pixel seeds a nucleus "
                                        "(0: the model's run.json, else 0.5)")
    tta: bool = option(None, "test-time augmentation: average predictions over flips (4x the model work); "
                             "default: the model's run.json, else off")
    scales: str = option("", "native-mode models: comma-separated scale factors whose predictions are averaged, "
                             "e.g. 1,1.5 (default: the model's run.json, else 1)")
    nucleus_area: float = option(None, "native-mode models: zoom each image so its median nucleus (measured by a "
                                       "first plain pass) has about this many pixels, within 0.5x-2x; 0 = off "
                                       "(default: the model's run.json, else off)")
    diameter: float = option(0.0, "native-mode models: the images' typical nucleus diameter in pixels; each image is "
                                  "zoomed so its nuclei have the size the model knows (0: measured by a first pass "
                                  "where the model stores a nucleus size)")
    instance_filter: bool = option(None, "drop predicted objects the model's fitted false-positive filter rejects "
                                         "(default: on when the model's run.json has one)")
    split_clumps: bool = option(None, "cut predicted objects that look like merged nuclei (large, non-convex) at "
                                      "the peaks of their distance transform (default: on when the model's "
                                      "run.json has clump splitting, which jobs/tune.py keeps where it gains)")
    refine_outlines: bool = option(None, "re-decide the pixels near each nucleus' edge with the model's fitted "
                                         "outline refiner, from the probabilities and the image (default: on "
                                         "when the model's run.json has one)")
    tile: int = option(0, "native-mode models: images larger than this are predicted in overlapping tiles "
                          "(0: the tile size in the model's run.json, else 1024)")
    overlap: int = option(64, "pixels shared by neighbouring tiles (blended)")
    block_size: int = option(2048, "native-mode models: images with more pixels than four blocks of this side are "
                                   "segmented block by block (Ray tasks, TIFF windows read tile by tile, each "
                                   "nucleus kept whole by the block holding its centre), so memory follows the "
                                   "block, not the image; 0: every image whole")
    overlays: int = option(0, "write an overlay PNG for this many images (-1: all) for a person to look at")
    labels: str = option("", "Kaggle-layout folder or zip with masks: score the result locally")
    redo: bool = option(False, "recompute images whose outputs already exist (default: skip them)")
    measurements: bool = option(True, "measure every nucleus (area, shape, intensity on the original image) into "
                                      "OUTPUT/measurements/, a Parquet dataset")
    report: bool = option(True, "draw OUTPUT/report.png at the end of the run (counts, areas, failures, overlays)")
    nuclear_channel: str = option("", "the nuclear channel of multi-channel images (a name such as DAPI, or an index "
                                      "from 0; for RGB: red, green or blue); default: the channel whose name is a "
                                      "nuclear stain (DAPI, Hoechst, ...), else 0, said in the manifest")
    pixel_size: float = option(0.0, "micrometres per pixel, for the measurements' _um columns and the OME-TIFF "
                                    "export (0: each TIFF / OME-TIFF's own metadata, else unknown)")
    export: str = option("", "also write, beside each label image, comma-separated: geojson (QuPath detections with "
                             "the measurements), imagej-rois (a Fiji ROI set .zip), ome-tiff (the labels as OME-TIFF)")


def _add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        meta = item.metadata
        flag = meta.get("flag") or "--" + item.name.replace("_", "-")
        shown = "" if item.default is None else f" (default: {item.default!r})"  # None: the help says what applies
        help_text = f"{meta.get('help', '')}{shown}"
        kind = hints[item.name]
        if kind is bool:
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction,
                                default=item.default, help=help_text)
        else:
            parser.add_argument(flag, dest=item.name, type=kind, default=item.default,
                                choices=meta.get("choices"), help=help_text)


def parse_args(cls, argv=None, description: str = "", required: tuple[str, ...] = (), prog: str | None = None):
    """Parse a command line into a config dataclass instance; `required` names fields that must be given."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _add_arguments(parser, cls)
    parser.add_argument("--verbose", action="store_true",
                        help="also show TensorFlow's and Ray's own log lines (the console shows progress and results)")
    namespace = parser.parse_args(argv)
    preset = getattr(namespace, "preset", "")
    if preset:  # the preset's values become defaults, so flags given explicitly still override them
        parser.set_defaults(**TRAIN_PRESETS[preset])
        namespace = parser.parse_args(argv)
    for name in required:
        if not getattr(namespace, name):
            parser.error(f"--{name.replace('_', '-')} is required")
    if namespace.verbose:  # read where TensorFlow is imported and Ray started (pipeline.model.tfkeras, pipeline.data.datasets)
        os.environ.update(NUCLEI_VERBOSE="1", NUCLEI_RAY_LOGS="1")
    config = cls(**{key: value for key, value in vars(namespace).items() if key != "verbose"})
    if getattr(config, "image_size", 32) % 32:
        parser.error(f"--image-size must be a multiple of 32, got {config.image_size}")
    if getattr(config, "encoder_lr_scale", 0) < 0 or getattr(config, "frozen_encoder_epochs", 0) < 0:
        parser.error("--encoder-lr-scale and --frozen-encoder-epochs must be 0 or more")
    return config


@dataclass
class EvaluateConfig(SegmentConfig):
    """jobs/evaluate.py: segment a run's held-out images (test, tune or validation split) and score them."""

    data: str = option("", "Kaggle-layout folder or zip with masks (default: the data the run was trained on)")
    split: str = option("auto", "tune or test: the evaluation protocol's split (runs trained with --holdout protocol; "
                                "quote test, choose on tune); val: a --holdout random run's validation images; "
                                "all: every image; auto: test for protocol runs, else val",
                        choices=("auto", "tune", "test", "val", "all"))
    pictures: int = option(3, "write this many best and worst validation images as pictures (0: none)")


@dataclass
class ExportConfig:
    """jobs/export.py: a Keras model to ONNX (or a bioimage.io package of it), checked against TensorFlow before it is
    written."""

    model: str = option("dsb2018", "a shipped model's name or a model.keras path")
    output: str = option("", "file to write (default: model.onnx, its settings in a .json beside it; "
                             "NAME.bioimageio.zip with --format bioimageio)")
    format: str = option("onnx", "onnx: an ONNX file for ONNX Runtime and segment.py; bioimageio: a bioimage.io "
                                 "model package (ONNX weights, normalisation, test tensors, card) that deepImageJ, "
                                 "ilastik, QuPath and napari open, checked with bioimageio.core's test_model "
                                 "(pip install -e '.[bioimageio]')", choices=("onnx", "bioimageio"))
    check_images: str = option("", "images to compare TensorFlow and ONNX Runtime on (Kaggle folder/zip or image "
                                   "tree; default: the model's training data when present, else synthetic nuclei)")
    check_count: int = option(8, "how many of those images (whole, cut to a multiple of 32, at most --check-size)")
    check_size: int = option(512, "largest side of a check image in pixels (larger ones are cropped)")
    tolerance: float = option(1e-4, "refuse to write the export when a probability differs by more than this")


@dataclass
class TuneConfig:
    """jobs/tune.py: choose a run's inference settings on the protocol's tune split."""

    model: str = option("", "model.keras of a run trained with --holdout protocol")
    data: str = option("", "its training data (default: where its run.json says)")
    dry_run: bool = option(False, "write tuning.json only, leave run.json as it is")
    size_range: bool = option(False, "only measure the nucleus sizes the model trained on and store the size "
                                     "normalisation that zooms images outside them (run.json), every other setting "
                                     "kept; tuning stores it too")
    settings_from: str = option("", "copy the settings tuned for this run (model.keras of the same recipe trained "
                                    "with --holdout protocol) instead of tuning: for a --holdout refit model, "
                                    "which has trained on the tune split")
    predictions: str = option("plain,flips,flips+scales", "ways of predicting to compare (comma-separated): plain, "
                                                          "flips, flips+scales (0.8, 1, 1.25)")
    max_cost: float = option(1.5, "try only ways of predicting (size normalisation, flips, scales) that cost at most "
                                  "this many forward passes per image, plain prediction being 1, so that inference "
                                  "with the stored settings stays at least half as fast as plain (0: try all)")
    specialists: str = option("", "KIND=MODEL,...: route that kind of image (stained, bright-field, fluorescence) to "
                                  "a model fine-tuned for it (jobs/train.py --init-from --kinds), kept only if it "
                                  "beats this model on the kind's tune images; copied beside this model. With "
                                  "--settings-from: the refit's own specialists (the sibling's specialist recipe "
                                  "trained with --holdout refit --init-from this model) instead of the sibling's")


@dataclass
class PackageConfig:
    """jobs/package.py: ship a run's model under models/<name>/."""

    model: str = option("", "the run's model.keras")
    name: str = option("", "the shipped model's name (a folder under models/)")
    output: str = option("", "folder to write (default: models/<name>)")
    onnx: bool = option(False, "also export the model and its specialists to ONNX beside them, checked against "
                               "TensorFlow on its training images: CPU inference then runs ONNX Runtime (0.8x the "
                               "forward pass's time here, no TensorFlow import)")
