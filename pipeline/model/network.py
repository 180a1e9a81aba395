"""U-Net with a MobileNetV2 encoder (the TensorFlow segmentation tutorial's design), in tf-keras.

Encoder: Keras' MobileNetV2 without its top; skips at block_1/3/6/13_expand_relu, bottleneck at
block_16_project. Decoder: pix2pix upsample blocks concatenated with the skips, then a transposed
convolution to per-pixel logits. Inputs are RGB in [0, 1]; the model rescales to MobileNetV2's [-1, 1].
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

from pipeline.model.registry import (ModelFileError, info_path as _info_path, read_model_info, resolve_model, sha256_of,
                               specialist_files)
from pipeline.model.runinfo import RunInfo
from pipeline.model.tfkeras import keras, tf

__all__ = ["ModelFileError", "build_unet", "load_model", "save_model", "save_for_inference"]

SKIP_LAYERS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu",
               "block_13_expand_relu", "block_16_project")
DECODER_FILTERS = (512, 256, 128, 64)


class BackboneWeightsError(RuntimeError):
    """The requested encoder weights cannot be loaded; the message says what to use instead."""


def upsample(filters: int, size: int, dropout: bool = False, name: str | None = None) -> keras.Sequential:
    """pix2pix decoder block: Conv2DTranspose (stride 2) -> BatchNorm -> optional Dropout -> ReLU.

    Written here because tensorflow_examples (where the tutorial takes it from) is not on PyPI.
    """
    block = keras.Sequential(name=name)
    block.add(keras.layers.Conv2DTranspose(filters, size, strides=2, padding="same", use_bias=False,
                                           kernel_initializer=keras.initializers.RandomNormal(0.0, 0.02)))
    block.add(keras.layers.BatchNormalization())
    if dropout:
        block.add(keras.layers.Dropout(0.5))
    block.add(keras.layers.ReLU())
    return block


WEIGHTS_ENV = "NUCLEI_BACKBONE_WEIGHTS"


def local_imagenet_weights(alpha: float) -> str | None:
    """The ImageNet encoder file that $NUCLEI_BACKBONE_WEIGHTS names for this width: the variable holds a
    weights file, or a folder of `*_<alpha>_*no_top*.h5` files, alpha as Keras writes it (1.0, 0.35)."""
    named = os.environ.get(WEIGHTS_ENV, "")
    if not named:
        return None
    if os.path.isfile(named):
        return named
    if os.path.isdir(named):
        for name in sorted(os.listdir(named)):
            if name.endswith(".h5") and "no_top" in name and f"_{float(alpha)}_" in name:  # Keras' naming too
                return os.path.join(named, name)
    return None


def _from_file(shape, weights: str, alpha: float) -> tuple[keras.Model, str]:
    if not os.path.isfile(weights):
        raise BackboneWeightsError(f"backbone weights file not found: {weights}")
    try:
        model = keras.applications.MobileNetV2(input_shape=shape, include_top=False, weights=weights, alpha=alpha)
    except (ValueError, OSError) as error:
        raise BackboneWeightsError(f"cannot load backbone weights from {weights}: "
                                   f"{str(error).splitlines()[0]}") from None
    return model, f"{os.path.basename(weights)} (sha256 {sha256_of(weights)})"  # no machine path in run.json


def _encoder(image_size: int, weights: str, alpha: float) -> tuple[keras.Model, str]:
    """MobileNetV2 without top; `weights` is 'imagenet', 'none', 'auto' or a local weights file.

    imagenet / auto: Keras' own download (or its cache), else the local file $NUCLEI_BACKBONE_WEIGHTS names for
    this width, else an error (imagenet) or one warning line and random initialisation (auto). Returns the encoder
    and where its weights came from, for run.json."""
    shape = (None, None, 3)  # fully convolutional: any multiple of 32 at inference
    if weights == "none":
        return keras.applications.MobileNetV2(input_shape=shape, include_top=False, weights=None, alpha=alpha), "none"
    if weights not in ("imagenet", "auto"):
        return _from_file(shape, weights, alpha)
    try:
        # Without fixed rows/cols Keras would take the 224-pixel weights; the encoder's shapes suit any size.
        base = keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3), include_top=False,
                                              weights="imagenet", alpha=alpha)
        encoder = keras.applications.MobileNetV2(input_shape=shape, include_top=False, weights=None, alpha=alpha)
        encoder.set_weights(base.get_weights())
        return encoder, "imagenet (Keras' download)"
    except Exception as error:  # noqa: BLE001 - a download failure surfaces as many exception types
        reason = str(error).splitlines()[0][:200]
    local = local_imagenet_weights(alpha)
    if local:
        print(f"ImageNet weights for MobileNetV2 could not be downloaded; using {local} (${WEIGHTS_ENV})", flush=True)
        return _from_file(shape, local, alpha)
    message = (f"ImageNet weights for MobileNetV2 (alpha {alpha:g}) could not be downloaded ({reason}) and "
               f"${WEIGHTS_ENV} names no file for this width; set it to a mobilenet_v2 *_no_top.h5 file or "
               "its folder, or use --backbone-weights PATH, or --backbone-weights none (random initialisation)")
    if weights == "imagenet":
        raise BackboneWeightsError(message)
    print(f"warning: {message}; falling back to random initialisation", flush=True)
    return keras.applications.MobileNetV2(input_shape=shape, include_top=False, weights=None, alpha=alpha), "none"


def build_unet(image_size: int = 128, num_classes: int = 2, backbone_weights: str = "none",
               encoder_width: float = 1.0, freeze_encoder: bool = False, bn_momentum: float | None = 0.9,
               input_size: int | None = None, decoder_width: float = 1.0) -> keras.Model:
    """The segmentation model: per-pixel logits of shape (H, W, num_classes).

    `image_size` (a multiple of 32) shapes the encoder; `input_size=None` makes the built model accept any
    multiple of 32 (fully convolutional), which native-resolution inference uses.
    `decoder_width` scales the decoder's filters (512, 256, 128, 64): the decoder holds most of the
    computation at encoder width 0.5, so 0.5 trains about 1.4x as fast on a CPU (measured).
    `bn_momentum` replaces MobileNetV2's 0.999: from random init its moving statistics otherwise lag by
    ~1000 steps and validation predicts only background for the first epochs.
    """
    if image_size % 32:
        raise ValueError(f"image size must be a multiple of 32, got {image_size}")
    base, source = _encoder(image_size, backbone_weights, encoder_width)
    encoder = keras.Model(base.input, [base.get_layer(name).output for name in SKIP_LAYERS], name="encoder")
    encoder.trainable = not freeze_encoder
    widths = [max(8, int(round(filters * decoder_width))) for filters in DECODER_FILTERS]
    decoder = [upsample(filters, 3, name=f"up_{index}_{filters}") for index, filters in enumerate(widths)]

    inputs = keras.layers.Input(shape=(input_size, input_size, 3) if input_size else (None, None, 3), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_mobilenet_range")(inputs)
    skips = encoder(x)
    x = skips[-1]
    for block, skip in zip(decoder, reversed(skips[:-1])):
        x = block(x)
        x = keras.layers.Concatenate()([x, skip])
    logits = keras.layers.Conv2DTranspose(num_classes, 3, strides=2, padding="same", name="logits")(x)
    model = keras.Model(inputs, logits, name="unet_mobilenetv2")
    model.backbone_source = source  # where the encoder's weights came from (not saved with the model)
    if bn_momentum is not None:
        for layer in _all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    return model


def _all_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


class NucleusIoU(keras.metrics.IoU):
    """IoU of the nucleus classes (1 and above) against background, from logits and sparse labels."""

    def __init__(self, num_classes: int = 2, name: str = "nucleus_iou", **kwargs):
        kwargs.pop("target_class_ids", None)
        kwargs.pop("sparse_y_pred", None)
        super().__init__(num_classes=2, target_class_ids=[1], name=name, sparse_y_pred=True, **kwargs)
        self.model_classes = num_classes

    def update_state(self, y_true, y_pred, sample_weight=None):
        nucleus_true = tf.cast(y_true > 0, tf.int32)
        nucleus_pred = tf.cast(tf.argmax(y_pred, axis=-1) > 0, tf.int32)
        return super().update_state(nucleus_true, nucleus_pred, sample_weight)

    def get_config(self):
        return {"num_classes": self.model_classes, "name": self.name}


class NucleusDice(NucleusIoU):
    """Dice coefficient (F1) of the nucleus pixels: 2*IoU / (1 + IoU) over the whole evaluation."""

    def __init__(self, num_classes: int = 2, name: str = "nucleus_dice", **kwargs):
        super().__init__(num_classes=num_classes, name=name, **kwargs)

    def result(self):
        iou = super().result()
        return 2.0 * iou / (1.0 + iou)


def _class_labels(y_true):
    """[B, H, W] int32 class labels from a target batch shaped [B, H, W] or [B, H, W, 1]."""
    y_true = tf.convert_to_tensor(y_true)
    return tf.cast(tf.squeeze(y_true, -1) if y_true.shape.rank == 4 else y_true, tf.int32)


class CrossEntropyDice(keras.losses.Loss):
    """Per-pixel cross-entropy plus (1 - soft Dice) of each nucleus class over the batch (DSB2018 1st place).

    selimsef/dsb2018_topcoders trained on softmax cross-entropy + soft Dice: the Dice term weighs every
    nucleus pixel of a batch as one set, so small nuclei and the rare border class count more than in
    cross-entropy alone. The Dice term is a batch scalar added to every pixel's cross-entropy, so the
    border class weight (a per-pixel sample weight) scales it by the batch's mean pixel weight as well.
    """

    def __init__(self, num_classes: int = 3, dice_weight: float = 1.0, name: str = "ce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.dice_weight = num_classes, dice_weight

    def call(self, y_true, y_pred):
        labels = _class_labels(y_true)
        cross_entropy = tf.keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
        probabilities = tf.nn.softmax(y_pred, axis=-1)[..., 1:]
        truth = tf.one_hot(labels, self.num_classes, dtype=probabilities.dtype)[..., 1:]
        overlap = tf.reduce_sum(probabilities * truth, axis=(0, 1, 2))
        total = tf.reduce_sum(probabilities + truth, axis=(0, 1, 2))
        dice = (2.0 * overlap + 1.0) / (total + 1.0)
        return cross_entropy + self.dice_weight * (1.0 - tf.reduce_mean(dice))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dice_weight": self.dice_weight}


class EncoderScaledAdam(keras.optimizers.Adam):
    """Adam whose steps for the encoder's variables are scaled by `encoder_scale` (0: held fixed), so pretrained
    features move slower than the new decoder; a callback sets the scale each epoch (a frozen warm-up, then less).

    The step is Adam's own, scaled after the fact: Adam divides out any scale of the gradient, so the gradient
    cannot carry it. `scale_encoder(variables)` names the encoder's variables (again after loading a checkpoint).
    """

    def __init__(self, learning_rate=1e-3, encoder_scale: float = 1.0, name: str = "EncoderScaledAdam", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.encoder_scale = tf.Variable(float(encoder_scale), trainable=False, dtype=tf.float32,
                                         name="encoder_scale")
        self._encoder_keys: set = set()

    def scale_encoder(self, variables) -> "EncoderScaledAdam":
        self._encoder_keys = {self._var_key(variable) for variable in variables}
        return self

    def update_step(self, gradient, variable):
        if self._var_key(variable) not in self._encoder_keys:
            return super().update_step(gradient, variable)
        before = tf.identity(variable)
        super().update_step(gradient, variable)
        variable.assign(before + tf.cast(self.encoder_scale, variable.dtype) * (variable - before))

    def get_config(self):
        return {**super().get_config(), "encoder_scale": float(self.encoder_scale.numpy())}


CUSTOM_OBJECTS = {"NucleusIoU": NucleusIoU, "NucleusDice": NucleusDice, "CrossEntropyDice": CrossEntropyDice,
                  "EncoderScaledAdam": EncoderScaledAdam}
_LOSS_MAKERS = {"ce": lambda classes: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                "ce+dice": CrossEntropyDice}
LOSSES = tuple(_LOSS_MAKERS)


def compile_model(model: keras.Model, learning_rate: float, num_classes: int, loss: str = "ce",
                  encoder_scale: float | None = None) -> keras.Model:
    """Adam and the chosen loss on logits: 'ce' (sparse categorical cross-entropy) or 'ce+dice'. With
    `encoder_scale`, the encoder's steps are scaled (EncoderScaledAdam)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    optimizer = keras.optimizers.Adam(learning_rate)
    if encoder_scale is not None:
        optimizer = EncoderScaledAdam(learning_rate, encoder_scale).scale_encoder(
            model.get_layer("encoder").trainable_weights)
    model.compile(optimizer=optimizer,
                  loss=_LOSS_MAKERS[loss](num_classes),
                  metrics=["accuracy", NucleusIoU(num_classes), NucleusDice(num_classes)])
    return model


