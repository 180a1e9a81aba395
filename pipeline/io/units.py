"""Physical pixel size of an image file, read from its own metadata (OME-TIFF, ImageJ TIFF, TIFF resolution tags,
OME-Zarr).

Pure: tifffile and zarr only. Sizes are micrometres per pixel along x; images with different x and y sizes are measured
with x's (the measurements' micron columns say which size they used in the manifest).
"""
from __future__ import annotations

import io

from pipeline.io.ome import ome_axes, ome_multiscales

TIFF_SUFFIXES = (".tif", ".tiff")
MAX_MICROSCOPE_PIXEL_UM = 25.0  # larger "pixel sizes" from resolution tags are a default DPI, not a measurement
# micrometres per unit
_UNITS = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "nm": 1e-3,
          "\\u00B5m": 1.0, "μm": 1.0, "micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4,
          "meter": 1e6}


def pixel_size_from_tiff(data: bytes | str) -> tuple[float | None, str]:
    """(micrometres per pixel, where it came from) of a TIFF's bytes or local path: its OME metadata's
    PhysicalSizeX, else ImageJ's unit with the resolution tags, else the resolution tags in inches or centimetres;
    (None, "") when it says none. A path reads the metadata only, not the pixels."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data) if isinstance(data, bytes) else data) as tiff:
            if tiff.is_ome and tiff.ome_metadata:
                size = _ome_pixel_size(tiff.ome_metadata)
                if size is not None and plausible_pixel_size(size):
                    return size, "OME-TIFF PhysicalSizeX"
                if size is not None:
                    return None, f"ignored: OME-TIFF PhysicalSizeX of {size:g} µm describes no microscope"
            page = tiff.pages.first
            tag = page.tags.get("XResolution")
            if tag is None:
                return None, ""
            numerator, denominator = tag.value
            per_unit = numerator / denominator if denominator else 0.0  # pixels per unit
            if per_unit <= 0:
                return None, ""
            unit = str((tiff.imagej_metadata or {}).get("unit", "")).strip()
            if unit in _UNITS:
                size = _UNITS[unit] / per_unit
                if not plausible_pixel_size(size):
                    return None, f"ignored: ImageJ pixel size of {size:g} µm describes no microscope"
                return size, f"ImageJ TIFF ({unit})"
            resolution_unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
            units = {2: (25_400.0, "inch"), 3: (10_000.0, "cm"), 4: (1_000.0, "mm"), 5: (1.0, "µm")}
            if resolution_unit in units:
                size = units[resolution_unit][0] / per_unit
                # A screen's or scanner's 72-300 dots per inch (85-350 µm) describe no microscope.
                if size <= MAX_MICROSCOPE_PIXEL_UM:
                    return size, f"TIFF resolution ({units[resolution_unit][1]})"
    except (tifffile.TiffFileError, ValueError, KeyError, ZeroDivisionError):
        return None, ""
    return None, ""


def plausible_pixel_size(size_um: float) -> bool:
    """Whether a pixel size read from metadata can be a microscope's (a default of 0, 1 inch or 1e6 is not)."""
    return 1e-3 <= size_um <= MAX_MICROSCOPE_PIXEL_UM


def _ome_pixel_size(xml: str) -> float | None:
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.fromstring(xml)
    for element in root.iter():
        if element.tag.endswith("Pixels") and element.get("PhysicalSizeX"):
            unit = element.get("PhysicalSizeXUnit", "µm")
            return float(element.get("PhysicalSizeX")) * _UNITS.get(unit, 1.0)
    return None


def pixel_size_from_zarr(path: str) -> tuple[float | None, str]:
    """(micrometres per pixel, where it came from) of an OME-Zarr image: its full-resolution level's x scale
    (times the multiscale's own, if any) in the x axis' unit; (None, "") for a plain array or no spatial unit."""
    import zarr

    try:
        node = zarr.open(path, mode="r")
        multiscales = [] if isinstance(node, zarr.Array) else ome_multiscales(dict(node.attrs))
        if not multiscales:
            return None, ""
        multiscale = multiscales[0]
        level = node[multiscale["datasets"][0]["path"]]
        x = ome_axes(multiscale, level.ndim).index("X")
        unit = next((axis.get("unit", "") for axis in multiscale.get("axes", [])
                     if isinstance(axis, dict) and axis.get("name", "").lower() == "x"), "")
        if unit not in _UNITS:
            return None, ""
        size = 1.0
        for transforms in (multiscale["datasets"][0].get("coordinateTransformations", []),
                           multiscale.get("coordinateTransformations", [])):
            for transform in transforms:
                if transform.get("type") == "scale":
                    size *= float(transform["scale"][x])
        size *= _UNITS[unit]
        if not plausible_pixel_size(size):
            return None, f"ignored: OME-Zarr scale of {size:g} µm per pixel describes no microscope"
        return size, "OME-Zarr scale"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None, ""
