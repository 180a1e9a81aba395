"""Native-resolution helpers: appearance, augmented crops, tiled and flip-averaged whole-image prediction."""
import cv2
import numpy as np
import pytest

from pipeline.data.augment import (flip_average, predict_full_image, random_crops, standardise_appearance,
                              tile_starts)
from pipeline.data.protocol import image_kind
from pipeline.io.synthetic import render_sample


def looks_like_fluorescence(image: np.ndarray, labels: np.ndarray) -> bool:
    grey = image[..., 0].astype(float)
    return grey[labels > 0].mean() > grey[labels == 0].mean() + 40


@pytest.mark.parametrize("index", range(6))
def test_standardised_images_show_bright_nuclei_on_dark_whatever_the_kind(index):
    sample = render_sample(7, index)
    out = standardise_appearance(sample.image)
    assert out.shape == sample.image.shape and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 2]).all()  # grey
    assert looks_like_fluorescence(out, sample.labels)


def test_colour_appearance_keeps_the_hue_that_grey_loses():
    """H&E-like: purple nuclei and red tissue invert to the same grey; the colour appearance keeps them apart."""
    image = np.full((64, 64, 3), (235, 215, 235), np.uint8)  # pale pink background
    image[:, 40:] = (225, 40, 110)  # eosin-red tissue on the right third
    image[8:24, 8:24] = (95, 45, 140)  # a purple nucleus on the background...
    image[40:56, 44:60] = (95, 45, 140)  # ...and one in the tissue
    grey, colour = standardise_appearance(image), standardise_appearance(image, keep_colour=True)
    nucleus, tissue = (16, 16), (16, 52)
    assert abs(int(grey[nucleus][0]) - int(grey[tissue][0])) < 60  # grey: nucleus and red tissue look alike
    assert (colour[nucleus] > colour[..., 0].min()).all()  # inverted: the nucleus is bright in every channel
    assert int(colour[nucleus][0]) - int(colour[tissue][0]) > 150  # but its red channel tells it from the tissue
    assert colour[2, 2].max() < 40  # background dark, as in fluorescence


@pytest.mark.parametrize("keep_colour", [False, True])
def test_stained_tissue_is_inverted_even_when_nuclei_and_red_tissue_cover_most_of_it(keep_colour):
    """Large purple nuclei packed on red tissue: the median pixel is dark, yet the nuclei must come out bright."""
    image = np.full((64, 64, 3), (235, 215, 235), np.uint8)  # pale pink background, a fifth of the image
    image[:, 13:] = (225, 40, 110)  # eosin-red tissue
    labels = np.zeros((64, 64), np.int32)
    for index, (top, left) in enumerate([(4, 16), (4, 40), (34, 16), (34, 40)], start=1):
        image[top:top + 24, left:left + 20] = (95, 45, 140)  # haematoxylin-purple nuclei, half the image
        labels[top:top + 24, left:left + 20] = index
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    assert np.median(grey) < 127 and image_kind(image) == "stained"  # a median rule alone would not invert it
    out = standardise_appearance(image, keep_colour=keep_colour)
    assert looks_like_fluorescence(out, labels)


def test_real_stained_images_with_a_dark_median_come_out_with_bright_nuclei(real_zip):
    """The three of DSB2018's 600 shared images that a median rule left uninverted (two of them score ~0 so)."""
    from pipeline.io.sources import list_kaggle, load_sample

    wanted = ("13f2bec0a24c", "4193474b2f1c", "52a6b8ae4c8e")
    refs = [ref for ref in list_kaggle(real_zip).refs if ref.image_id.startswith(wanted)]
    assert len(refs) == 3
    for ref in refs:
        sample = load_sample(ref)
        assert image_kind(sample.image) == "stained"
        red = standardise_appearance(sample.image, keep_colour=True)[..., 0]  # inverted: purple bright, eosin dark
        assert np.median(red[sample.labels > 0]) > np.median(red[sample.labels == 0]) + 40, ref.image_id


