"""The DSB2018 metric on hand-built cases."""
import numpy as np
import pytest

from submission.metric import image_score, image_scores


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
