"""Label images on disk: 16-bit PNG up to 65,535 nuclei, compressed 32-bit TIFF above (a PNG cannot hold more).

Pure numpy / OpenCV / tifffile: no Ray or TensorFlow. Readers accept both formats, whatever the extension.
"""
from __future__ import annotations

import io

import cv2
import numpy as np

PNG_MAX_LABEL = 65_535
LABEL_SUFFIXES = (".png", ".tif")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def label_suffix(labels: np.ndarray) -> str:
    """'.png' when every label fits 16 bits, else '.tif'."""
    return ".png" if int(np.max(labels, initial=0)) <= PNG_MAX_LABEL else ".tif"


def encode_labels_file(labels: np.ndarray) -> tuple[bytes, str]:
    """(file bytes, suffix) of an instance label image: lossless, the smallest type that holds its labels."""
    suffix = label_suffix(labels)
    if suffix == ".png":
        ok, data = cv2.imencode(".png", np.ascontiguousarray(labels, dtype=np.uint16))
        if not ok:
            raise ValueError("could not encode the label image as PNG")
        return data.tobytes(), suffix
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(labels, dtype=np.uint32), compression="zlib")
    return buffer.getvalue(), suffix


def decode_labels_file(data: bytes) -> np.ndarray:
    """An int64 label image from PNG or TIFF bytes."""
    if data[:4] in _TIFF_MAGIC:
        import tifffile

        return tifffile.imread(io.BytesIO(data)).astype(np.int64)
    labels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise ValueError("not a PNG or TIFF label image")
    return labels.astype(np.int64)
