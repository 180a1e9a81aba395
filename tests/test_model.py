"""The U-Net: shapes at several sizes, backbone-weight choices, safe loading with clear errors."""
import json
import os

import numpy as np
import pytest

from pipeline.model.network import BackboneWeightsError, ModelFileError, build_unet, load_model, save_model
from tests.conftest import ROOT


@pytest.mark.parametrize("size, classes", [(128, 2), (256, 3)])
def test_output_shape(size, classes):
    model = build_unet(size, classes, "none", encoder_width=0.35)
    x = np.zeros((1, size, size, 3), np.float32)
    assert model.predict(x, verbose=0).shape == (1, size, size, classes)


def test_fully_convolutional_on_other_multiples_of_32():
    model = build_unet(64, 2, "none", encoder_width=0.35)
    assert model.predict(np.zeros((1, 96, 160, 3), np.float32), verbose=0).shape == (1, 96, 160, 2)


def test_imagenet_without_internet_fails_fast_naming_the_alternatives(monkeypatch):
    import time

    from pipeline.model.network import WEIGHTS_ENV

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)  # no local file to fall back to
    started = time.time()
    try:
        build_unet(128, 2, "imagenet")
    except BackboneWeightsError as error:
        assert "--backbone-weights none" in str(error) and "PATH" in str(error)
        assert time.time() - started < 60
    else:
        pytest.skip("this machine reached the internet and downloaded the ImageNet weights")


def test_local_weights_file_is_loaded(tmp_path):
    from pipeline.model.tfkeras import keras

    source = keras.applications.MobileNetV2(input_shape=(128, 128, 3), include_top=False, weights=None, alpha=0.35)
    path = str(tmp_path / "mobilenet_v2_no_top.h5")
    source.save_weights(path)
    model = build_unet(128, 2, path, encoder_width=0.35)
    kernel = model.get_layer("encoder").get_layer("Conv1").get_weights()[0]
    assert np.array_equal(kernel, source.get_layer("Conv1").get_weights()[0])
    with pytest.raises(BackboneWeightsError, match="not found"):
        build_unet(128, 2, str(tmp_path / "missing.h5"))


SHARED_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "weights",
                              "mobilenet_v2")


def test_local_imagenet_weights_are_found_by_width(tmp_path, monkeypatch):
    from pipeline.model.network import WEIGHTS_ENV, local_imagenet_weights

    for name in ("mobilenet_v2_1.0_no_top_imagenet.h5", "mobilenet_v2_0.35_no_top_imagenet.h5",
                 "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5", "mobilenet_v2_0.75_top.h5"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert local_imagenet_weights(1.0) == str(tmp_path / "mobilenet_v2_1.0_no_top_imagenet.h5")
    assert local_imagenet_weights(0.35) == str(tmp_path / "mobilenet_v2_0.35_no_top_imagenet.h5")
    assert local_imagenet_weights(0.5).endswith("kernels_0.5_224_no_top.h5")
    assert local_imagenet_weights(0.75) is None  # a classifier file (with top) is not an encoder
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "mobilenet_v2_1.0_no_top_imagenet.h5"))
    assert local_imagenet_weights(0.35) == str(tmp_path / "mobilenet_v2_1.0_no_top_imagenet.h5")  # a file: as named
    monkeypatch.delenv(WEIGHTS_ENV)
    assert local_imagenet_weights(1.0) is None


def test_auto_falls_back_to_the_local_imagenet_weights_then_to_random(tmp_path, monkeypatch, capsys):
    from pipeline.model.network import WEIGHTS_ENV
    from pipeline.model.tfkeras import keras

    if not os.path.isdir(SHARED_WEIGHTS):
        pytest.skip(f"ImageNet weights not found at {os.path.normpath(SHARED_WEIGHTS)} (a fresh checkout has no "
                    "../shared)")
    monkeypatch.setenv(WEIGHTS_ENV, SHARED_WEIGHTS)
    model = build_unet(128, 2, "auto", encoder_width=0.35)
    if "could not be downloaded" not in capsys.readouterr().out:
        pytest.skip("this machine reached the internet and downloaded Keras' own ImageNet weights")
    shared = keras.applications.MobileNetV2(input_shape=(None, None, 3), include_top=False, alpha=0.35,
                                            weights=os.path.join(SHARED_WEIGHTS, "mobilenet_v2_0.35_no_top_imagenet.h5"))
    for layer in ("Conv1", "block_16_project"):
        assert np.array_equal(model.get_layer("encoder").get_layer(layer).get_weights()[0],
                              shared.get_layer(layer).get_weights()[0])
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))  # no file for this width: one warning line, random weights
    build_unet(128, 2, "auto", encoder_width=0.35)
    warning = capsys.readouterr().out.splitlines()[-1]  # after Keras' own "Downloading data from ..." line
    assert warning.startswith("warning:") and "random initialisation" in warning and WEIGHTS_ENV in warning
    with pytest.raises(BackboneWeightsError, match=WEIGHTS_ENV):
        build_unet(128, 2, "imagenet", encoder_width=0.35)


