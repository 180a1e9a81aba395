"""The DSB2018 metric: mean over IoU thresholds 0.50..0.95 of TP / (TP + FP + FN), per image."""
from __future__ import annotations

import numpy as np

THRESHOLDS = np.arange(0.5, 1.0, 0.05)


def _ids_and_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the label values present, ascending; each pixel's index into them): np.unique(return_inverse=True).

    Label images hold small non-negative integers, so one bincount and a lookup table find them in linear
    time; np.unique sorts every pixel, which made scoring half of a tune pass. Other arrays take np.unique.
    """
    flat = np.asarray(labels).ravel()
    if flat.dtype.kind in "biu" and flat.size and int(flat.min()) >= 0 and int(flat.max()) <= 2 * flat.size + 65536:
        present = np.bincount(flat) > 0
        lookup = np.cumsum(present) - 1
        return np.flatnonzero(present), lookup[flat]
    ids, indices = np.unique(flat, return_inverse=True)
    return ids, indices.ravel()


def iou_matrix(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """IoU between every true nucleus (rows) and predicted nucleus (columns) of two label images."""
    true_ids, true_flat = _ids_and_indices(true_labels)
    pred_ids, pred_flat = _ids_and_indices(pred_labels)
    n_true, n_pred = true_ids.size, pred_ids.size
    intersection = np.bincount(true_flat.ravel() * n_pred + pred_flat.ravel(),
                               minlength=n_true * n_pred).reshape(n_true, n_pred)
    area_true = intersection.sum(axis=1, keepdims=True)
    area_pred = intersection.sum(axis=0, keepdims=True)
    union = area_true + area_pred - intersection
    iou = intersection / np.maximum(union, 1)
    keep_true = true_ids > 0
    keep_pred = pred_ids > 0
    return iou[np.ix_(keep_true, keep_pred)]


def image_scores(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """TP/(TP+FP+FN) at each threshold for one image (a match needs IoU strictly above it)."""
    return scores_from_iou(iou_matrix(true_labels, pred_labels))


def scores_from_iou(iou: np.ndarray) -> np.ndarray:
    """TP/(TP+FP+FN) at each threshold from an image's IoU matrix (true nuclei as rows, predicted as columns)."""
    n_true, n_pred = iou.shape
    if n_true == 0 and n_pred == 0:
        return np.ones(THRESHOLDS.size)
    scores = np.empty(THRESHOLDS.size)
    for k, threshold in enumerate(THRESHOLDS):
        # IoU > 0.5 makes matches one-to-one, so counting rows and columns with a hit is exact.
        hits = iou > threshold
        tp = int(hits.any(axis=1).sum())
        fp = n_pred - int(hits.any(axis=0).sum())
        fn = n_true - tp
        scores[k] = tp / (tp + fp + fn)
    return scores


def image_score(true_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """The competition's score of one image: the mean over the ten thresholds."""
    return float(image_scores(true_labels, pred_labels).mean())


def matched_ious(true_labels: np.ndarray, pred_labels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """IoU of each pair of nuclei (one of each image) that overlap by more than `threshold` IoU, a one-to-one
    matching above 0.5; from the overlapping pixels only, so it scales to images with 100,000s of nuclei."""
    true_labels, pred_labels = np.asarray(true_labels).ravel(), np.asarray(pred_labels).ravel()
    true_areas = np.bincount(true_labels)
    pred_areas = np.bincount(pred_labels)
    both = (true_labels > 0) & (pred_labels > 0)
    pairs, overlap = np.unique(true_labels[both].astype(np.int64) * (pred_areas.size) + pred_labels[both],
                               return_counts=True)
    true_ids, pred_ids = pairs // pred_areas.size, pairs % pred_areas.size
    iou = overlap / (true_areas[true_ids] + pred_areas[pred_ids] - overlap)
    return iou[iou > max(threshold, 0.5)]