def save_model(model: keras.Model, path: str) -> None:
    """Save as the Keras v3 `.keras` format (explicit: tf-keras in a non-main thread would write HDF5)."""
    model.save(path, save_format="keras_v3")


def _load_for_inference(path: str) -> keras.Model:
    """What keras.models.load_model(path, compile=False, safe_mode=True) does, ~8x faster.

    tf-keras reads the weights through h5py *inside* the zip, and Python 3.11's zipfile answers every
    backward seek by reading the member again from its start (22 s for an 80 MB model here); the weights
    are copied out to a temporary file first, then loaded in one pass.
    """
    from tf_keras.src.saving import saving_lib

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        config["compile_config"] = None
        with tempfile.TemporaryDirectory(prefix="model-") as folder:
            weights = os.path.join(folder, "model.weights.h5")
            with archive.open("model.weights.h5") as source, open(weights, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
            previous = getattr(saving_lib._SAVING_V3_ENABLED, "value", False)
            saving_lib._SAVING_V3_ENABLED.value = True  # as load_model sets it: nested layers in the v3 format
            try:
                with saving_lib.ObjectSharingScope():
                    model = keras.saving.deserialize_keras_object(config, custom_objects=CUSTOM_OBJECTS,
                                                                  safe_mode=True)
            finally:
                saving_lib._SAVING_V3_ENABLED.value = previous
            model.load_weights(weights)
    return model


def save_for_inference(model: keras.Model, path: str) -> None:
    """Weights and architecture only (no optimizer state): what a shipped model needs, a third of the size."""
    bare = keras.Model(model.inputs, model.outputs, name=model.name)  # same layers, never compiled: no optimizer
    bare.save(path, save_format="keras_v3")


def _replace_with_inference_model(model: keras.Model, path: str) -> None:
    """save_for_inference into a partial file renamed over `path`: a reader never sees half a model."""
    save_for_inference(model, path + ".partial.keras")
    os.replace(path + ".partial.keras", path)


def load_model(path: str) -> tuple[keras.Model, RunInfo]:
    """Load `model.keras` (or a shipped model's name) for inference in Keras' safe mode plus its run.json.

    Checks the file against the sha256 in run.json when there is one, and that file and run.json agree; the
    number of classes and the input size run.json lacks are the model's.
    """
    path = resolve_model(path)
    info = read_model_info(path)
    info_path = _info_path(path)
    try:
        model = _load_for_inference(path)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a file that is not a model
        raise ModelFileError(f"{path} is not a loadable Keras model: {str(error).splitlines()[0][:200]}") from None
    classes = int(model.output_shape[-1])
    if info.num_classes not in (None, classes):
        raise ModelFileError(f"{path} predicts {classes} classes but {info_path} says {info.num_classes}")
    size = model.input_shape[1]
    if size is not None and info.image_size not in (None, size):
        raise ModelFileError(f"{path} takes {size}x{size} inputs but {info_path} says {info.image_size}")
    if info.num_classes is None:
        info.num_classes = classes
    if info.image_size is None:
        info.image_size = size or 128
    return model, info


def _holds_weights(path: str, model) -> bool:
    """Whether the model file at `path` exists and has exactly `model`'s weights."""
    if not os.path.isfile(path):
        return False
    try:
        existing, _ = load_model(path)
    except Exception:  # noqa: BLE001 - unreadable or refused: it is replaced
        return False
    mine, theirs = model.get_weights(), existing.get_weights()
    return len(mine) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(mine, theirs))