def test_cross_entropy_dice_loss_is_cross_entropy_plus_one_minus_soft_dice():
    from pipeline.model.network import CrossEntropyDice

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (2, 8, 8, 1))
    logits = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    cross_entropy = -np.log(np.take_along_axis(probabilities, labels, -1)).mean()
    truth = np.eye(3)[labels[..., 0]]
    dice = [(2 * (probabilities[..., c] * truth[..., c]).sum() + 1) / ((probabilities[..., c] + truth[..., c]).sum() + 1)
            for c in (1, 2)]
    loss = float(CrossEntropyDice(3)(labels, logits))
    assert loss == pytest.approx(cross_entropy + 1 - np.mean(dice), rel=1e-4)
    perfect = np.where(np.eye(3)[labels[..., 0]] > 0, 20.0, -20.0).astype(np.float32)
    assert float(CrossEntropyDice(3)(labels, perfect)) < 1e-3 < loss


def test_a_model_compiled_with_the_dice_loss_saves_and_loads(tmp_path):
    from pipeline.model.network import CUSTOM_OBJECTS, compile_model
    from pipeline.model.tfkeras import keras

    model = compile_model(build_unet(64, 3, "none", encoder_width=0.35), 1e-3, 3, "ce+dice")
    x, y = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32), np.ones((2, 64, 64, 1), np.int32)
    model.run_eagerly = True  # one step: no need to trace the train step
    model.fit(x, y, epochs=1, verbose=0)
    model.run_eagerly = False
    path = str(tmp_path / "model.keras")
    save_model(model, path)
    restored = keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS, safe_mode=True)  # resume's load
    assert type(restored.loss).__name__ == "CrossEntropyDice"
    assert np.allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        compile_model(model, 1e-3, 3, "dice")


def test_the_encoder_steps_are_scaled_and_a_frozen_encoder_does_not_move(tmp_path):
    from pipeline.model.network import CUSTOM_OBJECTS, compile_model
    from pipeline.model.tfkeras import keras

    rng = np.random.default_rng(0)
    x, y = rng.random((4, 64, 64, 3)).astype(np.float32), rng.integers(0, 3, (4, 64, 64, 1))

    def one_step(scale):
        """How far one training step moves the encoder and the logits layer from the same start."""
        keras.utils.set_random_seed(1)
        model = build_unet(64, 3, "none", encoder_width=0.35, decoder_width=0.25)
        encoder, head = model.get_layer("encoder").trainable_weights, model.get_layer("logits").kernel
        before = [variable.numpy() for variable in encoder] + [head.numpy()]
        compiled = compile_model(model, 1e-2, 3, "ce+dice", scale)
        compiled.run_eagerly = True  # one step: the same update, without tracing the train step (a third of a minute)
        compiled.fit(x, y, epochs=1, batch_size=4, verbose=0)
        moved = [np.abs(variable.numpy() - start).sum() for variable, start in zip(encoder + [head], before)]
        return model, sum(moved[:-1]), moved[-1]

    _, encoder_moved, head_moved = one_step(None)
    for scale in (0.5, 0.0):
        model, encoder_scaled, head_scaled = one_step(scale)
        assert encoder_scaled == pytest.approx(scale * encoder_moved, rel=1e-3, abs=1e-6)
        assert head_scaled == pytest.approx(head_moved, rel=1e-5)  # the decoder steps as with plain Adam
    path = str(tmp_path / "model.keras")
    save_model(model, path)
    restored = keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS, safe_mode=True)  # resume's load
    assert type(restored.optimizer).__name__ == "EncoderScaledAdam"


