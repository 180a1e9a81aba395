"""The napari plugin, headless: its manifest (npe2), the widget's work without Qt on a real image (nuclei found,
measurements attached as the Labels layer's features), the sample, and the reader of a segment.py output folder."""
import csv

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.outputs.folder import MANIFEST_COLUMNS, MEASUREMENTS

npe2 = pytest.importorskip("npe2")
napari = pytest.importorskip("napari")


def test_the_manifest_is_found_and_valid():
    manager = npe2.PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest("nuclei-segmentation")  # napari drops a bad manifest with only a log line
    manifest.validate_imports()  # every python_name resolves (the widget module imports without Qt)
    assert [widget.display_name for widget in manifest.contributions.widgets] == ["Segment nuclei"]
    assert manifest.contributions.readers[0].accepts_directories


@pytest.fixture(scope="module")
def segmented():
    """The sample (a real DSB2018 fluorescence image) segmented as the dock widget does, without Qt."""
    from nuclei_napari._core import SEGMENT_STEPS, run_steps, sample_nuclei, segment_steps

    [(image, meta, kind)] = sample_nuclei()
    assert kind == "image" and meta["name"] == "DSB2018 fluorescence" and image.shape == (256, 256, 3)
    steps, layer = run_steps(segment_steps(image, "sample", pixel_size_um=0.5))
    assert len(steps) == SEGMENT_STEPS
    return image, layer


def test_the_widget_finds_nuclei_and_attaches_their_measurements(segmented):
    from napari.components import ViewerModel
    from napari.layers import Layer

    image, (labels, meta, kind) = segmented
    assert kind == "labels" and labels.shape == image.shape[:2] and labels.max() >= 6  # 7 nuclei in the picture
    viewer = ViewerModel()
    viewer.add_image(image, name="sample")
    layer = viewer.add_layer(Layer.create(labels, meta, kind))
    features = layer.features
    assert list(features["index"]) == list(range(1, labels.max() + 1))
    assert np.array_equal(features["area"].to_numpy(), np.bincount(labels.ravel())[1:])
    assert features["area_um2"].to_numpy() == pytest.approx(features["area"].to_numpy() * 0.25)
    assert tuple(layer.scale) == (0.5, 0.5)


def test_the_reader_opens_a_segment_output_folder(segmented, tmp_path):
    from nuclei_napari._core import features_of, get_reader

    image, (labels, _, _) = segmented
    (tmp_path / "in").mkdir()
    (tmp_path / "out" / "labels").mkdir(parents=True)
    (tmp_path / "out" / MEASUREMENTS).mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), image[..., ::-1])
    cv2.imwrite(str(tmp_path / "out" / "labels" / "a.png"), labels.astype(np.uint16))
    features_of(labels, image, "a").drop(columns="index").to_parquet(tmp_path / "out" / MEASUREMENTS / "part-0.parquet")
    with open(tmp_path / "out" / "manifest.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerow({"image_id": "a", "path": str(tmp_path / "in" / "a.png"), "labels": "labels/a.png",
                         "status": "done"})
        writer.writerow({"image_id": "b", "path": "b.png", "labels": "../../etc/passwd", "status": "done"})
    assert get_reader(str(tmp_path / "in" / "a.png")) is None and get_reader(str(tmp_path / "in")) is None
    layers = get_reader(str(tmp_path / "out"))(str(tmp_path / "out"))
    assert [(meta["name"], kind) for _, meta, kind in layers] == [("a", "image"), ("a nuclei", "labels")]
    # the image as the model read it (a dim grey 8-bit file like this one stretched, pipeline.io.images.uint8_levels)
    from pipeline.io.images import intensity_to_uint8, uint8_levels

    assert uint8_levels(image) != (0.0, 255.0)
    np.testing.assert_array_equal(layers[0][0], intensity_to_uint8(image)[0])
    np.testing.assert_array_equal(layers[1][0], labels)
    assert isinstance(layers[1][1]["features"], pd.DataFrame) and len(layers[1][1]["features"]) == labels.max()


def test_the_dock_widget_segments_off_the_ui_thread_with_progress(monkeypatch):
    """With a Qt binding (the napari extra's; CI installs none): the magicgui widget runs in a napari thread worker
    with a 3-step progress bar and adds the Labels layer (offscreen Qt, a viewer model: no OpenGL needed)."""
    pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    import time

    from napari.components import ViewerModel
    from qtpy.QtWidgets import QApplication

    from nuclei_napari._core import sample_nuclei
    from nuclei_napari._widget import segment_nuclei_widget

    app = QApplication.instance() or QApplication([])
    viewer = ViewerModel()
    [(image, meta, _)] = sample_nuclei()
    layer = viewer.add_image(image, **meta)
    worker = segment_nuclei_widget()(viewer=viewer, image=layer, model="dsb2018", threshold=0.0, channel="",
                                      pixel_size_um=0.0)
    deadline = time.time() + 300
    while len(viewer.layers) < 2 and time.time() < deadline:
        app.processEvents()
        time.sleep(0.05)
    assert [type(layer).__name__ for layer in viewer.layers] == ["Image", "Labels"]
    assert worker.pbar.total == 3 and len(viewer.layers[1].features) == viewer.layers[1].data.max() >= 6
