"""For labs: per-nucleus measurements, labels past 65,535, the run report, shipped models and their checksum."""
import io
import json
import os

import cv2
import numpy as np
import pytest

from pipeline.outputs.measure import COLUMNS, image_summary, measure_nuclei


def test_measurements_of_known_nuclei():
    labels = np.zeros((60, 80), np.int32)
    labels[10:20, 5:25] = 1  # 10 x 20 rectangle: area 200, centroid (x 14.5, y 14.5)
    labels[40:51, 60:71] = 2  # 11 x 11 square
    image = np.zeros((60, 80, 3), np.uint8)
    image[labels == 1] = 100
    image[labels == 2] = (200, 200, 200)
    rows = measure_nuclei(labels, image, "img")
    assert tuple(rows) == COLUMNS and list(rows["label"]) == [1, 2]
    assert list(rows["area"]) == [200, 121]
    assert rows["centroid_x"][0] == pytest.approx(14.5) and rows["centroid_y"][0] == pytest.approx(14.5)
    assert (rows["bbox_x0"][0], rows["bbox_y0"][0], rows["bbox_x1"][0], rows["bbox_y1"][0]) == (5, 10, 25, 20)
    assert rows["mean_intensity"][1] == pytest.approx(200) and rows["integrated_intensity"][0] == pytest.approx(20000)
    assert rows["solidity"][0] == pytest.approx(1.0) and rows["major_axis_length"][0] > rows["minor_axis_length"][0]
    assert image_summary(labels) == {"nuclei": 2, "mean_area": 160.5, "covered_fraction": round(321 / 4800, 6)}


def test_70000_nuclei_round_trip_through_tiff(tmp_path):
    from pipeline.outputs.folder import find_labels, read_labels, write_labels

    labels = np.arange(1, 70_001, dtype=np.int64).reshape(280, 250)
    written = write_labels(str(tmp_path), "big/image.png", labels)
    assert written.endswith("big/image.tif") and find_labels(str(tmp_path), "big/image.png") == written
    assert np.array_equal(read_labels(written), labels)
    small = write_labels(str(tmp_path), "big/image.png", labels % 1000)  # a redo with fewer nuclei: PNG again
    assert small.endswith(".png") and not os.path.exists(written)
    assert find_labels(str(tmp_path), "big/image.png") == small


def test_report_is_a_picture_of_the_run():
    from pipeline.outputs.report import draw_report, overlay_choices

    rows = [{"path": f"i{n}.png", "nuclei": n, "status": "done", "error": ""} for n in (3, 9, 1, 40)]
    rows += [{"path": "bad.png", "nuclei": 0, "status": "error", "error": "not a decodable image"}]
    assert [caption for caption, _ in overlay_choices(rows)] == ["fewest", "median", "most"]
    assert [row["nuclei"] for _, row in overlay_choices(rows)] == [1, 9, 40]
    png = draw_report(rows, np.array([30.0, 50, 400]), lambda row: np.zeros((20, 30, 3), np.uint8), "test")
    picture = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None and picture.shape[0] > 500


def test_unknown_model_name_lists_the_shipped_ones():
    from pipeline.model.registry import MODELS_DIR, ModelFileError, resolve_model, shipped_models

    with pytest.raises(ModelFileError, match="no model named 'nope'.*shipped models are"):
        resolve_model("nope")
    for name in shipped_models():
        assert os.path.dirname(resolve_model(name)) == os.path.join(MODELS_DIR, name)
    assert resolve_model("runs/x/model.keras") == "runs/x/model.keras"  # a path is a path


