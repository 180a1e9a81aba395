"""Exports for lab tools: QuPath GeoJSON, Fiji ROI sets and OME-TIFF read back as the same nuclei."""
import io
import json

import numpy as np
import pytest

from pipeline.exports import (fill_outline, geojson_bytes, imagej_rois_bytes, nucleus_outlines, ome_tiff_bytes,
                              parse_exports)
from pipeline.synthetic import render_sample


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


def test_geojson_is_qupath_detections_that_shapely_reads(labels):
    shapely = pytest.importorskip("shapely.geometry")
    measurements = {"image_id": np.array(["a"] * 2), "label": np.array([1, 2]), "area": np.array([10, 20]),
                    "solidity": np.array([0.9, np.nan])}
    collection = json.loads(geojson_bytes(labels, measurements))
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