def test_save_load_round_trip_and_mismatch_errors(tmp_path):
    model = build_unet(64, 2, "none", encoder_width=0.35)
    path = str(tmp_path / "model.keras")
    save_model(model, path)
    loaded, info = load_model(path)
    x = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
    assert np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    (tmp_path / "run.json").write_text(json.dumps({"num_classes": 3}))
    with pytest.raises(ModelFileError, match="predicts 2 classes"):
        load_model(path)
    (tmp_path / "run.json").unlink()
    (tmp_path / "fake.keras").write_text("not a model")
    with pytest.raises(ModelFileError, match="not a loadable Keras model"):
        load_model(str(tmp_path / "fake.keras"))
    with pytest.raises(ModelFileError, match="not found"):
        load_model(str(tmp_path / "nope.keras"))


def test_a_model_trained_with_a_removed_option_is_refused_in_one_line(tmp_path):
    """run.json files from before the dropped trials' options were removed record them: at their "off" values the
    model loads (models shipped until 2026-12-03 have such files); switched on, loading names the option."""
    from tests.test_config import OLD_OPTIONS_OFF

    path = str(tmp_path / "model.keras")
    save_model(build_unet(64, 3, "none", encoder_width=0.35), path)
    config = {"loss": "ce+dice", **OLD_OPTIONS_OFF}
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"num_classes": 3, "fine_head": 0, "config": config}))
    assert load_model(path)[1].config == config
    for change, named in (({"fine_head": 64}, "fine_head=64"),
                          ({"config": {**config, "loss": "ce+dice+lovasz"}}, "loss=ce+dice+lovasz"),
                          ({"config": {**config, "border": "touching"}}, "border=touching")):
        run.write_text(json.dumps({"num_classes": 3, "fine_head": 0, "config": config, **change}))
        with pytest.raises(ModelFileError) as refused:
            load_model(path)
        assert str(refused.value) == f"{run}: trained with {named}, an option this version no longer has; retrain it"


def test_decoder_width_shrinks_the_decoder_not_the_output():
    full = build_unet(64, 3, "none", encoder_width=0.35)
    half = build_unet(64, 3, "none", encoder_width=0.35, decoder_width=0.5)
    assert half.count_params() < 0.6 * full.count_params()
    x = np.zeros((2, 96, 64, 3), np.float32)
    assert half.predict(x, verbose=0).shape == full.predict(x, verbose=0).shape == (2, 96, 64, 3)


def test_a_model_with_code_in_it_is_refused(tmp_path):
    """Safe mode: a Lambda layer's Python code is never deserialised (it could run anything)."""
    from pipeline.model.tfkeras import keras

    inputs = keras.layers.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    path = str(tmp_path / "model.keras")
    save_model(model, path)
    with pytest.raises(ModelFileError, match="not a loadable Keras model"):
        load_model(path)


def test_epoch_augmentation_moves_mask_with_image_and_shuffles_only_colour():
    from pipeline.model.tfkeras import tf
    from pipeline.train.worker import epoch_augmentation

    image = np.zeros((16, 16, 3), np.float32)
    image[..., 0], image[..., 1], image[..., 2] = 0.9, 0.5, 0.1
    image[2:5, 3:9] += 0.05  # the nucleus, slightly brighter in every channel
    mask = np.zeros((16, 16, 1), np.uint8)
    mask[2:5, 3:9] = 2
    tf.random.set_seed(3)
    colours = set()
    for _ in range(60):
        out, out_mask = (value.numpy() for value in epoch_augmentation(tf.constant(image), tf.constant(mask), True))
        assert out_mask.sum() == mask.sum() and set(np.unique(out_mask)) == {0, 2}
        nucleus = out_mask[..., 0] > 0
        assert (out[nucleus].mean(axis=-1) > out[~nucleus].mean(axis=-1).max()).all()  # mask still on the nucleus
        colours.add(tuple(round(float(value), 2) for value in out[~nucleus][0]))
    assert (0.9, 0.5, 0.1) in colours and (0.5, 0.5, 0.5) in colours and len(colours) >= 4  # as is, grey, shuffled
    plain = {tuple(round(float(value), 2) for value in epoch_augmentation(tf.constant(image), tf.constant(mask))[0].numpy()[0, 0])
             for _ in range(10)}
    assert plain == {(0.9, 0.5, 0.1)}  # without colour: geometry only