def test_sha256_check_refuses_a_changed_model_file(tmp_path):
    from pipeline.model.network import ModelFileError, build_unet, load_model, save_for_inference
    from pipeline.model.registry import sha256_of

    path = str(tmp_path / "model.keras")
    save_for_inference(build_unet(64, 2, "none", encoder_width=0.35), path)
    (tmp_path / "run.json").write_text(json.dumps({"num_classes": 2, "sha256": {"model.keras": sha256_of(path)}}))
    load_model(path)  # recorded hash matches
    with open(path, "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ModelFileError, match="sha256 differs"):
        load_model(path)


def test_repackaging_the_same_weights_keeps_the_file_and_a_new_model_replaces_it(tmp_path):
    from pipeline.model.network import build_unet, package_model, save_for_inference
    from pipeline.model.registry import sha256_of

    run = tmp_path / "run"
    run.mkdir()
    save_for_inference(build_unet(64, 2, "none", encoder_width=0.35), str(run / "model.keras"))
    (run / "run.json").write_text(json.dumps({"num_classes": 2, "postprocess": {"threshold": 0.5}}))
    shipped = tmp_path / "shipped"
    first = package_model(str(run / "model.keras"), str(shipped))
    mtime = os.path.getmtime(shipped / "model.keras")
    (run / "run.json").write_text(json.dumps({"num_classes": 2, "postprocess": {"threshold": 0.7}}))
    second = package_model(str(run / "model.keras"), str(shipped))  # new settings, same weights
    assert second.sha256 == first.sha256 and os.path.getmtime(shipped / "model.keras") == mtime
    assert json.loads((shipped / "run.json").read_text())["postprocess"]["threshold"] == 0.7
    save_for_inference(build_unet(64, 3, "none", encoder_width=0.35), str(run / "model.keras"))
    (run / "run.json").write_text(json.dumps({"num_classes": 3}))
    third = package_model(str(run / "model.keras"), str(shipped))  # other weights: the file is replaced
    assert third.sha256["model.keras"] == sha256_of(str(shipped / "model.keras")) != first.sha256["model.keras"]


def test_shipped_model_is_documented_small_and_checked():
    from pipeline.model.registry import MODELS_DIR, read_model_info, resolve_model, shipped_models, specialist_files

    assert "dsb2018" in shipped_models()
    path = resolve_model("dsb2018")
    assert os.path.getsize(path) <= 25 * 2**20
    info = read_model_info(path)
    assert info.sha256["model.keras"] and info.mode == "native" and info.num_classes == 3
    for specialist in specialist_files(path, info).values():  # checked against run.json's sha256 too
        assert os.path.getsize(specialist) <= 25 * 2**20
    card = open(os.path.join(MODELS_DIR, "dsb2018", "README.md"), encoding="utf-8").read()
    assert info.sha256["model.keras"] in card and "test split" in card


def test_the_bioimageio_package_passes_test_model_and_takes_any_bit_depth(tmp_path, capsys):
    """jobs/export.py --format bioimageio: a bioimage.io 0.5 package of the shipped model that bioimageio.core's
    test_model passes (run by the export itself); its own normalisation gives a 16-bit copy of the test image on a
    camera offset the same probabilities."""
    pytest.importorskip("bioimageio.core")
    from bioimageio.core import load_model_description, predict

    from jobs.export import main as export

    package = tmp_path / "dsb2018.bioimageio.zip"
    assert export(["--format", "bioimageio", "--output", str(package), "--check-count", "2",
                   "--check-size", "256"]) == 0
    assert "bioimageio.core test_model passed" in capsys.readouterr().out
    model = load_model_description(str(package))  # the export kept it: test_model passed
    assert model.weights.onnx is not None
    assert [step.id for step in model.inputs[0].preprocessing] == ["ensure_dtype", "scale_range", "clip",
                                                                   "ensure_dtype"]
    assert [str(channel) for channel in model.outputs[0].axes[-1].channel_names] == ["background", "interior",
                                                                                     "border"]
    image = np.load(io.BytesIO(model.inputs[0].test_tensor.get_reader().read()))  # 1 x 256 x 256 x 3 uint8, as read
    expected = np.load(io.BytesIO(model.outputs[0].test_tensor.get_reader().read()))
    camera = (image.astype(np.uint16) * 15 + 33000)  # 16-bit, offset: only the stretch sees the difference
    got = predict(model=model, inputs=camera).members["probabilities"].data.to_numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert expected[..., 1].max() > 0.5  # nuclei found in the test image
