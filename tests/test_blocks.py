"""Large images block by block: cores, windows and seams (pure), windowed TIFF reads, agreement with the whole
image, every output, and a node lost while its blocks run."""
import csv
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tifffile

from pipeline.io.blocks import (ALIGN, BLOCK_MARGIN, LabelCanvas, TiffWindows, image_shape, is_large, keep_core_nuclei,
                             plan_blocks, sample_mosaic)
from tests.conftest import ROOT


def discs(height, width, seed, radius=(4, 30)):
    """Non-overlapping discs on a jittered grid, touching the image edges too: a label image of `nuclei`."""
    import cv2

    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.int32)
    step = 2 * radius[1] + 4
    for y in range(-radius[1] // 2, height, step):
        for x in range(-radius[1] // 2, width, step):
            scratch = np.zeros_like(labels, np.uint8)
            cy, cx = y + step // 2 + int(rng.integers(-2, 3)), x + step // 2 + int(rng.integers(-2, 3))
            cv2.circle(scratch, (cx, cy), int(rng.integers(*radius)), 1, -1)
            labels[(scratch > 0) & (labels == 0)] = labels.max() + 1
    return labels


def fluorescence_mosaic(height, width):
    """Synthetic fluorescence samples side by side, cropped to height x width (RGB uint8)."""
    from pipeline.data.protocol import image_kind
    from pipeline.io.synthetic import render_sample

    tiles = [sample.image for sample in (render_sample(11, index, with_masks=False) for index in range(40))
             if image_kind(sample.image) == "fluorescence"]
    rows, y, index = [], 0, 0
    while y < height:
        row, x = [], 0
        while x < width:
            tile = tiles[index % len(tiles)][:256, :256]
            row.append(tile)
            x, index = x + tile.shape[1], index + 1
        rows.append(np.concatenate(row, axis=1)[:, :width])
        y += 256
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:height])


