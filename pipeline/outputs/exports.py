"""Label images as files the lab tools open as objects: QuPath GeoJSON, Fiji/ImageJ ROI zips, OME-TIFF (pure).

Outlines are each nucleus' iso-line at 0.5 on its mask (scikit-image's marching squares), so a polygon runs
between the nucleus' pixel centres and the background's: filling it again by pixel centres gives the nucleus back.
Coordinates are in pixels of the original image with (0, 0) at the top-left corner of the top-left pixel, the
convention of QuPath and ImageJ (a pixel's centre is at +0.5).
"""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np

EXPORTS = ("geojson", "imagej-rois", "ome-tiff")
SUFFIXES = {"geojson": ".geojson", "imagej-rois": ".rois.zip", "ome-tiff": ".ome.tif"}


def parse_exports(text: str) -> tuple[str, ...]:
    """The --export list (comma-separated names of EXPORTS), checked."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(names) - set(EXPORTS))
    if unknown:
        raise ValueError(f"--export: unknown format {', '.join(unknown)}; choose among {', '.join(EXPORTS)}")
    return names


def nucleus_outlines(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Each nucleus' outline as a closed polygon, (N, 2) float (x, y) image coordinates, first point repeated at
    the end; a nucleus in several pieces is outlined by its largest."""
    from scipy import ndimage
    from skimage.measure import find_contours

    outlines = {}
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = np.pad(labels[box] == index, 1).astype(np.float32)
        contours = find_contours(mask, 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)  # (row, col) in the padded crop
        x = ring[:, 1] - 1 + box[1].start + 0.5
        y = ring[:, 0] - 1 + box[0].start + 0.5
        outlines[index] = np.column_stack([x, y])
    return outlines


def fill_outline(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels whose centres lie inside an outline (the inverse of nucleus_outlines, for checks)."""
    from skimage.draw import polygon

    mask = np.zeros(shape, bool)
    rows, cols = polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, shape)
    mask[rows, cols] = True
    return mask


def geojson_bytes(labels: np.ndarray, measurements: dict | None = None) -> bytes:
    """A QuPath-style GeoJSON FeatureCollection: one detection per nucleus, its polygon and its measurements
    (pipeline.outputs.measure's columns for that label, when given) as properties."""
    return geojson_from_outlines(nucleus_outlines(labels), measurements)


def geojson_from_outlines(outlines: dict[int, np.ndarray], measurements: dict | None = None) -> bytes:
    """geojson_bytes from outlines already traced (label -> polygon), e.g. block by block for a large image."""
    rows = {}
    if measurements is not None and len(measurements.get("label", [])):
        names = [name for name in measurements if name not in ("image_id", "label")]
        for row, label in enumerate(measurements["label"]):
            rows[int(label)] = {name: _plain(measurements[name][row]) for name in names}
    features = []
    for label, points in outlines.items():
        ring = [[round(float(x), 2), round(float(y), 2)] for x, y in points]
        features.append({"type": "Feature", "id": f"nucleus-{label}",
                         "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "detection", "name": str(label),
                                        "classification": {"name": "Nucleus"},
                                        "measurements": rows.get(label, {})}})
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not np.isfinite(value) else value


def imagej_rois_bytes(labels: np.ndarray) -> bytes:
    """A Fiji/ImageJ ROI set (.zip of .roi files): one polygon ROI per nucleus, named by its label."""
    return imagej_rois_from_outlines(nucleus_outlines(labels))


def imagej_rois_from_outlines(outlines: dict[int, np.ndarray]) -> bytes:
    """imagej_rois_bytes from outlines already traced (label -> polygon)."""
    from roifile import ImagejRoi

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for label, points in outlines.items():
            roi = ImagejRoi.frompoints(points[:-1], name=str(label))
            archive.writestr(f"{label:06d}.roi", roi.tobytes())
    return buffer.getvalue()


def ome_tiff_bytes(labels: np.ndarray, pixel_size_um: float | None = None) -> bytes:
    """The labels as a compressed OME-TIFF (uint16, or uint32 past 65,535 nuclei), with the physical pixel size
    in micrometres when known."""
    import tifffile

    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    metadata = {"axes": "YX"}
    if pixel_size_um:
        metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeXUnit="µm", PhysicalSizeY=pixel_size_um,
                        PhysicalSizeYUnit="µm")
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, labels.astype(dtype), ome=True, metadata=metadata, compression="zlib")
    return buffer.getvalue()


def export_bytes(name: str, labels: np.ndarray, measurements: dict | None = None,
                 pixel_size_um: float | None = None) -> bytes:
    """The file content of one export format for one image's labels."""
    if name == "geojson":
        return geojson_bytes(labels, measurements)
    if name == "imagej-rois":
        return imagej_rois_bytes(labels)
    if name == "ome-tiff":
        return ome_tiff_bytes(labels, pixel_size_um)
    raise ValueError(f"unknown export {name!r}; choose among {', '.join(EXPORTS)}")
