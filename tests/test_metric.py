"""The DSB2018 metric on hand-built cases."""
import numpy as np
import pytest

from pipeline.labels.metric import image_score, image_scores


def two_nuclei():
    labels = np.zeros((20, 20), np.int32)
    labels[2:8, 2:8] = 1
    labels[12:18, 12:18] = 2
    return labels


def test_perfect_prediction_scores_one():
    assert image_score(two_nuclei(), two_nuclei()) == 1.0


def test_nothing_found_scores_zero():
    assert image_score(two_nuclei(), np.zeros((20, 20), np.int32)) == 0.0


def test_one_of_two_found_scores_half():
    found = two_nuclei() * (two_nuclei() == 1)
    assert image_score(two_nuclei(), found) == pytest.approx(0.5)  # TP 1, FN 1 at every threshold


def test_merged_pair_is_one_false_positive_and_two_misses():
    truth = np.zeros((10, 20), np.int32)
    truth[2:8, 2:10], truth[2:8, 10:18] = 1, 2
    merged = (truth > 0).astype(np.int32)  # IoU 0.5 with each: not a match (needs > threshold)
    assert image_score(truth, merged) == 0.0


def test_threshold_sweep_counts_a_partial_match():
    truth = np.zeros((10, 10), np.int32)
    truth[0:10, 0:10] = 1
    pred = np.zeros_like(truth)
    pred[0:7, 0:10] = 1  # IoU 0.7: a match at 0.50..0.65, a miss (FP + FN) from 0.70
    scores = image_scores(truth, pred)
    assert scores.tolist() == [1.0] * 4 + [0.0] * 6


def test_label_values_with_gaps_any_integer_type_or_floats_score_alike():
    """Label values need not be 1..N: the linear-time path (small non-negative integers) and np.unique's
    (anything else) give the same IoU matrix, rows and columns in ascending label order."""
    from pipeline.labels.metric import iou_matrix

    truth = two_nuclei()
    pred = np.roll(truth, 1, axis=1)  # IoU 30/42 with each of its own nucleus
    expected = iou_matrix(truth, pred)
    assert expected.shape == (2, 2) and expected[0, 0] == pytest.approx(30 / 42) and expected[0, 1] == 0
    lookup = np.array([0, 7, 900])
    for relabelled in (lookup[pred].astype(np.uint16), lookup[pred].astype(np.int64), lookup[pred].astype(np.float32),
                       np.where(pred > 0, lookup[pred], -1)):  # -1 background: np.unique's path
        assert np.array_equal(iou_matrix(truth, relabelled), expected)
    assert image_score(lookup[truth].astype(np.uint16), lookup[pred]) == image_score(truth, pred)