def bijection(first, second):
    """Whether two label images hold the same nuclei, pixel for pixel, whatever their numbers."""
    if not np.array_equal(first > 0, second > 0):
        return False
    pairs = np.unique(np.stack([first[first > 0], second[second > 0]]), axis=1)
    return len(set(pairs[0])) == len(set(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("height,width,block", [(1000, 777, 256), (4100, 4096, 2048), (300, 5000, 1024), (64, 64, 64)])
def test_cores_tile_the_image_once_and_windows_hold_their_margin_on_the_stride_grid(height, width, block):
    blocks = plan_blocks(height, width, block)
    covered = np.zeros((height, width), np.uint8)
    for item in blocks:
        top, bottom, left, right = item.core
        covered[top:bottom, left:right] += 1
        assert bottom - top <= block and right - left <= block
        w_top, w_bottom, w_left, w_right = item.window
        assert w_top % ALIGN == 0 and w_left % ALIGN == 0
        assert w_top <= max(0, top - BLOCK_MARGIN) and w_left <= max(0, left - BLOCK_MARGIN)
        assert w_bottom == min(height, bottom + BLOCK_MARGIN) and w_right == min(width, right + BLOCK_MARGIN)
    assert (covered == 1).all()
    assert [item.index for item in blocks] == list(range(len(blocks)))
    assert not is_large(2048, 2048, 1024) and is_large(2049, 2048, 1024) and not is_large(10 ** 5, 10 ** 5, 0)


@pytest.mark.parametrize("block", [97, 200, 333])
def test_every_nucleus_is_kept_once_and_whole_across_the_seams(tmp_path, block):
    """Blocks that see windows of one label image keep each of its nuclei exactly once and whole, wherever the
    seams fall (nuclei up to 60 pixels across, the margin 128)."""
    labels = discs(700, 900, seed=block)
    canvas = LabelCanvas(str(tmp_path / "canvas.npy"), *labels.shape)
    for item in plan_blocks(*labels.shape, block):
        top, bottom, left, right = item.window
        canvas.paste(keep_core_nuclei(labels[top:bottom, left:right], item, *labels.shape), item)
    stitched = np.asarray(canvas.array).copy()
    assert canvas.nuclei == len(np.unique(labels)) - 1 == stitched.max()
    assert bijection(stitched, labels)
    assert canvas.summary()["covered_fraction"] == round(np.count_nonzero(labels) / labels.size, 6)
    canvas.write_tiff(str(tmp_path / "labels.tif"))  # 512-pixel tiles, the edge ones cut back to the image
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels.tif"), stitched)
    canvas.close()
    assert not os.path.exists(tmp_path / "canvas.npy")


def test_a_block_of_background_is_empty_and_one_small_dim_nucleus_is_not():
    """The empty-block test (pipeline.segment.blockwise): background with camera noise is empty; the same
    background with one nucleus of 5 pixels' radius at a third of the image's nucleus brightness is not; a flat
    sample (nothing to tell apart) turns the test off."""
    import cv2

    from pipeline.data.augment import fit_appearance
    from pipeline.segment.blockwise import empty_cut, is_empty

    image = fluorescence_mosaic(512, 512)
    fitted = fit_appearance(image, "colour")
    cut = empty_cut(image, "colour", fitted)
    assert cut is not None
    background = np.median(image, axis=(0, 1))
    window = np.clip(background + np.random.default_rng(1).normal(0, 2, (256, 256, 1)), 0, 255).astype(np.uint8)
    assert is_empty(window, "colour", fitted, cut)
    bright = np.percentile(image, 99, axis=(0, 1))
    dim_nucleus = window.copy()
    cv2.circle(dim_nucleus, (100, 140), 5, tuple(float(v) for v in background + (bright - background) / 3), -1)
    assert not is_empty(dim_nucleus, "colour", fitted, cut)
    assert not is_empty(image[:256, :256], "colour", fitted, cut)
    flat = np.full((256, 256, 3), 7, np.uint8)
    assert empty_cut(flat, "colour", fit_appearance(flat, "colour")) is None


def test_tiff_windows_read_tiles_as_the_whole_image_holds_them(tmp_path):
    from pipeline.io.images import image_from_array
    from pipeline.io.sources import SampleRef

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)
    grey16 = rng.integers(0, 65535, (700, 900), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, tile=(128, 128), photometric="rgb")
    tifffile.imwrite(tmp_path / "planes.ome.tif", np.moveaxis(rgb, 2, 0), tile=(128, 128), ome=True,
                     metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "grey16.tif", grey16)  # strips, not tiles
    window = (100, 333, 250, 900)
    for name, expected in (("rgb.tif", rgb), ("planes.ome.tif", rgb), ("grey16.tif", grey16)):
        reader = TiffWindows(str(tmp_path / name))
        if expected.dtype == np.uint16:  # the whole image's levels, measured once on a sample of windows
            expected = image_from_array(grey16, levels=reader.levels).image
        assert (reader.height, reader.width) == (700, 900)
        np.testing.assert_array_equal(reader.read(window), expected[100:333, 250:900])
        assert sample_mosaic(reader).shape == (4 * 256, 4 * 256, 3)
        assert image_shape(SampleRef(name, "file", str(tmp_path), name)) == (700, 900)
    import cv2

    cv2.imwrite(str(tmp_path / "wide.png"), np.zeros((40, 3000), np.uint8))
    with zipfile.ZipFile(tmp_path / "in.zip", "w") as archive:
        archive.write(tmp_path / "wide.png", "a/wide.png")
    assert image_shape(SampleRef("wide", "file", str(tmp_path), "wide.png")) == (40, 3000)
    assert image_shape(SampleRef("wide", "zip", str(tmp_path / "in.zip"), "a/wide.png")) == (40, 3000)


def write_ome_zarr(path, image, pixel_size_um=0.25, chunk=128):
    """An RGB image as an OME-Zarr 0.5 image (Zarr v3): one level, axes c, y, x, the pixel size as its scale."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    level = root.create_array("0", shape=(3, *image.shape[:2]), chunks=(3, chunk, chunk), dtype="uint8")
    level[:] = np.moveaxis(image, 2, 0)
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                                   "scale": [1.0, pixel_size_um, pixel_size_um]}]}]}]}


def test_zarr_stores_are_listed_as_one_image_and_read_window_by_window(tmp_path):
    """An OME-Zarr image (Zarr v3) and a plain Zarr v2 array: one input each (not their chunk files), windows equal
    to the image, the header-only size, the whole image loaded, and OME-Zarr's pixel size."""
    import zarr

    from pipeline.io.blocks import ZarrWindows
    from pipeline.io.sources import pixel_size_of
    from pipeline.io.sources import list_images, load_sample

    rgb = np.random.default_rng(1).integers(0, 255, (700, 900, 3), dtype=np.uint8)
    (tmp_path / "in" / "plates").mkdir(parents=True)
    write_ome_zarr(tmp_path / "in" / "slide.ome.zarr", rgb)
    plain = zarr.open_array(str(tmp_path / "in" / "plates" / "well.zarr"), mode="w", shape=rgb.shape,
                            chunks=(128, 128, 3), dtype="uint8", zarr_format=2)
    plain[:] = rgb
    listing = list_images(str(tmp_path / "in"))
    assert [(ref.image_id, ref.image_path) for ref in listing.refs] == [
        ("plates/well", "plates/well.zarr"), ("slide", "slide.ome.zarr")] and listing.problems == []
    window = (100, 333, 250, 900)
    for ref in listing.refs:
        reader = ZarrWindows(str(tmp_path / "in" / ref.image_path))
        np.testing.assert_array_equal(reader.read(window), rgb[100:333, 250:900])
        assert image_shape(ref) == (700, 900)
        np.testing.assert_array_equal(load_sample(ref, with_masks=False).image, rgb)
    assert pixel_size_of(listing.refs[1]) == (0.25, "OME-Zarr scale")
    assert pixel_size_of(listing.refs[0]) == (None, "")
    from pipeline.io.images import BadImageError

    with pytest.raises(BadImageError, match="over the limit"):
        load_sample(listing.refs[0], with_masks=False, max_pixels=1000)
    with zipfile.ZipFile(tmp_path / "stores.zip", "w") as archive:
        for name in ("a.png", "s.zarr/zarr.json", "s.zarr/0/c/0/0/0"):
            archive.writestr(name, b"")
    zipped = list_images(str(tmp_path / "stores.zip"))
    assert [ref.image_path for ref in zipped.refs] == ["a.png"]
    assert [path for path, _ in zipped.problems] == ["s.zarr"]


def write_large_tiff(path, image, pixel_size_um=0.5):
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": pixel_size_um, "PhysicalSizeY": pixel_size_um})


@pytest.mark.slow
def test_a_large_image_block_by_block_agrees_with_the_whole_image_and_has_every_output(tmp_path, ray_session):
    """The shipped model on a 1280 x 1536 TIFF in 384-pixel blocks (20 Ray tasks; the right ones empty background,
    skipped) against the same image segmented whole: the same nuclei; labels, measurements, GeoJSON, ROI set and
    OME-TIFF all agree."""
    from roifile import roiread
    from shapely.geometry import shape

    from pipeline.api import Segmenter, segment_folder
    from pipeline.labels.metric import matched_ious

    image = fluorescence_mosaic(1280, 1536)
    background = np.median(image[:, :1024], axis=(0, 1))  # beyond column 1024 (a tile's edge): background, noise
    noise = np.random.default_rng(0).normal(0, 2, (1280, 512, 1))
    image[:, 1024:] = np.clip(background + noise, 0, 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    write_large_tiff(tmp_path / "in" / "slide.ome.tif", image)
    output = tmp_path / "out"
    result = segment_folder(str(tmp_path / "in"), str(output), block_size=384, cpus_per_actor=1.0,
                            export="geojson,imagej-rois,ome-tiff")
    row = result.rows[0]
    assert row["status"] == "done" and (row["height"], row["width"]) == (1280, 1536)
    assert row["empty_blocks"] >= 3 and row["blocks"] > row["empty_blocks"]  # the blocks right of column 1152
    labels = tifffile.imread(output / "labels" / "slide.ome.tif")
    whole = Segmenter.load("dsb2018", tile=2048).segment(image)
    assert labels.shape == whole.shape and row["nuclei"] == labels.max() == len(np.unique(labels)) - 1
    # the false-positive filter reads per-image context (object count, median area): a block's differs a little
    assert abs(int(labels.max()) - int(whole.max())) <= 0.03 * whole.max() and whole.max() > 150
    matched = matched_ious(whole, labels)  # blocks at the tissue's edge see fewer neighbours (0.96 here)
    assert len(matched) >= 0.95 * whole.max() and matched.mean() > 0.95
    assert whole[:, 1152:].max() == 0 == labels[:, 1152:].max()  # the skipped blocks' cores: nothing to find there
    with open(output / "manifest.csv") as stream:
        manifest = next(csv.DictReader(stream))
    assert manifest["pixel_size_um"] == "0.5" and manifest["pixel_size_source"] == "OME-TIFF PhysicalSizeX"
    assert manifest["empty_blocks"] == str(row["empty_blocks"])

    import pyarrow.dataset as pads

    table = pads.dataset(str(output / "measurements"), format="parquet").to_table().to_pandas()
    assert sorted(table["label"]) == list(range(1, labels.max() + 1))
    areas = np.bincount(labels.ravel())[table["label"].to_numpy()]
    assert np.median(np.abs(table["area"].to_numpy() - areas)) == 0  # a block's own nuclei, pasted as measured
    some = table.iloc[len(table) // 2]
    ys, xs = np.nonzero(labels == some["label"])
    assert abs(ys.mean() - some["centroid_y"]) < 1 and abs(xs.mean() - some["centroid_x"]) < 1
    assert some["centroid_x_um"] == pytest.approx(some["centroid_x"] * 0.5)

    collection = json.loads((output / "labels" / "slide.ome.geojson").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    with open(os.path.join(ROOT, "tests", "data", "geojson", "FeatureCollection.json")) as stream:
        jsonschema.validate(collection, json.load(stream))
    features = collection["features"]
    assert len(features) == labels.max()
    feature = next(item for item in features if item["properties"]["name"] == str(some["label"]))
    assert shape(feature["geometry"]).centroid.x == pytest.approx(some["centroid_x"] + 0.5, abs=1.5)
    assert len(roiread(str(output / "labels" / "slide.ome.rois.zip"))) == labels.max()
    with tifffile.TiffFile(output / "labels" / "slide.ome.ome.tif") as ome:
        np.testing.assert_array_equal(ome.asarray(), labels)
        assert 'PhysicalSizeX="0.5"' in ome.ome_metadata


@pytest.mark.slow
def test_an_ome_zarr_image_is_segmented_block_by_block_as_the_same_tiff_is(tmp_path, ray_session):
    """The same image as OME-Zarr and as OME-TIFF, each in 6 blocks: the same nuclei, and the Zarr's pixel size."""
    from pipeline.api import segment_folder

    image = fluorescence_mosaic(512, 640)
    (tmp_path / "zarr").mkdir()
    (tmp_path / "tiff").mkdir()
    write_ome_zarr(tmp_path / "zarr" / "slide.zarr", image, pixel_size_um=0.25)
    write_large_tiff(tmp_path / "tiff" / "slide.tif", image)
    runs = {name: segment_folder(str(tmp_path / name), str(tmp_path / f"out-{name}"), block_size=256,
                                 cpus_per_actor=1.0, report=False) for name in ("zarr", "tiff")}
    labels = {name: tifffile.imread(tmp_path / f"out-{name}" / "labels" / "slide.tif") for name in runs}
    assert runs["zarr"].rows[0]["status"] == "done" and labels["zarr"].max() > 50
    assert bijection(labels["zarr"], labels["tiff"])
    assert runs["zarr"].rows[0]["pixel_size_um"] == 0.25


NODE_LOSS_SCRIPT = """
import os, sys, threading
sys.path.insert(0, {root!r})
os.environ["NUCLEI_PROGRESS"] = "0"
from ray.cluster_utils import Cluster
import ray

cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
worker = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
os.environ["RAY_ADDRESS"] = cluster.address
import pipeline.segment.blockwise as blockwise
from pipeline.api import segment_folder

# The fault is injected from here: once the driver has stitched two blocks, the worker node goes.
# The driver stitches no further block until the node is gone, so that the loss always lands mid-image.
pasted, stitch = [], blockwise.LabelCanvas.paste
two_stitched, node_gone = threading.Event(), threading.Event()
def counting_paste(canvas, kept, block):
    pasted.append(block.index)
    if len(pasted) == 2:
        two_stitched.set()
        node_gone.wait(600)
    return stitch(canvas, kept, block)
blockwise.LabelCanvas.paste = counting_paste
outcome = {{}}
run = threading.Thread(target=lambda: outcome.update(result=segment_folder(
    {input!r}, {output!r}, block_size=256, cpus_per_actor=1.0, report=False)))
run.start()
try:
    assert two_stitched.wait(600)
    cluster.remove_node(worker)
    print("NODE_REMOVED_AFTER", len(pasted), "BLOCKS", flush=True)
    node_gone.set()
    run.join()
    print("ROWS", outcome["result"].rows, flush=True)
finally:
    node_gone.set()
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_a_node_lost_while_its_blocks_run_loses_no_nucleus_and_writes_none_twice(tmp_path, ray_session):
    """Two simulated nodes share a large image's 16 blocks; the worker node is removed once two blocks have
    finished. Its blocks run again on the head node: the labels are those of an undisturbed run."""
    from pipeline.api import segment_folder
    from pipeline.labels.metric import matched_ious

    (tmp_path / "in").mkdir()
    write_large_tiff(tmp_path / "in" / "slide.tif", fluorescence_mosaic(1024, 1024))
    script = NODE_LOSS_SCRIPT.format(root=ROOT, input=str(tmp_path / "in"), output=str(tmp_path / "lost"))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "NODE_REMOVED_AFTER" in log, log[-4000:]
    assert int(log.split("NODE_REMOVED_AFTER ")[1].split()[0]) < 16 and "'status': 'done'" in log, log[-4000:]
    assert "in 16 blocks on 2 node(s)" in log, log[-4000:]  # the worker node had run blocks before it went

    segment_folder(str(tmp_path / "in"), str(tmp_path / "calm"), block_size=256, cpus_per_actor=1.0, report=False)
    lost = tifffile.imread(tmp_path / "lost" / "labels" / "slide.tif")
    calm = tifffile.imread(tmp_path / "calm" / "labels" / "slide.tif")
    assert lost.max() == calm.max() == len(np.unique(lost)) - 1 > 100
    matched = matched_ious(calm, lost)
    assert len(matched) == calm.max() and matched.min() > 0.99
