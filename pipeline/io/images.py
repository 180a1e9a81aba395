"""Pure image functions: decode any supported file to RGB uint8, resize, normalise.

No Ray or TensorFlow here, so these run the same in a plain loop, a Ray task or a test.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.io.channels import select_plane

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_MAX_PIXELS = 100_000_000  # 10,000 x 10,000: guards against decompression bombs

cv2.setNumThreads(1)  # Parallelism comes from Ray (or the caller), not from OpenCV's own pool.


class BadImageError(ValueError):
    """An input file that cannot be used; the message is one line saying why."""


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(height, width) read from the file header without decoding pixels, or None if unknown."""
    try:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # we apply our own limit, with our own message
        with Image.open(io.BytesIO(data)) as handle:
            width, height = handle.size
            return int(height), int(width)
    except Exception:  # noqa: BLE001 - any header we cannot parse is left to the decoder
        return None


@dataclass(frozen=True)
class Decoded:
    """An image ready for the model (HxWx3 RGB uint8) and what reading it chose, for the manifest."""

    image: np.ndarray
    channel: str = ""  # which channel or colour became the image, and why ('' : the file's own grey or RGB)
    plane: str = ""  # how Z, T and other axes were reduced ('' : the file had none)
    intensity: str = ""  # how values were mapped to 0-255 ('' : 8-bit, as is)


READING_COLUMNS = ("channel", "plane", "intensity")  # Decoded's notes, as manifest columns
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def read_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, channel: str = "") -> Decoded:
    """Decode image bytes (PNG, JPEG, BMP, TIFF / OME-TIFF of any axes) into the model's RGB uint8 image.

    TIFFs are read with their axes and channel names (pipeline.io.channels picks the nuclear channel, `channel` being
    --nuclear-channel); any bit depth is mapped to 0-255 by its own percentiles (intensity_to_uint8).
    Raises BadImageError for empty, undecodable or oversized input.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    dims = image_dimensions(data)
    if dims is not None and dims[0] * dims[1] > max_pixels:
        raise BadImageError(
            f"image is {dims[1]}x{dims[0]} = {dims[0] * dims[1]:,} pixels, over the limit of {max_pixels:,}"
        )
    if data[:4] in TIFF_MAGIC:
        stack = _read_tiff(data, max_pixels)
        if stack is not None:
            return image_from_array(*stack, channel=channel)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise BadImageError("not a decodable image (corrupt, truncated or not an image format)")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise BadImageError(f"image has {image.shape[0] * image.shape[1]:,} pixels, over the limit of {max_pixels:,}")
    return from_opencv(image, channel)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, channel: str = "") -> np.ndarray:
    """read_image's RGB uint8 image alone."""
    return read_image(data, max_pixels, channel).image