def test_low_resolution_crops_are_what_inference_sees_of_a_half_size_image_and_keep_their_mask():
    """A coarse crop is the crop shrunk and zoomed back as OpenCV does it at inference; its mask stays sharp."""
    import cv2

    from pipeline.model.tfkeras import tf
    from pipeline.train.worker import epoch_augmentation, low_resolution

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.random((64, 64, 3)).astype(np.float32), (0, 0), 1.5)
    opencv = cv2.resize(cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA), (64, 64),
                        interpolation=cv2.INTER_LINEAR)
    assert np.abs(low_resolution(tf.constant(image), 0.5).numpy() - opencv).max() < 1e-5

    def detail(crop):  # mean difference between neighbouring pixels: fine structure
        return float(np.abs(np.diff(crop, axis=0)).mean() + np.abs(np.diff(crop, axis=1)).mean())

    mask = np.zeros((64, 64, 1), np.uint8)
    mask[10:30, 20:25] = 1
    tf.random.set_seed(5)
    sharp = [epoch_augmentation(tf.constant(image), tf.constant(mask)) for _ in range(8)]
    coarse = [epoch_augmentation(tf.constant(image), tf.constant(mask), coarse=1.0) for _ in range(8)]
    assert all(abs(detail(out.numpy()) - detail(image)) < 1e-6 for out, _ in sharp)  # only turned
    assert all(detail(out.numpy()) < 0.8 * detail(image) for out, _ in coarse)
    assert all(int(out_mask.numpy().sum()) == 100 for _, out_mask in coarse)  # outlines at full resolution
    tf.random.set_seed(5)
    shares = [detail(epoch_augmentation(tf.constant(image), tf.constant(mask), coarse=0.3)[0].numpy()) < 0.8 * detail(image)
              for _ in range(60)]
    assert 8 <= sum(shares) <= 30  # about 30% of the crops


def test_stain_jitter_changes_the_stains_of_coloured_crops_only():
    from pipeline.model.tfkeras import tf
    from pipeline.train.worker import STAIN_VECTORS, epoch_augmentation, stain_jitter

    # An inverted H&E crop: eosin-pink background, a haematoxylin-purple nucleus (light = exp(-density)).
    light = np.exp(-np.full((16, 16, 3), 0.3) * STAIN_VECTORS[1]).astype(np.float32)
    light[4:10, 4:10] = np.exp(-0.9 * STAIN_VECTORS[0] - 0.2 * STAIN_VECTORS[1])
    image = 1.0 - light
    same = stain_jitter(tf.constant(image), tf.ones(3), tf.zeros(3)).numpy()
    assert np.abs(same - image).max() < 1e-4  # no jitter: the same crop
    more_eosin = stain_jitter(tf.constant(image), tf.constant([1.0, 1.5, 1.0]), tf.zeros(3)).numpy()
    less_haematoxylin = stain_jitter(tf.constant(image), tf.constant([0.5, 1.0, 1.0]), tf.zeros(3)).numpy()
    assert np.allclose(more_eosin[0, 0], 1 - np.exp(-0.45 * STAIN_VECTORS[1]), atol=1e-4)
    assert less_haematoxylin[6, 6].sum() < image[6, 6].sum() and np.allclose(less_haematoxylin[0, 0], image[0, 0])
    grey = np.full((16, 16, 3), 0.3, np.float32)
    assert (stain_jitter(tf.constant(grey), tf.constant([1.5, 0.5, 1.0]), tf.constant([0.1, 0, 0])).numpy() == grey).all()
    mask = np.zeros((16, 16, 1), np.uint8)
    tf.random.set_seed(1)
    jittered = [epoch_augmentation(tf.constant(image), tf.constant(mask), stain=0.25)[0].numpy() for _ in range(5)]
    assert len({round(float(out.sum()), 3) for out in jittered}) == 5 and all(0 <= out.min() <= out.max() <= 1
                                                                                for out in jittered)


