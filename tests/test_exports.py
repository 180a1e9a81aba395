"""Exports for lab tools (QuPath GeoJSON, Fiji ROI sets and OME-TIFF read back as the same nuclei) and physical
pixel sizes read from the images' own metadata."""
import io
import json
import os

import numpy as np
import pytest

from pipeline.outputs.exports import (fill_outline, geojson_bytes, imagej_rois_bytes, nucleus_outlines, ome_tiff_bytes,
                              parse_exports)
from pipeline.io.synthetic import render_sample


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """Synthetic nuclei, some touching, with a one-pixel nucleus and one at the image's corner added."""
    labels = render_sample(3, 2).labels.astype(np.int32)
    labels[0:5, 0:6] = labels.max() + 1
    labels[100, 300] = labels.max() + 1
    return labels


def ious(labels: np.ndarray, polygons: dict[int, np.ndarray]) -> dict[int, float]:
    """Each nucleus' IoU with its polygon filled again by pixel centres."""
    scores = {}
    for label, points in polygons.items():
        filled, truth = fill_outline(points, labels.shape), labels == label
        scores[label] = (filled & truth).sum() / (filled | truth).sum()
    return scores


def test_outlines_fill_back_to_their_nuclei(labels):
    outlines = nucleus_outlines(labels)
    assert sorted(outlines) == list(range(1, labels.max() + 1))
    scores = ious(labels, outlines)
    assert min(scores.values()) > 0.95 and np.median(list(scores.values())) == 1.0
    assert all(np.array_equal(points[0], points[-1]) for points in outlines.values())  # closed rings


def test_geojson_is_valid_qupath_detections_that_shapely_reads(labels):
    shapely = pytest.importorskip("shapely.geometry")
    measurements = {"image_id": np.array(["a"] * 2), "label": np.array([1, 2]), "area": np.array([10, 20]),
                    "solidity": np.array([0.9, np.nan])}
    collection = json.loads(geojson_bytes(labels, measurements))
    jsonschema = pytest.importorskip("jsonschema")
    with open(os.path.join(os.path.dirname(__file__), "data", "geojson", "FeatureCollection.json")) as stream:
        jsonschema.validate(collection, json.load(stream))  # geojson.org's schema
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == labels.max()
    polygons = {}
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["properties"]["objectType"] == "detection"
        shape = shapely.shape(feature["geometry"])
        assert shape.geom_type == "Polygon" and shape.is_valid
        polygons[int(feature["properties"]["name"])] = np.asarray(feature["geometry"]["coordinates"][0])
    assert min(ious(labels, polygons).values()) > 0.95
    first, second = (collection["features"][i]["properties"]["measurements"] for i in (0, 1))
    assert first == {"area": 10, "solidity": 0.9} and second == {"area": 20, "solidity": None}  # NaN: no value


def test_imagej_roi_set_reads_back_with_roifile(labels, tmp_path):
    roifile = pytest.importorskip("roifile")
    path = tmp_path / "nuclei.rois.zip"
    path.write_bytes(imagej_rois_bytes(labels))
    rois = roifile.roiread(str(path))
    assert [roi.name for roi in rois] == [str(label) for label in range(1, labels.max() + 1)]
    polygons = {int(roi.name): np.vstack([roi.coordinates(), roi.coordinates()[:1]]) for roi in rois}
    assert min(ious(labels, polygons).values()) > 0.95


def test_ome_tiff_keeps_labels_and_pixel_size(labels):
    import tifffile

    with tifffile.TiffFile(io.BytesIO(ome_tiff_bytes(labels, pixel_size_um=0.325))) as tiff:
        assert tiff.is_ome and 'PhysicalSizeX="0.325"' in tiff.ome_metadata
        np.testing.assert_array_equal(tiff.asarray(), labels)
    many = np.arange(70_000, dtype=np.int32).reshape(100, 700)  # past 65,535 nuclei: 32-bit
    with tifffile.TiffFile(io.BytesIO(ome_tiff_bytes(many))) as tiff:
        assert tiff.asarray().dtype == np.uint32 and "PhysicalSizeX" not in tiff.ome_metadata


def test_unknown_export_is_refused_by_name():
    assert parse_exports(" geojson, ome-tiff ") == ("geojson", "ome-tiff")
    with pytest.raises(ValueError, match="unknown format shp; choose among geojson"):
        parse_exports("geojson,shp")


def tiff_bytes(**options) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((32, 32), np.uint8), **options)
    return buffer.getvalue()


@pytest.mark.parametrize("options, expected", [
    (dict(ome=True, metadata={"PhysicalSizeX": 0.325, "PhysicalSizeXUnit": "µm"}), (0.325, "OME-TIFF PhysicalSizeX")),
    (dict(ome=True, metadata={"PhysicalSizeX": 650, "PhysicalSizeXUnit": "nm"}), (0.65, "OME-TIFF PhysicalSizeX")),
    (dict(imagej=True, resolution=(2.0, 2.0), metadata={"unit": "micron"}), (0.5, "ImageJ TIFF (micron)")),
    (dict(resolution=(20_000, 20_000), resolutionunit=3), (0.5, "TIFF resolution (cm)")),
    (dict(resolution=(72, 72), resolutionunit=2), (None, "")),  # a default 72 dpi is no microscope's pixel size
    (dict(), (None, "")),
])
def test_pixel_size_is_read_from_the_tiff_itself(options, expected):
    from pipeline.io.units import pixel_size_from_tiff

    size, source = pixel_size_from_tiff(tiff_bytes(**options))
    assert (size if size is None else pytest.approx(size), source) == (
        expected[0] if expected[0] is None else pytest.approx(expected[0]), expected[1])
    assert pixel_size_from_tiff(b"not a tiff") == (None, "")


def test_micron_columns_scale_with_the_pixel_size(labels):
    from pipeline.outputs.measure import COLUMNS, measure_nuclei

    image = np.zeros((*labels.shape, 3), np.uint8)
    pixels, microns = measure_nuclei(labels, image, "a"), measure_nuclei(labels, image, "a", pixel_size_um=0.5)
    assert tuple(microns) == COLUMNS and np.isnan(pixels["area_um2"]).all()
    np.testing.assert_allclose(microns["area_um2"], pixels["area"] * 0.25)
    np.testing.assert_allclose(microns["perimeter_um"], pixels["perimeter"] * 0.5)
    np.testing.assert_allclose(microns["centroid_x_um"], pixels["centroid_x"] * 0.5)
