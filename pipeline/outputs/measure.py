"""Per-nucleus measurements of a label image, as CellProfiler-style columns (units: pixels, intensities 0-255;
the `_um` columns in micrometres when the pixel size is known, else NaN).

scikit-image's `regionprops_table` measures; intensities are read on the original image's grey levels
(OpenCV's RGB to grey: 0.299 R + 0.587 G + 0.114 B). Pure numpy / scikit-image: no Ray or TensorFlow.
"""
from __future__ import annotations

import cv2
import numpy as np

# regionprops_table name -> column name
_PROPERTIES = {
    "label": "label", "area": "area", "centroid-1": "centroid_x", "centroid-0": "centroid_y",
    "bbox-1": "bbox_x0", "bbox-0": "bbox_y0", "bbox-3": "bbox_x1", "bbox-2": "bbox_y1",
    "perimeter": "perimeter", "eccentricity": "eccentricity", "solidity": "solidity",
    "axis_major_length": "major_axis_length", "axis_minor_length": "minor_axis_length", "orientation": "orientation",
    "intensity_mean": "mean_intensity", "intensity_min": "min_intensity", "intensity_max": "max_intensity",
}
INTEGER_COLUMNS = ("label", "area", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
MICRON_COLUMNS = ("area_um2", "perimeter_um", "centroid_x_um", "centroid_y_um")
COLUMNS = ("image_id", *_PROPERTIES.values(), "integrated_intensity", *MICRON_COLUMNS)


def measure_nuclei(labels: np.ndarray, image: np.ndarray, image_id: str,
                   pixel_size_um: float | None = None) -> dict[str, np.ndarray]:
    """One row per nucleus of `labels` (0 = background): shape, position and intensity on `image` (HxWx3 uint8).

    Bounding boxes are half-open ([x0, x1) x [y0, y1)); orientation is scikit-image's (radians, between the
    row axis and the major axis); integrated intensity is the sum of the grey levels over the nucleus. With
    `pixel_size_um` (micrometres per pixel) the area, perimeter and centroid are also given in micrometres.
    """
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    if labels.shape != grey.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {grey.shape[:2]} differ in size")
    table = regionprops_table(labels.astype(np.int32, copy=False), intensity_image=grey,
                              properties=("label", "area", "centroid", "bbox", "perimeter", "eccentricity", "solidity",
                                          "axis_major_length", "axis_minor_length", "orientation", "intensity_mean",
                                          "intensity_min", "intensity_max"))
    columns = {"image_id": np.full(len(table["label"]), image_id, dtype=object)}
    for source, name in _PROPERTIES.items():
        columns[name] = np.asarray(table[source], np.int64 if name in INTEGER_COLUMNS else np.float64)
    columns["integrated_intensity"] = columns["mean_intensity"] * columns["area"]
    size = float(pixel_size_um) if pixel_size_um else np.nan
    columns["area_um2"] = columns["area"] * size * size
    columns["perimeter_um"] = columns["perimeter"] * size
    columns["centroid_x_um"] = columns["centroid_x"] * size
    columns["centroid_y_um"] = columns["centroid_y"] * size
    return columns


def image_summary(labels: np.ndarray) -> dict[str, float]:
    """Per-image summary for the manifest: nuclei, mean nucleus area (pixels), fraction of the image covered."""
    labels = np.asarray(labels)
    count = int(labels.max(initial=0))
    covered = int(np.count_nonzero(labels))
    return {"nuclei": count, "mean_area": round(covered / count, 2) if count else 0.0,
            "covered_fraction": round(covered / max(1, labels.size), 6)}