def test_a_kind_specialist_predicts_its_kind_of_image_and_travels_with_the_model(tmp_path):
    """run.json routes stained images to a specialist beside the model: Predictor, package and ONNX export agree."""
    from pipeline.io.images import normalise
    from pipeline.segment.predictor import Predictor, inspect_model
    from pipeline.model.network import package_model, save_for_inference
    from pipeline.model.onnx import export_onnx
    from pipeline.model.registry import ModelFileError
    from pipeline.model.runinfo import RunInfo
    from pipeline.model.tfkeras import tf
    from pipeline.train.specialists import attach_specialists

    paths = {}
    for seed, name in ((1, "general"), (2, "stained")):
        run = tmp_path / name
        run.mkdir()
        tf.random.set_seed(seed)
        save_for_inference(build_unet(64, 3, "none", encoder_width=0.35, decoder_width=0.25), str(run / "model.keras"))
        (run / "run.json").write_text(json.dumps({"mode": "native", "num_classes": 3, "image_size": 64,
                                                  "postprocess": {"threshold": 0.6}}))
        paths[name] = str(run / "model.keras")
    info = RunInfo.read(str(tmp_path / "general" / "run.json"))
    info.postprocess.specialists = attach_specialists(paths["general"], info, {"stained": paths["stained"]})
    info.write(str(tmp_path / "general" / "run.json"))
    written = json.loads((tmp_path / "general" / "run.json").read_text())
    assert written["postprocess"] == {"threshold": 0.6, "specialists": {"stained": "specialist-stained.keras"}}
    assert "specialist-stained.keras" in written["sha256"]

    rgb = np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)  # an image as read
    image = normalise(rgb)  # as the model sees it (its look: as is)
    alone = {name: Predictor(path, batch_size=1, threads=1).predict_whole(image) for name, path in paths.items()}
    assert not np.allclose(alone["general"], alone["stained"], atol=1e-3)
    routed = Predictor(paths["general"], batch_size=1, threads=1)
    np.testing.assert_allclose(routed.predict_whole(image, "stained"), alone["stained"], atol=1e-6)
    np.testing.assert_allclose(routed.predict_whole(image, "fluorescence"), alone["general"], atol=1e-6)
    column = np.empty(2, dtype=object)  # a ragged column, as Ray Data gives images of any size
    column[0], column[1] = rgb, rgb
    batch = {"image": column, "ok": np.array([True, True]),
             "image_kind": np.array(["stained", "bright-field"])}
    out = routed(batch)["probabilities"]
    np.testing.assert_allclose(out[0], alone["stained"], atol=1e-3)  # float16 in the batch
    np.testing.assert_allclose(out[1], alone["general"], atol=1e-3)

    shipped = tmp_path / "shipped"
    package_model(paths["general"], str(shipped))
    np.testing.assert_allclose(Predictor(str(shipped / "model.keras"), 1, 1).predict_whole(image, "stained"),
                               alone["stained"], atol=1e-6)
    exported = export_onnx(str(shipped / "model.keras"), str(tmp_path / "nuclei.onnx"), [image[:64]])
    assert exported["specialists"] == [str(tmp_path / "nuclei.stained.onnx")]
    np.testing.assert_allclose(Predictor(str(tmp_path / "nuclei.onnx"), 1, 1).predict_whole(image, "stained"),
                               alone["stained"], atol=1e-4)

    with open(shipped / "specialist-stained.keras", "ab") as stream:  # a changed specialist is refused
        stream.write(b"\0")
    with pytest.raises(ModelFileError, match="sha256 differs"):
        Predictor(str(shipped / "model.keras"), 1, 1)
    with pytest.raises(ModelFileError, match="sha256 differs"):  # and by the driver's check, which loads nothing
        inspect_model(str(shipped / "model.keras"))
    info.postprocess.specialists = {"stained": "../stained/model.keras"}  # outside the model's folder
    info.write(str(tmp_path / "general" / "run.json"))
    with pytest.raises(ModelFileError, match="a file beside the model"):
        Predictor(paths["general"], 1, 1)


def test_the_shipped_model_is_checked_without_loading_tensorflow():
    """A packaged model (run.json records its sha256, classes and input size) is checked by its hash on the driver:
    a run that only schedules never imports TensorFlow (4 s); any other file is loaded to check it."""
    import subprocess
    import sys

    check = ("import sys; from pipeline.model.registry import resolve_model; "
             "from pipeline.segment.predictor import inspect_model; "
             "info = inspect_model(resolve_model('dsb2018')); "
             "print(info.num_classes, info.image_size, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.split() == ["3", "128", "False"]
