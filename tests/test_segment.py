"""segment.py and submit.py end to end: original sizes, manifests, bad files, reruns, kills, submissions."""
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import cv2
import numpy as np
import pytest
import tifffile

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
HUGE_LIMIT = 50_000_000  # pixels: the 8000x8000 test image is over it


def png(array):
    return cv2.imencode(".png", array)[1].tobytes()


def read_manifest(folder):
    with open(os.path.join(folder, "manifest.csv")) as stream:
        return {row["path"]: row for row in csv.DictReader(stream)}


@pytest.fixture(scope="module")
def model_path(trained_run):
    return os.path.join(trained_run[0].output, "model.keras")


@pytest.fixture(scope="module")
def segmented_synthetic(model_path, synthetic_folder, tmp_path_factory, ray_session):
    """jobs/segment.py's run over the synthetic folder with every export, in this process: the reference of the
    killed-run test and the measurements test's first run (which later removes a measurement part and reruns)."""
    from pipeline.config import SegmentConfig
    from pipeline.segment.run import run_segmentation

    output = str(tmp_path_factory.mktemp("segmented") / "out")
    config = SegmentConfig(model=model_path, input=synthetic_folder, output=output, cpus_per_actor=0.5, blocks=4,
                           export="geojson,imagej-rois,ome-tiff")
    run_segmentation(config, output)
    return config, output


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory, synthetic_folder):
    """Good synthetic images mixed with every kind of bad or odd file, and odd names."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(synthetic_folder, root / "good")
    odd = root / "odd dir ü"
    odd.mkdir()
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    (odd / "-leading dash.png").write_bytes(png(picture))
    (odd / "grey16.png").write_bytes(png(rng.integers(0, 65535, (30, 30), dtype=np.uint16)))
    (odd / "float.tif").write_bytes(cv2.imencode(".tiff", rng.random((33, 31)).astype(np.float32))[1].tobytes())
    (odd / "rgba.png").write_bytes(png(np.dstack([picture, np.full((40, 50), 128, np.uint8)])))
    (odd / "tiny.png").write_bytes(png(np.zeros((1, 1), np.uint8)))
    (odd / "photo.jpg").write_bytes(cv2.imencode(".jpg", picture)[1].tobytes())
    (odd / "empty.png").write_bytes(b"")
    (odd / "page.png").write_text("<html>not an image</html>")
    (odd / "truncated.png").write_bytes(png(picture)[:60])
    (odd / "readme.txt").write_text("not an input")
    from PIL import Image

    Image.fromarray(picture).convert("P", palette=Image.ADAPTIVE).save(odd / "palette.png")
    Image.new("CMYK", (48, 36), (0, 255, 255, 0)).save(odd / "cmyk.jpg")
    Image.new("L", (8000, 8000), 0).save(odd / "huge 8000.png")  # 64 Mpixel: over the tests' 50 Mpixel limit
    grey = picture[..., 0].astype(np.uint16) * 16  # files as microscopes write them, broken metadata included
    tifffile.imwrite(odd / "stack.ome.tif", np.stack([4095 - grey, grey]), ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["Actin", "DAPI"]}, "PhysicalSizeX": 1e6})
    tifffile.imwrite(odd / "unnamed.ome.tif", np.stack([grey, grey]), ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["GFP", "RFP"]}})
    tifffile.imwrite(odd / "five_d.tif", np.broadcast_to(grey, (2, 3, 1, 40, 50)).copy(), imagej=True,
                     metadata={"axes": "TZCYX"})
    with_nan = picture[..., 0].astype(np.float32)
    with_nan[0, :5] = np.nan
    tifffile.imwrite(odd / "nan.tif", with_nan)
    if os.geteuid() != 0:  # root reads anything: the permission case only exists for other users
        (odd / "no access.png").write_bytes(png(picture))
        (odd / "no access.png").chmod(0)
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "escape.png").symlink_to("/etc/hostname")
    return str(root)


def test_segment_a_mixed_folder(model_path, bad_corpus, tmp_path, ray_session):
    from pipeline.config import SegmentConfig
    from pipeline.segment.run import run_segmentation

    output = str(tmp_path / "out")
    config = SegmentConfig(model=model_path, input=bad_corpus, output=output, batch_size=8, overlays=2,
                           cpus_per_actor=0.5, max_pixels=HUGE_LIMIT)
    result = run_segmentation(config, output)
    manifest = read_manifest(output)
    good = [row for row in manifest.values() if row["status"] == "done"]
    assert len(good) == 12 + 12  # synthetic + the odd-but-valid files
    assert manifest["odd dir ü/stack.ome.tif"]["channel"] == "channel 1 'DAPI' of 2 (nuclear stain by name)"
    assert manifest["odd dir ü/stack.ome.tif"]["pixel_size_source"].startswith("ignored:")
    assert "no name is a nuclear stain" in manifest["odd dir ü/unnamed.ome.tif"]["channel"]
    assert manifest["odd dir ü/five_d.tif"]["plane"] == "t: first of 2; z: maximum of 3 planes"
    assert "5 NaN" in manifest["odd dir ü/nan.tif"]["intensity"]
    assert manifest["odd dir ü/cmyk.jpg"]["width"] == "48" and manifest["odd dir ü/palette.png"]["height"] == "40"
    if os.geteuid() != 0:
        assert "Permission denied" in manifest["odd dir ü/no access.png"]["error"]
    for reason_path, fragment in [("odd dir ü/empty.png", "empty file"), ("odd dir ü/page.png", "not a decodable"),
                                  ("odd dir ü/huge 8000.png", "over the limit of 50,000,000"),
                                  ("odd dir ü/truncated.png", "not a decodable"),
                                  ("odd dir ü/readme.txt", "not an image file"),
                                  ("loop.png", "looping symlink"), ("escape.png", "outside the input folder")]:
        assert fragment in manifest[reason_path]["error"], manifest[reason_path]
    labels = cv2.imread(os.path.join(output, "labels", "odd dir ü", "-leading dash.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (40, 50) and labels.dtype == np.uint16
    for row in good:
        stem = os.path.splitext(row["path"])[0] + ".png"
        labels = cv2.imread(os.path.join(output, "labels", stem), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (int(row["height"]), int(row["width"]))  # original size restored
        assert int(row["nuclei"]) == labels.max()
    # Overlays go to the first two ids in sorted order: '-leading dash' and 'cmyk'.
    assert sum(len(files) for _, _, files in os.walk(os.path.join(output, "overlays"))) == 2
    assert os.path.isfile(os.path.join(output, "overlays", "odd dir ü", "-leading dash.png"))
    assert os.path.isfile(os.path.join(output, "overlays", "odd dir ü", "cmyk.png"))
    assert result.failed == 4 + (os.geteuid() != 0)

    rerun = run_segmentation(config, output)  # everything finished is skipped
    assert sum(row["status"] == "existing" for row in rerun.rows) == 24
    # Labels of two settings never mix: a rerun with another threshold is refused before any file changes.
    files = [os.path.join(folder, name) for folder, _, names in os.walk(output) for name in names]
    before = {path: os.path.getmtime(path) for path in files}
    with pytest.raises(ValueError, match=r"another model or options \(threshold\).*--redo"):
        run_segmentation(dataclasses.replace(config, threshold=0.9), output)
    assert len(before) > 24 and before == {path: os.path.getmtime(path) for path in files}


def test_submit_lists_every_test_image_of_a_mixed_folder(model_path, bad_corpus, tmp_path, ray_session, capsys):
    """Unreadable test images still get their row (empty prediction); non-images are not test images."""
    from jobs.submit import main as submit_job
    from pipeline.io.sources import list_images
    from submission.csvfile import read_submission

    output = tmp_path / "submission.csv"
    assert submit_job(["--model", model_path, "--input", bad_corpus, "--output", str(output), "--cpus-per-actor", "0.5",
                       "--max-pixels", str(HUGE_LIMIT)]) == 0
    done = capsys.readouterr()
    _, rows = read_submission(str(output))
    ids = {image_id for _, image_id, _ in rows}
    assert ids == {ref.image_id for ref in list_images(bad_corpus).refs}
    for unreadable in ("odd dir ü/empty", "odd dir ü/page", "odd dir ü/truncated", "odd dir ü/huge 8000"):
        assert [encoded for _, image_id, encoded in rows if image_id == unreadable] == [""]
    assert "4 unreadable" in done.out or "5 unreadable" in done.out


def test_killed_segment_run_completes_identically_on_rerun(model_path, synthetic_folder, segmented_synthetic,
                                                           tmp_path):
    from pipeline.config import SegmentConfig
    from pipeline.segment.run import run_segmentation

    def command(output):
        return [sys.executable, os.path.join(ROOT, "jobs", "segment.py"), "--model", model_path, "--input",
                synthetic_folder, "--output", output, "--batch-size", "4", "--blocks", "12", "--cpus-per-actor", "0.5"]

    def label_files(output):  # the label images (the reference's exports beside them left out)
        folder = os.path.join(output, "labels")
        return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(folder) for f in files if f.endswith(".png") or ".partial-" in f}

    reference, interrupted = segmented_synthetic[1], str(tmp_path / "interrupted")
    env = {**os.environ, "NUCLEI_PROGRESS": "0"}
    # The undisturbed reference (this process' run, other blocks and exports), then the killed run as the job users
    # start.
    process = subprocess.Popen(command(interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(label_files(interrupted)) < 3:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {name: data for name, data in label_files(interrupted).items() if ".partial-" not in name}
    assert 0 < len(finished) < 12, "the kill should land mid-run"
    expected = label_files(reference)
    assert all(data == expected[name] for name, data in finished.items())  # a finished name is never half-written
    stale = os.path.join(interrupted, "labels", ".partial-killedmidwrite.tmp")  # what a kill inside a write leaves
    with open(stale, "wb") as stream:
        stream.write(b"half a PNG")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    # The rerun: the job's library call, in this process (whose Ray and TensorFlow are up already).
    run_segmentation(SegmentConfig(model=model_path, input=synthetic_folder, output=interrupted, batch_size=4,
                                   blocks=12, cpus_per_actor=0.5), interrupted)
    assert label_files(interrupted) == expected  # every image, and no temporary file left behind


def test_submit_writes_a_valid_scored_submission(model_path, synthetic_folder, tmp_path, ray_session):
    from submission.api import submit
    from submission.validate import main as validate

    done = submit(synthetic_folder, str(tmp_path / "submission.csv"), model=model_path, labels=synthetic_folder,
                  cpus_per_actor=0.5)
    assert done.images == len(os.listdir(synthetic_folder)) and done.failed == 0 and done.rows >= done.images
    assert 0.0 < done.score.score <= 1.0 and len(done.score.per_image) == done.images
    assert validate([done.path, "--images", synthetic_folder]) == 0


def test_segment_real_images_at_original_size(model_path, real_zip, tmp_path, ray_session):
    from pipeline.config import SegmentConfig
    from pipeline.segment.run import run_segmentation
    from pipeline.io.sources import list_kaggle, load_sample

    refs = list_kaggle(real_zip).refs[:400:50]
    folder = tmp_path / "real"
    for ref in refs:
        (folder / ref.image_id / "images").mkdir(parents=True)
        (folder / ref.image_id / "images" / (ref.image_id + ".png")).write_bytes(png(load_sample(ref).image[..., ::-1]))
    output = str(tmp_path / "out")
    run_segmentation(SegmentConfig(model=model_path, input=str(folder), output=output, cpus_per_actor=0.5), output)
    for ref in refs:
        labels = cv2.imread(os.path.join(output, "labels", ref.image_id, "images", ref.image_id + ".png"),
                            cv2.IMREAD_UNCHANGED)
        assert labels.shape == load_sample(ref, with_masks=False).image.shape[:2]


def test_bad_model_file_is_one_clear_line(tmp_path, synthetic_folder):
    fake = tmp_path / "model.keras"
    fake.write_text("not a model")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "segment.py"), "--model", str(fake),
                           "--input", synthetic_folder, "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "not a loadable Keras model" in done.stderr


def test_native_mode_model_segments_whole_images_in_tiles_with_tta(tmp_path, synthetic_folder, ray_session):
    """A native-resolution 3-class model: whole images (tiled when larger than --tile), flips averaged, sizes
    normalised."""
    import json

    from pipeline.config import SegmentConfig
    from pipeline.segment.run import run_segmentation
    from pipeline.model.network import build_unet, save_model
    from pipeline.io.synthetic import render_sample

    run = tmp_path / "run"
    run.mkdir()
    save_model(build_unet(64, 3, "none", 0.35), str(run / "model.keras"))
    (run / "run.json").write_text(json.dumps({"image_size": 64, "num_classes": 3, "mode": "native",
                                              "appearance": "standardised"}))
    folder = tmp_path / "images"
    shutil.copytree(synthetic_folder, folder)
    (folder / "wide.png").write_bytes(png(np.tile(render_sample(1, 2, with_masks=False).image, (1, 3, 1))))
    output = str(tmp_path / "out")
    config = SegmentConfig(model=str(run / "model.keras"), input=str(folder), output=output, tta=True, tile=256,
                           overlap=32, cpus_per_actor=0.5, overlays=-1, nucleus_area=150)  # size normalisation too
    result = run_segmentation(config, output)
    assert result.done == 13 and result.failed == 0
    for row in result.rows:
        labels = cv2.imread(os.path.join(output, "labels", os.path.splitext(row["path"])[0] + ".png"),
                            cv2.IMREAD_UNCHANGED)
        assert labels.shape == (row["height"], row["width"])
    assert result.rows and max(row["width"] for row in result.rows) >= 3 * 256


def test_evaluate_scores_the_held_out_images(model_path, tmp_path, ray_session, capsys):
    import json

    from jobs.evaluate import main as evaluate_job

    assert evaluate_job(["--model", model_path, "--output", str(tmp_path / "eval"), "--pictures", "1",
                         "--cpus-per-actor", "0.5"]) == 0
    done = capsys.readouterr()
    last = done.out.strip().splitlines()[-1]
    assert last.startswith("score=") and 0.0 < float(last[6:]) <= 1.0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    overall = summary["table"][0]
    assert overall["kind"] == "all" and overall["images"] == 8  # 20% of the run's 40 synthetic images
    assert sum(row["images"] for row in summary["table"][1:]) == 8
    assert len(list((tmp_path / "eval" / "pictures").glob("*.png"))) == 2
    assert "| fluorescence |" in done.out


def test_measurements_match_the_labels_and_a_rerun_adds_no_row_twice(segmented_synthetic):
    import pandas as pd

    from pipeline.outputs.folder import read_labels
    from pipeline.segment.run import run_segmentation

    config, output = segmented_synthetic
    table = pd.read_parquet(os.path.join(output, "measurements"))
    manifest = read_manifest(output)
    assert sum(int(row["nuclei"]) for row in manifest.values()) == len(table) > 0
    for row in manifest.values():
        labels = read_labels(os.path.join(output, row["labels"]))
        mine = table[table.image_id == row["image_id"]].sort_values("label")
        assert list(mine.label) == list(range(1, labels.max() + 1))
        assert list(mine.area) == list(np.bincount(labels.ravel())[1:])
        if len(mine):
            assert float(row["mean_area"]) == pytest.approx(mine.area.mean(), abs=0.01)
        # the exports beside the label image hold the same nuclei, the GeoJSON with their measurements
        stem = os.path.join(output, os.path.splitext(row["labels"])[0])
        features = json.load(open(stem + ".geojson"))["features"]
        assert [feature["properties"]["name"] for feature in features] == [str(label) for label in mine.label]
        assert [feature["properties"]["measurements"]["area"] for feature in features] == list(mine.area)
        assert zipfile.ZipFile(stem + ".rois.zip").namelist() == [f"{label:06d}.roi" for label in mine.label]
        np.testing.assert_array_equal(tifffile.imread(stem + ".ome.tif"), labels)
    assert os.path.getsize(os.path.join(output, "report.png")) > 10_000

    parts = sorted(os.listdir(os.path.join(output, "measurements")))
    lost = pd.read_parquet(os.path.join(output, "measurements", parts[0])).image_id.unique()
    os.unlink(os.path.join(output, "measurements", parts[0]))  # as if the run died between labels and rows
    rerun = run_segmentation(config, output)
    assert {row["image_id"] for row in rerun.rows if row["status"] == "done"} == set(lost)
    again = pd.read_parquet(os.path.join(output, "measurements"))
    assert len(again) == len(table) and not again.duplicated(["image_id", "label"]).any()
    assert os.path.isfile(os.path.join(output, "report.png"))


def test_physical_pixel_size_reaches_the_measurements_the_manifest_and_the_ome_tiff(model_path, synthetic_folder,
                                                                                    tmp_path, ray_session):
    import pandas as pd

    from pipeline.config import SegmentConfig
    from pipeline.segment.run import run_segmentation
    from pipeline.io.sources import list_images, load_sample

    folder = tmp_path / "images"
    folder.mkdir()
    refs = list_images(synthetic_folder).refs[:2]
    tifffile.imwrite(folder / "a.ome.tif", load_sample(refs[0], with_masks=False).image, ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"})
    shutil.copy(os.path.join(synthetic_folder, refs[1].image_path), folder / "b.png")
    for given, expected in ((0.0, {"a": (0.5, "OME-TIFF PhysicalSizeX"), "b": (None, "")}),
                            (0.25, {"a": (0.25, "--pixel-size"), "b": (0.25, "--pixel-size")})):
        output = str(tmp_path / f"out{given}")
        result = run_segmentation(SegmentConfig(model=model_path, input=str(folder), output=output, cpus_per_actor=0.5,
                                                pixel_size=given, export="ome-tiff", report=False), output)
        rows = {row["path"][0]: row for row in result.rows}
        table = pd.read_parquet(os.path.join(output, "measurements"))
        for name, (size, source) in expected.items():
            assert rows[name]["pixel_size_source"] == source and rows[name]["nuclei"] > 0
            mine = table[table.image_id == rows[name]["image_id"]]
            ome = tifffile.TiffFile(os.path.join(output, os.path.splitext(rows[name]["labels"])[0] + ".ome.tif"))
            if size is None:
                assert np.isnan(rows[name]["pixel_size_um"]) and mine.area_um2.isna().all()
                assert "PhysicalSizeX" not in ome.ome_metadata
            else:
                assert rows[name]["pixel_size_um"] == size
                np.testing.assert_allclose(mine.area_um2, mine.area * size * size)
                assert f'PhysicalSizeX="{size}"' in ome.ome_metadata
            ome.close()
        assert "pixel_size_source" in open(os.path.join(output, "manifest.csv")).readline()


def test_onnx_export_agrees_with_tensorflow_and_segments_the_same_nuclei(model_path, synthetic_folder, tmp_path,
                                                                         ray_session):
    from pipeline.config import ExportConfig, SegmentConfig
    from pipeline.segment.run import run_segmentation
    from pipeline.model.onnx import run_export

    onnx_path = str(tmp_path / "model.onnx")
    result = run_export(ExportConfig(model=model_path, output=onnx_path, check_images=synthetic_folder))
    assert result["images"] == 8 and result["max_abs_difference"] < 1e-4 and os.path.isfile(result["json"])
    outputs = {}
    for name, path in (("keras", model_path), ("onnx", onnx_path)):
        outputs[name] = str(tmp_path / name)
        run_segmentation(SegmentConfig(model=path, input=synthetic_folder, output=outputs[name], cpus_per_actor=0.5,
                                       measurements=False, report=False), outputs[name])
    assert read_manifest(outputs["keras"]).keys() == read_manifest(outputs["onnx"]).keys()
    for path, row in read_manifest(outputs["keras"]).items():
        keras_labels = cv2.imread(os.path.join(outputs["keras"], row["labels"]), cv2.IMREAD_UNCHANGED)
        onnx_labels = cv2.imread(os.path.join(outputs["onnx"], row["labels"]), cv2.IMREAD_UNCHANGED)
        assert row["nuclei"] == read_manifest(outputs["onnx"])[path]["nuclei"]
        assert np.mean(keras_labels == onnx_labels) > 0.999


def test_onnx_export_refuses_a_model_that_disagrees(model_path, synthetic_folder, tmp_path):
    from pipeline.config import ExportConfig
    from pipeline.model.onnx import run_export

    with pytest.raises(ValueError, match="disagrees with TensorFlow"):
        run_export(ExportConfig(model=model_path, output=str(tmp_path / "m.onnx"), check_images=synthetic_folder,
                                tolerance=0.0))
    assert not os.path.exists(tmp_path / "m.onnx")


def test_a_models_onnx_twins_run_on_cpus_without_tensorflow(model_path, synthetic_folder, tmp_path):
    """jobs/package.py --onnx: the exports beside a Keras model are what a CPU Segmenter runs (no TensorFlow in its
    process), with TensorFlow's labels; a changed export is refused."""
    from pipeline.api import Segmenter
    from pipeline.model.network import package_model
    from pipeline.model.onnx import add_onnx_twins
    from pipeline.model.registry import ModelFileError, read_model_info
    from pipeline.io.sources import list_images, load_sample

    folder = str(tmp_path / "shipped")
    package_model(model_path, folder)
    images = [load_sample(ref, with_masks=False).image for ref in list_images(synthetic_folder).refs[:3]]
    twins = add_onnx_twins(os.path.join(folder, "model.keras"), [image.astype(np.float32) / 255 for image in images])
    assert twins["files"] == [os.path.join(folder, "model.onnx")] and twins["max_abs_difference"] < 1e-4
    assert read_model_info(os.path.join(folder, "model.keras")).onnx == {"model.keras": "model.onnx"}
    np.savez(tmp_path / "images.npz", *images)
    script = ("import sys, numpy as np; from pipeline.api import Segmenter; "
              f"s = Segmenter.load({os.path.join(folder, 'model.keras')!r}); "
              f"images = np.load({str(tmp_path / 'images.npz')!r}); "
              f"np.savez({str(tmp_path / 'labels.npz')!r}, *[s.segment(images[key]) for key in images.files]); "
              "print('tensorflow' in sys.modules)")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert ran.stdout.strip().splitlines()[-1] == "False"
    keras = Segmenter.load(model_path)  # the run's own folder records no export: TensorFlow
    found = np.load(tmp_path / "labels.npz")
    for image, key in zip(images, found.files):
        assert np.mean(keras.segment(image) == found[key]) > 0.999 and found[key].max() > 0
    with open(os.path.join(folder, "model.onnx"), "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ModelFileError, match="sha256 differs"):
        Segmenter.load(os.path.join(folder, "model.keras"))


def test_segment_needs_no_model_flag_with_the_shipped_model(synthetic_folder, tmp_path, ray_session, capsys):
    from jobs.segment import main as segment_job

    assert segment_job(["--input", synthetic_folder, "--output", str(tmp_path / "o"), "--cpus-per-actor", "0.5"]) == 0
    manifest = read_manifest(str(tmp_path / "o"))
    assert len(manifest) == 12 and sum(int(row["nuclei"]) for row in manifest.values()) > 100
    capsys.readouterr()
    assert segment_job(["--model", "nope", "--input", synthetic_folder, "--output", str(tmp_path / "n")]) == 1
    assert "shipped models are dsb2018" in capsys.readouterr().err.strip().splitlines()[-1]
    # The Python API, in this process and without Ray, gives each image the labels the job wrote.
    from pipeline.api import Segmenter
    from pipeline.outputs.folder import read_labels
    from pipeline.io.sources import list_images, load_sample

    segmenter = Segmenter.load()
    for ref in list_images(synthetic_folder).refs:  # a CPU replica is a Segmenter: the very same labels
        image = load_sample(ref, with_masks=False).image
        written = read_labels(os.path.join(str(tmp_path / "o"), manifest[ref.image_path]["labels"]))
        np.testing.assert_array_equal(segmenter.segment(image), written)
    np.testing.assert_array_equal(segmenter.segment(image[..., 0]), segmenter.segment(np.dstack([image[..., 0]] * 3)))


def test_replicas_are_one_thread_per_cpu_one_per_gpu_and_what_the_flags_say():
    """--concurrency / --cpus-per-actor 0 (the defaults): one replica per GPU, else one-thread replicas reserving
    half the CPUs, as many as the memory holds and the images need; given values are kept, unless they leave reading
    no CPU."""
    from pipeline.config import SegmentConfig
    from pipeline.segment.run import IMAGES_PER_REPLICA, REPLICA_MEMORY, Replicas, plan_replicas

    auto, memory, many = SegmentConfig(), 64 * REPLICA_MEMORY, 1000
    assert plan_replicas(auto, cpus=2, gpus=0, memory=memory, images=many) == Replicas(2, 0.5, False)
    assert plan_replicas(auto, cpus=2, gpus=0, memory=memory, images=many).threads == 1
    assert plan_replicas(auto, cpus=2, gpus=0, memory=memory, images=IMAGES_PER_REPLICA).count == 1  # a small folder
    assert plan_replicas(auto, cpus=16, gpus=0, memory=5.5 * REPLICA_MEMORY, images=many).count == 5  # memory-bound
    assert plan_replicas(auto, cpus=16, gpus=2, memory=memory, images=many) == Replicas(2, 1.0, True)
    assert plan_replicas(SegmentConfig(gpu="no"), cpus=16, gpus=2, memory=memory, images=many) == \
        Replicas(16, 0.5, False)
    given = SegmentConfig(concurrency=1, cpus_per_actor=1.0)
    assert plan_replicas(given, cpus=2, gpus=0, memory=memory, images=many) == Replicas(1, 1.0, False)
    assert plan_replicas(given, cpus=2, gpus=0, memory=memory, images=many).threads == 2
    assert plan_replicas(SegmentConfig(concurrency=3), cpus=4, gpus=0, memory=memory, images=1).count == 3
    with pytest.raises(ValueError, match="reading the images needs 1"):  # 1.5 of 2 CPUs: the read tasks never start
        plan_replicas(SegmentConfig(concurrency=3), cpus=2, gpus=0, memory=memory, images=many)
    assert plan_replicas(auto, cpus=1, gpus=0, memory=memory, images=many) == Replicas(1, 0.0, False)  # one CPU
    assert plan_replicas(SegmentConfig(cpus_per_actor=1.0), cpus=8, gpus=0, memory=memory, images=many).count == 4
    assert not plan_replicas(SegmentConfig(concurrency=3), cpus=8, gpus=2, memory=memory, images=many).gpu  # a GPU each


def test_the_readme_python_snippet_runs(tmp_path, monkeypatch):
    import re

    from pipeline.io.images import encode_png
    from pipeline.io.synthetic import render_sample

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    snippet = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_images").mkdir()
    (tmp_path / "my_images" / "cells.png").write_bytes(encode_png(render_sample(3, 1, with_masks=False).image))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["labels"].shape == namespace["image"].shape[:2] and namespace["labels"].max() > 5
