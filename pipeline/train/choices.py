"""The tune step's choices as pure functions of tune-split arrays: scores, the false-positive filter and outline
refiner judged by k-fold cross-validation, clump splitting, per-kind thresholds out of sample, and what a way of
predicting costs in forward passes."""
from __future__ import annotations

import itertools

import numpy as np

from pipeline.labels.instance_filter import (apply_filter, fit_filter, instance_features, keep_probability,
                                             true_positive_targets)
from pipeline.labels.instances import CLUMP_SPLIT_KEYS, instances_from_probabilities, split_clumps
from pipeline.labels.metric import image_score
from pipeline.labels.outlines import band_features_expanded, fit_refiner, pixel_targets, relabel
from pipeline.model.runinfo import Postprocess

THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
SEED_THRESHOLDS = (0.4, 0.5, 0.6, 0.7)
MIN_SIZES = (15, 30, 50)
FILTER_CUTOFFS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
REFINER_CUTOFFS = (0.4, 0.45, 0.5, 0.55, 0.6)
FOLDS = 5
# Clump splitting's candidates: (min_area_ratio, max_solidity, spacing), see pipeline.labels.instances.split_clumps.
CLUMP_SPLITS = tuple(itertools.product((1.5, 2.0), (0.9, 0.95), (0.9, 1.2)))


def instances_at(probabilities, threshold, seed_threshold, min_size):
    return instances_from_probabilities(probabilities.astype(np.float32), threshold=threshold, min_size=min_size,
                                        seed_threshold=seed_threshold)


def mean_score(truths: list[np.ndarray], predictions: list[np.ndarray]) -> float:
    return float(np.mean([image_score(truth, predicted) for truth, predicted in zip(truths, predictions)]))


def learnable(targets: list[np.ndarray]) -> bool:
    """Whether these 0/1 targets hold both classes, as a classifier needs."""
    return bool(targets) and np.unique(np.concatenate(targets)).size == 2


def filter_cross_validation(truths, labels, probabilities, folds: int = FOLDS, seed: int = 0) -> dict:
    """Out-of-fold tune score of the instance filter at each cutoff (images split into folds), and the unfiltered score."""
    features = [instance_features(label, probability) for label, probability in zip(labels, probabilities)]
    targets = [true_positive_targets(truth, label) for truth, label in zip(truths, labels)]
    fold_of = np.random.default_rng(seed).permutation(len(truths)) % folds
    filtered = {cutoff: list(labels) for cutoff in FILTER_CUTOFFS}
    for fold in range(folds):
        train = [i for i in range(len(truths)) if fold_of[i] != fold and len(targets[i])]
        if not learnable([targets[i] for i in train]):  # e.g. a weak model's objects all false: keep them all
            continue
        params = fit_filter(np.concatenate([features[i] for i in train]), np.concatenate([targets[i] for i in train]))
        for i in np.flatnonzero(fold_of == fold):
            for cutoff in FILTER_CUTOFFS:
                filtered[cutoff][i] = apply_filter(labels[i], probabilities[i], {**params, "cutoff": cutoff})
    scores = {cutoff: mean_score(truths, filtered[cutoff]) for cutoff in FILTER_CUTOFFS}
    return {"unfiltered": mean_score(truths, labels), "by_cutoff": scores, "filtered": filtered,
            "all_features": np.concatenate(features), "all_targets": np.concatenate(targets)}


def refiner_cross_validation(truths, labels, probabilities, images, folds: int = FOLDS, seed: int = 0) -> dict:
    """Out-of-fold tune score of the outline refiner at each cutoff (the same image folds as the filter's), and
    the band pixels' features and targets of every image, to fit the stored refiner."""
    bands = [band_features_expanded(label, probability.astype(np.float32), image)
             for label, probability, image in zip(labels, probabilities, images)]
    targets = [pixel_targets(truth, mask) for truth, (_, mask, _) in zip(truths, bands)]
    fold_of = np.random.default_rng(seed).permutation(len(truths)) % folds
    refined = {cutoff: list(labels) for cutoff in REFINER_CUTOFFS}
    for fold in range(folds):
        train = [i for i in range(len(truths)) if fold_of[i] != fold and len(targets[i])]
        if not learnable([targets[i] for i in train]):  # no nuclei outside this fold, or one class: outlines stay
            continue
        params = fit_refiner(np.concatenate([bands[i][0] for i in train]), np.concatenate([targets[i] for i in train]))
        for i in np.flatnonzero(fold_of == fold):
            if not len(targets[i]):
                continue
            probability = keep_probability(bands[i][0], params)
            for cutoff in REFINER_CUTOFFS:
                refined[cutoff][i] = relabel(labels[i], bands[i][1], probability, cutoff, expanded=bands[i][2])
    return {"by_cutoff": {cutoff: mean_score(truths, refined[cutoff]) for cutoff in REFINER_CUTOFFS},
            "all_features": np.concatenate([features for features, _, _ in bands]),
            "all_targets": np.concatenate(targets)}


