"""Decoding every kind of image file the pipeline meets, and refusing the bad ones with a reason."""
import cv2
import numpy as np
import pytest

from pipeline.io.images import BadImageError, decode_image, normalise, resize_image, resize_mask


def png(array):
    return cv2.imencode(".png", array)[1].tobytes()


def test_rgba_png_drops_alpha_and_swaps_to_rgb():
    bgra = np.zeros((4, 5, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 10, 200, 7  # blue 10, red 200
    image = decode_image(png(bgra))
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    assert (image[..., 0] == 200).all() and (image[..., 2] == 10).all()


def test_greyscale_is_expanded_to_three_channels():
    image = decode_image(png(np.full((3, 3), 99, np.uint8)))
    assert image.shape == (3, 3, 3) and (image == 99).all()


def test_16_bit_is_scaled_to_8_bit():
    image = decode_image(png(np.array([[0, 65535, 32896]], np.uint16)))
    assert image[0, :, 0].tolist() == [0, 255, 128]


def test_float_tiff_is_mapped_to_0_255():
    data = cv2.imencode(".tiff", np.array([[0.0, 0.5, 1.0]], np.float32))[1].tobytes()
    assert decode_image(data)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"<html><body>not an image</body></html>", "not a decodable image"),
    (png(np.zeros((50, 50), np.uint8))[:40], "not a decodable image"),
])
def test_bad_files_raise_a_one_line_reason(data, reason):
    with pytest.raises(BadImageError, match=reason) as error:
        decode_image(data)
    assert "\n" not in str(error.value)


def test_pixel_limit_refuses_before_decoding():
    with pytest.raises(BadImageError, match="over the limit"):
        decode_image(png(np.zeros((100, 100), np.uint8)), max_pixels=5000)


def test_resize_and_normalise():
    image = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    small = normalise(resize_image(image, 128))
    assert small.shape == (128, 128, 3) and small.dtype == np.float32
    assert 0.0 <= small.min() and small.max() <= 1.0
    labels = np.zeros((300, 500), np.int32)
    labels[100:200, 100:300] = 7
    assert set(np.unique(resize_mask(labels, 64))) == {0, 7}  # nearest neighbour keeps values exact
