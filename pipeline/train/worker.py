"""What every Ray Train worker runs (TensorFlow, imported at the top: only workers and a training driver load this
module): the model built, fine-tuned or resumed under MultiWorkerMirroredStrategy, its shard of the data with the
per-epoch augmentation, Keras' fit with the project's callbacks, and the final checkpoint."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import ray
import ray.train

from pipeline.config import TrainConfig
from pipeline.io.fileio import write_text_atomic
from pipeline.model.network import CUSTOM_OBJECTS, build_unet, compile_model, load_model
from pipeline.model.tfkeras import keras, tf
from pipeline.train.callbacks import make_callbacks, report_checkpoint
from pipeline.train.files import BACKBONE_FILE, say, send_output_to_log, truncate_history
from pipeline.train.schedule import encoder_scale

CHECKPOINT_PREFIX = "epoch_"
FINAL_CHECKPOINT = "final"
# Haematoxylin, eosin and DAB optical densities of one unit of each stain (Ruifrok & Johnston 2001, as
# skimage.color.rgb_from_hed), rows normalised; their inverse turns a pixel's optical density into stain amounts.
STAIN_VECTORS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
STAIN_VECTORS = STAIN_VECTORS / np.linalg.norm(STAIN_VECTORS, axis=1, keepdims=True)


def stain_jitter(image, scale, shift, min_colour: float = 0.04):
    """A stained crop as if its haematoxylin / eosin / DAB amounts were each multiplied by `scale` and shifted by
    `shift` (optical density); crops with no colour (fluorescence, grey) come back unchanged.

    The crops are the model's `colour` appearance, inverted (nuclei bright), so the light reaching the camera
    is 1 - value. Stain-space colour augmentation (Tellez et al. 2018, 2019: "HED" jitter) imitates how H&E
    staining varies between labs (the variation between DSB2018's stained images), unlike a channel shuffle.
    """
    light = tf.clip_by_value(1.0 - image, 1.0 / 255.0, 1.0)
    density = -tf.math.log(light)
    stains = tf.constant(STAIN_VECTORS, tf.float32)
    amounts = tf.einsum("...c,cs->...s", density, tf.constant(np.linalg.inv(STAIN_VECTORS), tf.float32))
    amounts = amounts * scale + shift
    jittered = 1.0 - tf.exp(-tf.einsum("...s,sc->...c", amounts, stains))
    coloured = tf.reduce_mean(tf.abs(image - tf.reduce_mean(image, axis=-1, keepdims=True))) > min_colour
    return tf.where(coloured, tf.clip_by_value(jittered, 0.0, 1.0), image)


def low_resolution(image, factor):
    """A crop as a camera `factor` times coarser would have seen it, zoomed back to its size: shrunk by area
    averaging, enlarged bilinearly (how a half-magnification image reaches the model once inference's size
    normalisation has zoomed it x2: cv2's INTER_AREA then INTER_LINEAR)."""
    size = tf.shape(image)[:2]
    small = tf.maximum(1, tf.cast(tf.round(tf.cast(size, tf.float32) * factor), tf.int32))
    return tf.image.resize(tf.image.resize(image, small, method="area"), size, method="bilinear")


def epoch_augmentation(image, mask, colour: bool = False, stain: float = 0.0, coarse: float = 0.0):
    """A fresh random flip and 90-degree turn of a training crop every epoch (image and mask alike).

    With `colour`, also a random channel order (half the crops) and grey (one in five) for the image alone:
    DSB2018's 1st place found channel shuffle and colour/grey remapping "very important" for stained tissue,
    so the model learns nuclei by their contrast with their surroundings rather than one stain's hue.
    `stain` > 0: each stain's amount scaled by 1 +- stain and shifted by +- stain / 4 (see stain_jitter).
    `coarse` > 0: that share of the crops shown at 0.4-0.7x their resolution and zoomed back (low_resolution), the
    mask kept at full resolution, so nuclei imaged at half the training magnification keep their outlines.
    """
    both = tf.concat([image, tf.cast(mask, image.dtype)], axis=-1)
    both = tf.image.random_flip_left_right(both)
    both = tf.image.rot90(both, tf.random.uniform([], 0, 4, dtype=tf.int32))
    image, mask = both[..., :3], tf.cast(both[..., 3:], mask.dtype)
    if colour:
        order = tf.where(tf.random.uniform([]) < 0.5, tf.random.shuffle(tf.range(3)), tf.range(3))
        image = tf.gather(image, order, axis=-1)
        grey = tf.repeat(tf.reduce_mean(image, axis=-1, keepdims=True), 3, axis=-1)
        image = tf.where(tf.random.uniform([]) < 0.2, grey, image)
    if stain > 0:
        image = stain_jitter(image, tf.random.uniform([3], 1.0 - stain, 1.0 + stain),
                             tf.random.uniform([3], -stain / 4, stain / 4))
    if coarse > 0:
        image = tf.cond(tf.random.uniform([]) < coarse,
                        lambda: low_resolution(image, tf.random.uniform([], 0.4, 0.7)), lambda: image)
    return image, mask


def train_loop_per_worker(loop_config: dict) -> None:
    """Body run by every Ray Train worker: MWMS scope, model, shards of the data, fit, final report."""
    config = TrainConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    send_output_to_log(config.output, rank)
    say(config.output, f"worker rank {rank} of {world} on node {ray.get_runtime_context().get_node_id()[:12]} "
                       f"({os.uname().nodename})")
    keras.utils.set_random_seed(config.seed)
    # One worker has nothing to all-reduce, and any tf.distribute strategy doubles the CPU step time here
    # (measured with TF 2.21: 17 s vs 8.6 s per epoch for the same fit), so it trains under the default one.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()

    model, state = _model_and_state(config, rank, strategy)
    train_data, val_data, sizes = _worker_datasets(config, rank, strategy)

    def steps(name: str) -> int:
        return max(1, math.ceil(sizes[name] / config.batch_size))  # Ray splits equally: same on every worker

    snapshots = loop_config.get("snapshots") or {}
    callbacks, early_stopping = make_callbacks(
        config, rank, world, state, snapshots.get("image"), snapshots.get("mask"), train_rows=sizes["train"],
        deadline=float(loop_config.get("deadline") or 0.0),
        reserved_epochs=float(loop_config.get("reserved_epochs") or 0.0), checkpoint_prefix=CHECKPOINT_PREFIX)
    initial_epoch = int(state.get("epoch", 0))
    if initial_epoch < config.epochs:
        model.fit(train_data, validation_data=val_data, epochs=config.epochs,
                  steps_per_epoch=steps("train"), validation_steps=steps("val"), initial_epoch=initial_epoch,
                  callbacks=callbacks, verbose=2 if rank == 0 else 0)
    elif state.get("best_weights") is not None:
        model.set_weights(state["best_weights"])
    final = {"final": 1, "epoch": initial_epoch if initial_epoch >= config.epochs else early_stopping_epoch(model),
             "best_epoch": int(early_stopping.best_epoch) + 1, "best_val_loss": float(early_stopping.best)}
    report_checkpoint(model, final, FINAL_CHECKPOINT, {"epoch": config.epochs, "final": True}, None, rank)


def _model_and_state(config: TrainConfig, rank: int, strategy) -> tuple[keras.Model, dict]:
    """The model in the strategy's scope: resumed from Ray Train's last checkpoint (with its epoch and best weights),
    else the --init-from model's weights (fine-tuning), else a new U-Net; and the training state it resumes."""
    state: dict = {}
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as folder:
                model = keras.models.load_model(os.path.join(folder, "model.keras"), custom_objects=CUSTOM_OBJECTS,
                                                safe_mode=True)
                with open(os.path.join(folder, "state.json"), encoding="utf-8") as stream:
                    state = json.load(stream)
                if hasattr(model.optimizer, "scale_encoder"):
                    model.optimizer.scale_encoder(model.get_layer("encoder").trainable_weights)
                best_path = os.path.join(folder, "best_weights.npz")
                if os.path.exists(best_path):
                    with np.load(best_path) as saved:
                        state["best_weights"] = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            if rank == 0:
                say(config.output, f"resuming from the checkpoint of epoch {state.get('epoch', 0)}")
        elif config.init_from:  # fine-tuning: the given model's weights are the starting point
            model = compile_model(load_model(config.init_from)[0], config.learning_rate, config.num_classes,
                                  config.loss, encoder_scale(config))
        else:
            model = compile_model(build_unet(config.image_size, config.num_classes, config.backbone_weights,
                                             config.encoder_width, config.freeze_encoder, config.bn_momentum,
                                             decoder_width=config.decoder_width),
                                  config.learning_rate, config.num_classes, config.loss, encoder_scale(config))
            if rank == 0:  # where the encoder's weights came from, for run.json (the driver cannot tell)
                write_text_atomic(os.path.join(os.path.abspath(config.output), BACKBONE_FILE),
                                  json.dumps({"backbone_init": model.backbone_source}))
    if rank == 0:  # epochs after the checkpoint (all of them when a replaced worker group starts over) are redone
        truncate_history(config.output, int(state.get("epoch", 0)))
    return model, state


def _worker_datasets(config: TrainConfig, rank: int, strategy) -> tuple[object, object, dict[str, int]]:
    """This worker's train and validation shards as distributed tf.data datasets (train shuffled and augmented each
    epoch), and their sizes in crops."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF

    def shard(name: str, shuffle: bool):
        """This worker's Ray Data shard, read once into memory, as a distributed dataset of per-worker batches.

        Reading the shard once avoids a Ray Data epoch barrier inside every Keras epoch (prefetching
        across it can deadlock the workers); going through distribute_datasets_from_function stops
        Keras from re-batching each worker's batches as global ones (an empty split batch: NaN loss).
        The rows are `normalise`d uint8 images, so they are held as uint8 (a quarter of the memory) and turned
        back into exactly the same floats as they are batched.
        """
        columns = {"image": [], "mask": []}
        for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="numpy"):
            columns["image"].append(np.round(batch["image"] * 255.0).astype(np.uint8))
            columns["mask"].append(batch["mask"])
        images, masks = np.concatenate(columns["image"]), np.concatenate(columns["mask"])
        sizes[name] = len(images)

        def make(_context):
            dataset = tf.data.Dataset.from_tensor_slices((images, masks))
            if shuffle:
                dataset = dataset.shuffle(len(images), seed=config.seed + rank, reshuffle_each_iteration=True)
            dataset = dataset.map(as_floats, num_parallel_calls=tf.data.AUTOTUNE)
            if shuffle and config.augment:
                dataset = dataset.map(flip_and_turn, num_parallel_calls=tf.data.AUTOTUNE)
            dataset = dataset.batch(config.batch_size)
            if config.num_classes == 3 and config.border_weight != 1.0:
                dataset = dataset.map(with_class_weights)
            return dataset.repeat().prefetch(2).with_options(options)

        return strategy.distribute_datasets_from_function(make)

    def as_floats(image, mask):
        return tf.cast(image, tf.float32) * (1.0 / 255.0), mask  # pipeline.io.images.normalise, bit for bit

    def flip_and_turn(image, mask):
        return epoch_augmentation(image, mask, config.colour_augment, config.stain_augment, config.low_resolution)

    class_weights = tf.constant([1.0, 1.0, config.border_weight], tf.float32)

    def with_class_weights(image, mask):
        return image, mask, tf.gather(class_weights, tf.cast(mask[..., 0], tf.int32))

    sizes: dict[str, int] = {}
    train_data, val_data = shard("train", True), shard("val", False)
    return train_data, val_data, sizes


def early_stopping_epoch(model) -> int:
    history = getattr(model, "history", None)
    epochs = getattr(history, "epoch", None) or [0]
    return int(epochs[-1]) + 1