def choose_clump_split(truths, labels, probabilities, min_gain: float) -> tuple[list, dict, dict | None]:
    """(labels to go on with, log entry, stored setting or None): the clump-splitting candidate that scores best on
    these images, kept only if it beats leaving the objects as they are by `min_gain`."""
    unsplit = mean_score(truths, labels)
    scores, best, best_score, best_labels = {}, None, -1.0, labels
    for values in CLUMP_SPLITS:
        setting = dict(zip(CLUMP_SPLIT_KEYS, values))
        split = [split_clumps(label, probability[..., 2].astype(np.float32), **setting)
                 for label, probability in zip(labels, probabilities)]
        scores[" ".join(map(str, values))] = score = mean_score(truths, split)
        if score > best_score:
            best, best_score, best_labels = setting, score, split
    gain = best_score - unsplit
    kept = gain >= min_gain
    entry = {"unsplit": unsplit, "scores": scores, "keys": list(CLUMP_SPLIT_KEYS), "best": best,
             "chosen": best if kept else None, "gain": gain, "kept": kept}
    return (best_labels if kept else labels), entry, (best if kept else None)


def leave_one_out_score(per_image: np.ndarray) -> float:
    """Mean score when each image (row) gets the combination (column) that is best on all the other images."""
    return float(np.mean([per_image[row, np.delete(per_image, row, axis=0).mean(axis=0).argmax()]
                          for row in range(len(per_image))]))


def per_kind_settings(per_image: np.ndarray, combos: list[tuple], kinds: list[str], global_index: int,
                      min_gain: float = 0.002, rare: tuple[str, ...] = ("stained", "bright-field")) -> tuple[dict, dict]:
    """Own post-processing values for the rare kinds of image, where they beat the global ones out of sample.

    `per_image[i, j]` is image i's score with `combos[j]`. For each rare kind (3+ tune images), each image is
    scored with the combination that is best on the kind's other images (leave-one-out); the kind keeps the
    combination best on all its images only if that leave-one-out score beats the global combination by
    `min_gain`. Returns ({kind: {threshold, seed_threshold, min_size}}, a log of every kind's figures).
    """
    names = ("threshold", "seed_threshold", "min_size")
    kinds = np.asarray(kinds)
    chosen, log = {}, {}
    for kind in rare:
        rows = np.flatnonzero(kinds == kind)
        if len(rows) < 3:
            continue
        leave_one_out = leave_one_out_score(per_image[rows])
        best = int(per_image[rows].mean(axis=0).argmax())
        baseline = float(per_image[rows, global_index].mean())
        kept = leave_one_out - baseline >= min_gain
        log[kind] = {"images": int(len(rows)), "global": baseline, "chosen": dict(zip(names, combos[best])),
                     "in_sample": float(per_image[rows, best].mean()), "leave_one_out": leave_one_out, "kept": kept}
        if kept:
            chosen[kind] = dict(zip(names, combos[best]))
    return chosen, log


def prediction_passes(flips: bool, scales, size_normalised: bool = False) -> float:
    """Forward passes per image (in units of one plain pass) that a way of predicting costs: flips 4, each scale its
    area, size normalisation one plain pass more (it measures the nuclei before zooming)."""
    return (4 if flips else 1) * sum(scale * scale for scale in scales) + (1 if size_normalised else 0)


def stored_passes(saved: Postprocess) -> float:
    """prediction_passes of stored settings (run.json's postprocess)."""
    zooms_all = bool(saved.size_normalisation) and "within" not in saved.size_normalisation  # else in-range: one
    return prediction_passes(saved.tta, saved.scales, zooms_all)


def worth_its_cost(scores: dict[str, float], costs: dict[str, float], min_gain: float) -> str:
    """The option to keep: from the cheapest up, a costlier one replaces the kept one only where it scores at least
    `min_gain` more."""
    kept = None
    for name in sorted(scores, key=lambda name: costs[name]):
        if kept is None or scores[name] >= scores[kept] + min_gain:
            kept = name
    return kept


def describe_prediction(settings: dict) -> str:
    """`prediction_settings`' flips, scales and size normalisation in words, for the log."""
    words = (["flips"] if settings["tta"] else []) + \
        ([f"scales {', '.join(f'{scale:g}' for scale in settings['scales'])}"] if settings["scales"] != (1.0,) else [])
    if settings["size_normalisation"]:
        words.append(f"size normalisation {settings['size_normalisation']['nucleus_area']:g}")
    return "stored prediction: " + ", ".join(words) if words else "plain"
