"""The outline refiner: band features, relabelling, and a fitted refiner that finds the edges the image shows."""
import numpy as np
import pytest
from scipy import ndimage

from pipeline.io.synthetic import render_sample
from pipeline.labels.metric import image_score
from pipeline.labels.outlines import (BAND, FEATURES, band_features, fit_refiner, pixel_targets, refine_outlines,
                                 relabel)


def blurred_model(sample, shift):
    """What a blurry, misplaced model gives: 3-class probabilities of the true mask blurred and shifted by
    `shift` pixels, and nuclei cut where they exceed 0.75 (too small, off-centre)."""
    nucleus = ndimage.shift(ndimage.gaussian_filter((sample.labels > 0).astype(np.float32), 2.5), shift, order=1)
    probabilities = np.stack([1 - nucleus, nucleus, np.zeros_like(nucleus)], axis=-1)
    return np.where(nucleus > 0.75, ndimage.shift(sample.labels, shift, order=0), 0), probabilities


def fitted_on(samples, flat=False):
    features, targets = [], []
    for index, sample in enumerate(samples):
        labels, probabilities = blurred_model(sample, (2 * (index % 2) - 1, 1))
        image = np.zeros_like(sample.image) if flat else sample.image
        band, mask = band_features(labels, probabilities, image)
        features.append(band)
        targets.append(pixel_targets(sample.labels, mask))
    return fit_refiner(np.concatenate(features), np.concatenate(targets))


def test_band_features_cover_the_pixels_near_each_edge():
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 10:20] = 1
    probabilities = np.zeros((40, 40, 3), np.float32)
    probabilities[..., 0] = 1
    image = np.zeros((40, 40, 3), np.uint8)
    features, mask = band_features(labels, probabilities, image)
    assert features.shape == (mask.sum(), len(FEATURES)) and np.isfinite(features).all()
    assert mask[10, 15] and mask[15 - BAND + 1, 10 - BAND] and not mask[15, 15] and not mask[30, 30]
    signed = features[:, FEATURES.index("signed_distance")]
    assert signed.min() == -BAND and signed.max() <= BAND and (signed > 0).any()


def test_relabel_moves_band_pixels_to_their_nearest_nucleus_or_out():
    labels = np.zeros((30, 30), np.int32)
    labels[5:10, 5:10] = 1
    labels[5:10, 20:25] = 2
    mask = ndimage.binary_dilation(labels > 0, iterations=BAND) & ~ndimage.binary_erosion(labels > 0, iterations=BAND)
    grow = relabel(labels, mask, np.ones(mask.sum()), cutoff=0.5)
    assert (grow[labels == 1] == 1).all() and grow[7, 12] == 1 and grow[7, 18] == 2 and grow[20, 20] == 0
    assert relabel(labels, mask, np.zeros(mask.sum()), cutoff=0.5).max() == 0  # 5x5 objects: all band, all out


def test_a_fitted_refiner_moves_blurred_outlines_to_the_edges_the_image_shows():
    samples = [render_sample(3, index) for index in range(10)]
    params, flat_params = fitted_on(samples[:7]), fitted_on(samples[:7], flat=True)
    assert params["features"] == list(FEATURES) and len(params["coef"]) == len(FEATURES)
    before, after, blind = [], [], []
    for sample in samples[7:]:  # images it did not fit on, shifted the other way
        labels, probabilities = blurred_model(sample, (1, -2))
        before.append(image_score(sample.labels, labels))
        after.append(image_score(sample.labels, refine_outlines(labels, probabilities, sample.image, params)))
        blind.append(image_score(sample.labels, refine_outlines(labels, probabilities, np.zeros_like(sample.image),
                                                                flat_params)))
    assert np.mean(after) > np.mean(before) + 0.2  # about 0.26 -> 0.67
    assert np.mean(after) > np.mean(blind) + 0.1  # the image's edges, not the probabilities, do most of it


def test_refine_outlines_leaves_labels_alone_without_a_refiner_and_refuses_other_features():
    sample = render_sample(3, 0)
    labels, probabilities = blurred_model(sample, (1, 1))
    assert refine_outlines(labels, probabilities, sample.image, None) is labels
    assert refine_outlines(labels, probabilities[..., :2], sample.image, {"band": 3}) is labels  # two classes
    with pytest.raises(ValueError, match="re-run jobs/tune.py"):
        refine_outlines(labels, probabilities, sample.image, {"features": ["area"], "band": 3})


def test_each_pixels_nearest_nucleus_is_scipys_but_at_near_ties():
    """The refiner's nearest-nucleus transform (OpenCV) gives scipy's exact distances, and scipy's nearest nucleus
    for all but near-ties between two nuclei, on the nuclei of a real-looking synthetic image."""
    from pipeline.labels.outlines import _nearest_object

    labels = render_sample(3, 1).labels
    inside = labels > 0
    distance, nearest = _nearest_object(labels, inside)
    exact, (rows, cols) = ndimage.distance_transform_edt(~inside, return_indices=True)
    assert np.allclose(distance, exact, atol=1e-4)
    near = exact <= 16
    assert np.mean(nearest[near] == labels[rows, cols][near]) > 0.99
    assert (nearest[inside] == labels[inside]).all()
