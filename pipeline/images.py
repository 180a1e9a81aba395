"""Pure image functions: decode any supported file to RGB uint8, resize, normalise.

No Ray or TensorFlow here, so these run the same in a plain loop, a Ray task or a test.
"""
from __future__ import annotations

import io

import cv2
import numpy as np

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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an HxWx3 RGB uint8 array.

    Alpha is dropped, greyscale expanded, 16-bit scaled to 8-bit and float images mapped to 0..255.
    Raises BadImageError for empty, undecodable or oversized input.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    dims = image_dimensions(data)
    if dims is not None and dims[0] * dims[1] > max_pixels:
        raise BadImageError(
            f"image is {dims[1]}x{dims[0]} = {dims[0] * dims[1]:,} pixels, over the limit of {max_pixels:,}"
        )
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise BadImageError("not a decodable image (corrupt, truncated or not an image format)")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise BadImageError(f"image has {image.shape[0] * image.shape[1]:,} pixels, over the limit of {max_pixels:,}")
    return to_rgb_uint8(image)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert an OpenCV-decoded array (BGR order, any depth, 1-4 channels) to RGB uint8."""
    image = _to_uint8(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:  # grey + alpha
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return np.ascontiguousarray(image[:, :, :3][:, :, ::-1])  # more channels: keep the first three


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if image.dtype == np.int8 or image.dtype == np.int16:
        image = image.astype(np.float32)
    values = image.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, 0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


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
