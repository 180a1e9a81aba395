"""False-positive removal: a small per-nucleus classifier that drops predicted objects unlikely to be nuclei.

After DSB2018's 1st place (selimsef/dsb2018_topcoders: a second-level model over per-object features of the
predicted masks) and 5th place (a classifier of true vs false instances), both crediting it "significantly".
Here: logistic regression on shape and probability features, fitted on predictions of a split the model
never trained on (the protocol's tune split) and stored as plain numbers in run.json (no pickle to load).
Pure numpy / scikit-image; scikit-learn only to fit.
"""
from __future__ import annotations

import numpy as np

from pipeline.labels.instances import convex_areas
from pipeline.labels.metric import iou_matrix

FEATURES = ("log_area", "log_area_vs_median", "mean_nucleus", "min_nucleus", "mean_interior", "max_interior",
            "solidity", "eccentricity", "touches_edge", "log_objects")


def instance_features(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """(N, len(FEATURES)) features of the N nuclei of `labels` (rows in label order) from HxWxC probabilities.

    Sums by label in one pass each, extremes and boxes over the pixels sorted by label once (NumPy); the convex
    hulls by convex_areas."""
    labels = labels.astype(np.int32, copy=False)
    if labels.max(initial=0) == 0:
        return np.zeros((0, len(FEATURES)), np.float64)
    nucleus = (1.0 - probabilities[..., 0]).astype(np.float32)
    interior = probabilities[..., 1].astype(np.float32) if probabilities.shape[-1] == 3 else nucleus
    rows, cols = np.nonzero(labels)  # the nuclei's pixels only
    flat = labels[rows, cols]
    counts = np.bincount(flat)
    present = np.flatnonzero(counts)  # rows in label order
    area = counts[present].astype(np.float64)
    order = np.argsort(flat, kind="stable")  # by label, each label's pixels in row-major order
    firsts = np.r_[0, np.cumsum(counts[present])[:-1]]
    sorted_rows, sorted_cols = rows[order], cols[order]
    convex = convex_areas(labels, (sorted_rows, sorted_cols))

    def by_label(values: np.ndarray) -> np.ndarray:
        return np.bincount(flat, weights=values, minlength=len(counts))[present]

    nucleus_values, interior_values = nucleus[rows, cols], interior[rows, cols]
    height, width = labels.shape
    touches = ((sorted_rows[firsts] == 0) | (sorted_rows[np.r_[firsts[1:], len(flat)] - 1] == height - 1) |
               (np.minimum.reduceat(sorted_cols, firsts) == 0) |
               (np.maximum.reduceat(sorted_cols, firsts) == width - 1)).astype(np.float64)
    rows, cols = rows.astype(np.float64), cols.astype(np.float64)
    mean_r, mean_c = by_label(rows) / area, by_label(cols) / area
    # central second moments over the area: skimage's inertia tensor, whose eigenvalues give the eccentricity
    rr = by_label(rows * rows) / area - mean_r ** 2
    cc = by_label(cols * cols) / area - mean_c ** 2
    rc = by_label(rows * cols) / area - mean_r * mean_c
    spread = np.sqrt(((rr - cc) / 2) ** 2 + rc ** 2)
    major, minor = (rr + cc) / 2 + spread, (rr + cc) / 2 - spread
    eccentricity = np.where(major > 0, np.sqrt(np.clip(1.0 - minor / np.where(major > 0, major, 1.0), 0.0, 1.0)), 0.0)
    solidity = area / convex
    count = len(area)
    columns = [np.log(area), np.log(area / np.median(area)), by_label(nucleus_values) / area,
               np.minimum.reduceat(nucleus_values[order], firsts), by_label(interior_values) / area,
               np.maximum.reduceat(interior_values[order], firsts), solidity, eccentricity, touches,
               np.full(count, np.log(count))]
    return np.column_stack([np.asarray(column, np.float64) for column in columns])


def keep_probability(features: np.ndarray, params: dict) -> np.ndarray:
    """P(true nucleus) of each row of `features` under a fitted filter's parameters."""
    weights = np.asarray(params["coef"], np.float64) / np.asarray(params["scale"], np.float64)  # the scaling folded
    offset = float(params["intercept"]) - float(np.asarray(params["mean"], np.float64) @ weights)  # into the weights
    return 1.0 / (1.0 + np.exp(-(features @ weights + offset)))


def apply_filter(labels: np.ndarray, probabilities: np.ndarray, params: dict | None) -> np.ndarray:
    """`labels` without the objects the filter rejects (P(true) < params['cutoff']), renumbered 1..M."""
    if not params or labels.max(initial=0) == 0:
        return labels
    keep = keep_probability(instance_features(labels, probabilities), params) >= float(params["cutoff"])
    if keep.all():
        return labels
    present = np.unique(labels)[1:]  # feature rows are in this order
    lookup = np.zeros(int(labels.max()) + 1, labels.dtype)
    lookup[present[keep]] = np.arange(1, int(keep.sum()) + 1)
    return lookup[labels]


def true_positive_targets(true_labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """1 for each predicted nucleus (in label order) that matches a true one at IoU > 0.5, else 0."""
    iou = iou_matrix(true_labels, predicted)
    if iou.shape[1] == 0:
        return np.zeros(0, np.int64)
    if iou.shape[0] == 0:
        return np.zeros(iou.shape[1], np.int64)
    return (iou.max(axis=0) > 0.5).astype(np.int64)


def fit_filter(features: np.ndarray, targets: np.ndarray, cutoff: float = 0.5, regularisation: float = 1.0) -> dict:
    """Fit the logistic filter; returns its JSON-ready parameters (feature names, scaling, weights, cutoff)."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = features.mean(axis=0), features.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    model = LogisticRegression(C=regularisation, max_iter=2000).fit((features - mean) / scale, targets)
    return {"kind": "logistic", "features": list(FEATURES), "mean": mean.tolist(), "scale": scale.tolist(),
            "coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]), "cutoff": float(cutoff)}