@pytest.mark.parametrize("index", range(6))
def test_colour_appearance_equals_standardised_on_grey_images(index):
    image = render_sample(7, index).image
    grey = np.repeat(image[..., :1], 3, axis=-1)
    assert (standardise_appearance(grey, keep_colour=True) == standardise_appearance(grey)).all()
    assert looks_like_fluorescence(standardise_appearance(image, keep_colour=True), render_sample(7, index).labels)


def test_image_kinds_of_the_synthetic_looks():
    kinds = {image_kind(render_sample(7, index).image) for index in range(9)}
    assert kinds == {"fluorescence", "stained", "bright-field"}


def test_random_crops_keep_image_and_labels_aligned():
    sample = render_sample(3, 1)
    rng = np.random.default_rng(0)
    crops = random_crops(sample.image, sample.labels, 96, 10, rng, augment=False)
    assert len(crops) == 10
    for image, labels in crops:
        assert image.shape == (96, 96, 3) and labels.shape == (96, 96)
        # Without augmentation a crop is a window of the original: find it and compare.
        found = np.argwhere((sample.image[..., 0] == image[0, 0, 0]))
        assert any(np.array_equal(sample.labels[y:y + 96, x:x + 96], labels) for y, x in found
                   if y + 96 <= sample.labels.shape[0] and x + 96 <= sample.labels.shape[1])


def test_augmented_crops_are_seeded_varied_and_keep_label_values():
    sample = render_sample(3, 2)
    first = random_crops(sample.image, sample.labels, 64, 6, np.random.default_rng(1), augment=True)
    again = random_crops(sample.image, sample.labels, 64, 6, np.random.default_rng(1), augment=True)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    assert len({crop[0].tobytes() for crop in first}) == 6
    assert all(set(np.unique(labels)) <= set(np.unique(sample.labels)) for _, labels in first)


def test_crops_from_an_image_smaller_than_the_crop_are_padded():
    image, labels = np.full((20, 30, 3), 200, np.uint8), np.ones((20, 30), np.int32)
    (crop, crop_labels), = random_crops(image, labels, 64, 1, np.random.default_rng(0), augment=False)
    assert crop.shape == (64, 64, 3) and crop_labels[:20, :30].all() and not crop_labels[20:].any()


def test_tiles_cover_the_whole_length_with_overlap():
    assert tile_starts(500, 512, 64) == [0]
    starts = tile_starts(2000, 512, 64)
    assert starts[0] == 0 and starts[-1] == 2000 - 512
    assert all(b - a <= 512 - 64 for a, b in zip(starts, starts[1:]))


def pixelwise(batch: np.ndarray) -> np.ndarray:
    """A 'model' whose output at each pixel depends only on that pixel: tiling must not change it."""
    red = batch[..., :1]
    return np.concatenate([1 - red, red], axis=-1)


def test_whole_image_prediction_is_the_same_tiled_or_not():
    image = np.random.default_rng(0).random((300, 457, 3)).astype(np.float32)
    whole = predict_full_image(image, pixelwise, tile=1024)
    tiled = predict_full_image(image, pixelwise, tile=128, overlap=32)
    assert whole.shape == (300, 457, 2)
    np.testing.assert_allclose(whole[..., 1], image[..., 0], atol=1e-6)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_tiles_bound_the_size_of_each_model_call():
    seen = []

    def recording(batch):
        seen.append(batch.shape)
        return pixelwise(batch)

    predict_full_image(np.zeros((1000, 700, 3), np.float32), recording, tile=256, overlap=32, flips=True)
    assert max(shape[1] for shape in seen) <= 256 and max(shape[2] for shape in seen) <= 256
    assert len(seen) == 4 * 5 * 3  # 1024/704 padded: 5 x 3 tiles, each seen as is and in three flips


def test_flip_average_undoes_each_flip():
    batch = np.random.default_rng(1).random((2, 32, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(flip_average(batch, pixelwise), pixelwise(batch), atol=1e-6)
    lopsided = lambda x: np.repeat(np.linspace(0, 1, x.shape[2])[None, None, :, None], 2, -1) * np.ones_like(x[..., :2])  # noqa: E731
    averaged = flip_average(batch, lopsided)
    np.testing.assert_allclose(averaged, 0.5, atol=1e-6)  # a left-right gradient averages out with its mirror