def _read_tiff(data: bytes, max_pixels: int) -> tuple[np.ndarray, str, list[str]] | None:
    """(array, axes, channel names) of a TIFF's first series, or None where tifffile cannot read it (OpenCV tries)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            series = tiff.series[0]
            axes, shape = series.axes, series.shape
            if "Y" in axes and "X" in axes:
                pixels = shape[axes.index("Y")] * shape[axes.index("X")]
                if pixels > max_pixels:
                    raise BadImageError(f"image has {pixels:,} pixels, over the limit of {max_pixels:,}")
            if int(np.prod(shape)) > 8 * max_pixels:
                raise BadImageError(f"a {axes} stack of {int(np.prod(shape)):,} values, over 8 x the pixel limit")
            return series.asarray(), axes, channel_names(tiff, series)
    except BadImageError:
        raise
    except Exception:  # noqa: BLE001 - a TIFF tifffile cannot read (codec, layout) may still decode in OpenCV
        return None


def channel_names(tiff, series) -> list[str]:
    """The channel names a TIFF's metadata gives (OME Channel Name, else ImageJ's labels of a channel stack), or []."""
    import xml.etree.ElementTree as ElementTree

    if tiff.is_ome and tiff.ome_metadata:
        try:
            root = ElementTree.fromstring(tiff.ome_metadata)
        except ElementTree.ParseError:
            return []
        for element in root.iter():
            if element.tag.endswith("Pixels"):
                return [child.get("Name", "") for child in element if child.tag.endswith("Channel")]
        return []
    labels = (tiff.imagej_metadata or {}).get("Labels") or []
    channels = series.shape[series.axes.index("C")] if "C" in series.axes else 0
    return [str(label) for label in labels[:channels]] if channels and len(labels) >= channels else []


def from_opencv(image: np.ndarray, channel: str = "") -> Decoded:
    """An OpenCV-decoded array (BGR(A) order, grey + alpha, any depth) as a Decoded image."""
    if image.ndim == 3 and image.shape[2] == 2:  # grey + alpha
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] in (3, 4):  # BGR(A) -> RGB, in one pass where OpenCV has the depth
        if image.dtype in (np.uint8, np.uint16, np.float32):
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        else:
            image = image[:, :, 2::-1]
    return image_from_array(image, channel=channel)


def image_from_array(array: np.ndarray, axes: str = "", names: list[str] | None = None, channel: str = "",
                     levels: tuple[float, float] | None = None, colours: str = "auto") -> Decoded:
    """Any array (axes in tifffile's letters, guessed when not given; RGB order) -> the model's RGB uint8 image:
    the nuclear plane (pipeline.io.channels.select_plane), then intensity_to_uint8 (`levels` and `colours`: the whole
    image's, for a window of it)."""
    try:
        plane, channel_note, plane_note = select_plane(array, axes, names, channel, colours)
    except ValueError as error:
        raise BadImageError(str(error).splitlines()[0]) from None
    image, intensity = intensity_to_uint8(plane, levels)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return Decoded(np.ascontiguousarray(image), channel_note, plane_note, intensity)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert an OpenCV-decoded array (BGR order, any depth, 1-4 channels) to the model's RGB uint8 image."""
    return from_opencv(image).image


STRETCH_PERCENTILES = (0.1, 99.9)  # the model's own look (pipeline.data.augment) stretches further, per image
DIM_8BIT = 128  # an 8-bit image whose 99.9th percentile is under this is dim: stretched like a deeper one
AS_IS = (0.0, 255.0)  # levels that leave an 8-bit image as it is: a block already read by its whole image's levels


def intensity_levels(values: np.ndarray) -> tuple[float, float]:
    """(low, high) that map an image of any depth to 0-255: its 0.1st and 99.9th percentiles over finite values
    (a camera offset, a 12-bit range or a few saturated pixels change nothing), min and max when those meet."""
    flat = np.asarray(values).ravel()
    sample = flat[:: max(1, flat.size // 1_000_000)]
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 0.0
    if sample.dtype in (np.uint8, np.uint16):
        cumulative = np.cumsum(np.bincount(sample)) / sample.size
        low, high = (float(np.searchsorted(cumulative, q / 100.0)) for q in STRETCH_PERCENTILES)
    else:
        low, high = (float(v) for v in np.percentile(sample.astype(np.float64), STRETCH_PERCENTILES))
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    return low, high


def _looks_dim(values: np.ndarray) -> bool:
    """Whether an 8-bit image's 99.9th percentile is under DIM_8BIT (under 0.1% of its values that high), in one
    comparison: the usual image pays nothing more."""
    above = 1.0 - STRETCH_PERCENTILES[1] / 100.0  # the share of values above the 99.9th percentile
    return values.size > 0 and np.count_nonzero(values >= DIM_8BIT) <= above * values.size


def _is_grey(values: np.ndarray) -> bool:
    """One plane, or channels (the last axis) that are all equal."""
    if values.ndim < 3 or values.shape[-1] == 1:
        return True
    return all(np.array_equal(values[..., 0], values[..., c]) for c in range(1, values.shape[-1]))


def uint8_levels(values: np.ndarray) -> tuple[float, float]:
    """The levels an 8-bit image is read with: its own intensity_levels when it is dim and grey (a dim bright-field
    image would otherwise be read as fluorescence: its light background is under 128), else AS_IS. Colour stays as
    it is: stretching it would make a dim tinted image colourful enough to pass for stained tissue."""
    if _looks_dim(values) and _is_grey(values):
        low, high = intensity_levels(values)
        if low < high < DIM_8BIT:
            return low, high
    return AS_IS


def intensity_to_uint8(values: np.ndarray, levels: tuple[float, float] | None = None) -> tuple[np.ndarray, str]:
    """(uint8 image, note): 8-bit stays as it is unless dim and grey (uint8_levels); a dim grey 8-bit image and any
    other depth, range or sign (12/16-bit, float, camera offsets, NaNs) are stretched from their own
    `intensity_levels` to 0-255, so that a 16-bit original, its 8-bit export and a dim export give the model the same
    image. `levels`: the whole image's, for a window of it (AS_IS: an 8-bit window as it is)."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        low, high = uint8_levels(values) if levels is None else levels
        if (low, high) == AS_IS or high <= low:  # the usual 8-bit image: as it is, at a glance's cost
            return values, ""
        table = np.clip(np.rint((np.arange(256, dtype=np.float32) - low) * (255.0 / (high - low))), 0, 255)
        return table.astype(np.uint8)[values], f"dim uint8 {low:g}-{high:g} -> 0-255"
    if values.dtype == bool:
        return values.astype(np.uint8) * 255, "binary -> 0, 255"
    note = ""
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            bad = int(values.size - np.count_nonzero(finite))
            low_value = float(values[finite].min()) if finite.any() else 0.0
            values = np.where(finite, values, low_value)
            note = f"; {bad:,} NaN or infinite pixels set to the lowest value"
    low, high = intensity_levels(values) if levels is None else levels
    if high <= low:
        return np.zeros(values.shape, np.uint8), f"{values.dtype} flat image ({low:g}) -> 0{note}"
    if values.dtype == np.uint16:  # a lookup table: one pass over the pixels
        table = np.clip(np.rint((np.arange(65536, dtype=np.float32) - low) * (255.0 / (high - low))), 0, 255)
        image = table.astype(np.uint8)[values]
    else:
        image = np.clip(np.rint((values.astype(np.float32) - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return image, f"{values.dtype} {low:g}-{high:g} -> 0-255{note}"


def decode_mask(data: bytes) -> np.ndarray:
    """Decode one nucleus mask file to a boolean HxW array (any non-zero pixel is nucleus)."""
    if not data:
        raise BadImageError("empty mask file (0 bytes)")
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.size == 0:
        raise BadImageError("mask is not a decodable image")
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an image to size (square int or (height, width)): area averaging down, linear up."""
    height, width = (size, size) if isinstance(size, int) else size
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a label or binary mask with nearest neighbour, so values stay exact."""
    height, width = (size, size) if isinstance(size, int) else size
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def normalise(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 image to float32 in [0, 1], in one pass (into `out` when given: no temporary array)."""
    return np.multiply(image, np.float32(1.0 / 255.0), out=out, dtype=np.float32)


def encode_png(array: np.ndarray) -> bytes:
    """Encode a uint8/uint16 array (greyscale or RGB) as PNG bytes."""
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()