def package_model(model_path: str, folder: str) -> RunInfo:
    """Copy a run's model into `folder` as a shipped model: inference-only weights, run.json with their sha256.

    The run's tuning.json (how its inference settings were chosen) travels with it when there is one. Returns the
    run.json written.
    """
    model, info = load_model(model_path)
    specialists = specialist_files(model_path, info)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "model.keras")
    if not _holds_weights(target, model):  # a settings-only re-package keeps the file's bytes (and sha256)
        _replace_with_inference_model(model, target)
    info.model, info.packaged_from = "model.keras", os.path.relpath(model_path)
    info.sha256 = {"model.keras": sha256_of(target)}
    for path in specialists.values():  # kind specialists travel with it, as lean copies
        specialist, name = load_model(path)[0], os.path.basename(path)
        if not _holds_weights(os.path.join(folder, name), specialist):
            _replace_with_inference_model(specialist, os.path.join(folder, name))
        info.sha256[name] = sha256_of(os.path.join(folder, name))
    info.write(os.path.join(folder, "run.json"))
    tuning = os.path.join(os.path.dirname(model_path), "tuning.json")
    if os.path.isfile(tuning):
        shutil.copyfile(tuning, os.path.join(folder, "tuning.json"))
    return info


def open_forward(path: str, threads: int, use_gpu: bool = False) -> tuple[RunInfo, int, object]:
    """(run.json, classes, images -> softmax probabilities) of a model.keras, its TensorFlow limited to `threads`
    intra-op threads when it is not running yet (a plain loop keeps its own). `use_gpu`: TensorFlow's own choice."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already running in this process (a plain loop): keep its threads
        pass
    keras_model, info = load_model(path)
    softmax = tf.function(lambda x: tf.nn.softmax(keras_model(x, training=False), axis=-1), reduce_retracing=True)
    return info, int(keras_model.output_shape[-1]), lambda images: softmax(images).numpy()


def checked_info(path: str) -> RunInfo:
    """A model.keras loaded once to check it (sha256, classes, input size): its run.json settings."""
    return load_model(path)[1]
