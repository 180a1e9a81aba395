"""The test split as labs' files show it: each shift turns a real image and its true labels into another file.

A model that only knows 8-bit PNGs loses its nuclei on 16-bit camera data, one-colour exports and channel stacks;
these variants make that measurable (benchmarks/shifts.py scores them beside the plain images, tests/ check the
reading is invariant to them). Each returns (file suffix, file bytes, true labels at the file's size).
Pure: numpy, OpenCV, tifffile, scikit-image.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
import tifffile

from pipeline.io.images import encode_png
from pipeline.data.protocol import is_stained

CAMERA_OFFSET, CAMERA_GAIN = 33_000, 15  # 16-bit with an offset: 33,000 + 15 x grey


def _is_colour(image: np.ndarray) -> bool:
    return is_stained(image)


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def sixteen_bit(image: np.ndarray, labels: np.ndarray):
    """16-bit TIFF on a camera offset (33,000 + 15 x value): grey for grey images, RGB for colour ones."""
    data = image if _is_colour(image) else _grey(image)
    scaled = (CAMERA_OFFSET + CAMERA_GAIN * data.astype(np.uint32)).astype(np.uint16)
    return ".tif", _tiff(scaled, photometric="rgb" if scaled.ndim == 3 else "minisblack"), labels


def dim(image: np.ndarray, labels: np.ndarray):
    """8-bit PNG at a quarter of the brightness: most pixels in the lowest grey levels."""
    return ".png", encode_png(np.rint(image.astype(np.float32) / 4).astype(np.uint8)), labels


def one_colour(image: np.ndarray, labels: np.ndarray):
    """A grey image exported in the blue channel alone (a DAPI / Hoechst export); colour images as they are."""
    if _is_colour(image):
        return ".png", encode_png(image), labels
    blue = np.zeros_like(image)
    blue[..., 2] = _grey(image)
    return ".png", encode_png(blue), labels


def channel_stack(image: np.ndarray, labels: np.ndarray):
    """A 2-channel OME-TIFF (CYX): channel 0 'Actin' (the image's inverse, blurred: another stain's signal),
    channel 1 'DAPI' (the image); colour images as they are."""
    if _is_colour(image):
        return ".png", encode_png(image), labels
    grey = _grey(image)
    actin = cv2.GaussianBlur(255 - grey, (0, 0), 5)
    stack = np.stack([actin, grey]).astype(np.uint16) * 16  # 12-bit data in 16-bit, as cameras write it
    return ".ome.tif", _tiff(stack, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["Actin", "DAPI"]}}), \
        labels


def rescaled(factor: float):
    """The image and its labels resized by `factor` (nuclei that many times larger or smaller: another objective)."""
    def shift(image: np.ndarray, labels: np.ndarray):
        size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
        resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        return ".png", encode_png(resized), cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)

    shift.__doc__ = f"resized x{factor:g}"
    return shift


def stain_shifted(image: np.ndarray, labels: np.ndarray):
    """Colour images with another lab's H&E: haematoxylin x0.7, eosin x1.4 (colour deconvolution); grey ones as
    they are."""
    from skimage.color import hed2rgb, rgb2hed

    if not _is_colour(image):
        return ".png", encode_png(image), labels
    hed = rgb2hed(image)
    hed[..., 0] *= 0.7
    hed[..., 1] *= 1.4
    return ".png", encode_png(np.clip(np.rint(hed2rgb(hed) * 255), 0, 255).astype(np.uint8)), labels


SHIFTS = {"16-bit with offset": sixteen_bit, "dim (1/4)": dim, "one colour (blue)": one_colour,
          "2-channel stack": channel_stack, "x0.5": rescaled(0.5), "x2": rescaled(2.0), "stain-shifted": stain_shifted}
