"""Choose a model's inference settings on the evaluation protocol's tune split, and store them in its run.json.

Every choice is made on the tune split (never the test split), in steps whose scores are all kept in
tuning.json, each kept only where it gains at least MIN_GAIN: (0) size normalisation: the nucleus area each image
is zoomed to (or none), with plain prediction; (1) prediction: plain, flips, flips + scales; (0) and (1) only
within --max-cost forward passes per image (by default neither: they cost 2-13 plain passes); (2) post-processing
thresholds and minimum size, globally and, where it wins out of sample, per kind of image (stained, bright-field);
(2c) clump splitting (pipeline/instances.py: objects shaped like merged nuclei cut apart), one of 8 settings or
none; (3) the false-positive filter (pipeline/instance_filter.py), judged by 5-fold cross-validation over the
tune images so the score that decides is of images the filter did not see; (4) the outline refiner
(pipeline/outlines.py), judged the same way on the nuclei the filter leaves. Before all of these, a kind
specialist given to it (a model fine-tuned on one kind of image) is kept only if that kind's tune images,
predicted as the stored settings predict, score better with it. One process, no Ray: the tune split is small and every candidate reuses the same
predicted probabilities. A pass that scores below the settings an earlier pass stored (same tune split, same
specialists) leaves them in place.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time

import numpy as np

from pipeline import fileio
from pipeline.config import kept_weights_config, recipe_differences

PREDICTIONS = {"plain": (False, (1.0,)), "flips": (True, (1.0,)), "flips+scales": (True, (0.8, 1.0, 1.25))}
THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
SEED_THRESHOLDS = (0.4, 0.5, 0.6, 0.7)
MIN_SIZES = (15, 30, 50)
NUCLEUS_AREAS = (0, 150, 200, 250, 300)  # size normalisation targets in pixels (0: off), chosen on plain prediction
FILTER_CUTOFFS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
REFINER_CUTOFFS = (0.4, 0.45, 0.5, 0.55, 0.6)
FOLDS = 5
# Clump splitting's candidates: (min_area_ratio, max_solidity, spacing), see pipeline.instances.split_clumps.
CLUMP_SPLITS = tuple(itertools.product((1.5, 2.0), (0.9, 0.95), (0.9, 1.2)))
FITTED = ("instance_filter", "outline_refiner")  # long lists of numbers: shown as on / off
# --time-limit keeps this many epochs' time free for the tune step after training: both are compute-bound on the
# same cores, and on the 2-core CPU box a dsb2018 preset run's tune pass (4.0-5.2 min) takes 4.5-6 of its epochs.
TUNE_COST_IN_EPOCHS = 3.0
# A step is kept only where it gains at least this on the tune split: less is noise on 90 images.
MIN_GAIN = 0.005
# Ways of predicting that cost more than this many plain forward passes per image are not tried by default, so
# inference with the stored settings stays at least half as fast as plain prediction (flips cost 4, three scales
# 3.2, size normalisation 2).
MAX_COST = 1.5


def _instances(probabilities, threshold, seed_threshold, min_size):
    from pipeline.instances import instances_from_probabilities

    return instances_from_probabilities(probabilities.astype(np.float32), threshold=threshold, min_size=min_size,
                                        seed_threshold=seed_threshold)


def mean_score(truths: list[np.ndarray], predictions: list[np.ndarray]) -> float:
    from pipeline.metric import image_score

    return float(np.mean([image_score(truth, predicted) for truth, predicted in zip(truths, predictions)]))


def _learnable(targets: list[np.ndarray]) -> bool:
    """Whether these 0/1 targets hold both classes, as a classifier needs."""
    return bool(targets) and np.unique(np.concatenate(targets)).size == 2


def filter_cross_validation(truths, labels, probabilities, folds: int = FOLDS, seed: int = 0) -> dict:
    """Out-of-fold tune score of the instance filter at each cutoff (images split into folds), and the unfiltered score."""
    from pipeline.instance_filter import apply_filter, fit_filter, instance_features, true_positive_targets

    features = [instance_features(label, probability) for label, probability in zip(labels, probabilities)]
    targets = [true_positive_targets(truth, label) for truth, label in zip(truths, labels)]
    fold_of = np.random.default_rng(seed).permutation(len(truths)) % folds
    filtered = {cutoff: list(labels) for cutoff in FILTER_CUTOFFS}
    for fold in range(folds):
        train = [i for i in range(len(truths)) if fold_of[i] != fold and len(targets[i])]
        if not _learnable([targets[i] for i in train]):  # e.g. a weak model's objects all false: keep them all
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
    from pipeline.outlines import band_features, fit_refiner, pixel_targets, relabel
    from pipeline.instance_filter import keep_probability

    bands = [band_features(label, probability.astype(np.float32), image)
             for label, probability, image in zip(labels, probabilities, images)]
    targets = [pixel_targets(truth, mask) for truth, (_, mask) in zip(truths, bands)]
    fold_of = np.random.default_rng(seed).permutation(len(truths)) % folds
    refined = {cutoff: list(labels) for cutoff in REFINER_CUTOFFS}
    for fold in range(folds):
        train = [i for i in range(len(truths)) if fold_of[i] != fold and len(targets[i])]
        if not _learnable([targets[i] for i in train]):  # no nuclei outside this fold, or one class: outlines stay
            continue
        params = fit_refiner(np.concatenate([bands[i][0] for i in train]), np.concatenate([targets[i] for i in train]))
        for i in np.flatnonzero(fold_of == fold):
            if not len(targets[i]):
                continue
            probability = keep_probability(bands[i][0].astype(np.float64), params)
            for cutoff in REFINER_CUTOFFS:
                refined[cutoff][i] = relabel(labels[i], bands[i][1], probability, cutoff)
    return {"by_cutoff": {cutoff: mean_score(truths, refined[cutoff]) for cutoff in REFINER_CUTOFFS},
            "all_features": np.concatenate([features for features, _ in bands]), "all_targets": np.concatenate(targets)}


def choose_clump_split(truths, labels, probabilities, min_gain: float) -> tuple[list, dict, dict | None]:
    """(labels to go on with, log entry, stored setting or None): the clump-splitting candidate that scores best on
    these images, kept only if it beats leaving the objects as they are by `min_gain`."""
    from pipeline.instances import CLUMP_SPLIT_KEYS, split_clumps

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


def parse_specialists(text: str) -> dict[str, str]:
    """'stained=runs/st/model.keras,...' -> {kind: path}; one clear error for anything else."""
    from pipeline.protocol import KINDS

    specialists = {}
    for part in (part.strip() for part in text.split(",") if part.strip()):
        kind, _, path = part.partition("=")
        if kind.strip() not in KINDS or not path.strip():
            raise ValueError(f"--specialists: KIND=MODEL with KIND one of {', '.join(KINDS)}, got {part!r}")
        specialists[kind.strip()] = path.strip()
    return specialists


def _check_specialist(kind: str, path: str, info: dict) -> None:
    """A specialist must read images as the model does and must not have trained on the tune split."""
    from pipeline.registry import read_model_info, reading_differences

    theirs = read_model_info(path)
    differ = reading_differences(theirs, info)
    if differ:
        raise ValueError(f"--specialists {kind}={path}: it differs from the model in {', '.join(differ)}")
    if theirs.get("config", {}).get("holdout") != "protocol":
        raise ValueError(f"--specialists {kind}={path}: it must be trained with --holdout protocol (the tune split "
                         f"unseen), as it is judged on the tune split")


def choose_specialists(predictor, candidates: dict[str, str], inputs: list, truths: list, kinds: list[str],
                       min_gain: float, info: dict | None = None) -> tuple[dict, dict]:
    """Keep each kind's specialist whose tune images score better with it than with the model, both predicted
    as inference predicts with the model's run.json `info` (flips, scales, size normalisation:
    `prediction_settings`; plain prediction where none are stored) and at their best post-processing values out
    of sample (leave-one-out over the threshold grid).

    `predictor` holds the model and the candidates (Predictor(..., specialists=candidates)); the losers are
    removed from it, so it goes on routing only the kinds kept.
    """
    from pipeline.config import SegmentConfig
    from pipeline.inference import prediction_settings
    from pipeline.metric import image_score

    combos = list(itertools.product(THRESHOLDS, SEED_THRESHOLDS, MIN_SIZES))
    settings = prediction_settings(SegmentConfig(), info or {})
    predictor.tta, predictor.scales, predictor.size_normalisation = (settings[key] for key in
                                                                     ("tta", "scales", "size_normalisation"))
    prediction = _describe_prediction(settings)
    kept, log = {}, {}
    for kind, path in candidates.items():
        rows = [i for i, own in enumerate(kinds) if own == kind]
        if len(rows) < 3:
            log[kind] = {"images": len(rows), "kept": False, "why": "fewer than 3 tune images of this kind"}
            predictor.forwards.pop(kind, None)
            continue
        scores = {}
        for name, routed_as in (("model", ""), ("specialist", kind)):  # "": the model's own forward pass
            predicted = {i: predictor.predict_whole(inputs[i], routed_as).astype(np.float16)  # once per image
                         for i in rows}
            per_image = np.array([[image_score(truths[i], _instances(predicted[i], *combo)) for combo in combos]
                                  for i in rows])
            scores[name] = leave_one_out_score(per_image)
        keep = scores["specialist"] - scores["model"] >= min_gain
        log[kind] = {"images": len(rows), "model": path, "prediction": prediction, "leave_one_out": scores,
                     "kept": keep}
        print(f"  {kind} specialist ({len(rows)} images, {prediction}, best thresholds out of sample): "
              f"{scores['specialist']:.4f} vs the model's {scores['model']:.4f}: {'kept' if keep else 'dropped'}",
              flush=True)
        if keep:
            kept[kind] = os.path.abspath(path)
        else:
            predictor.forwards.pop(kind, None)
    return kept, log


def _describe_prediction(settings: dict) -> str:
    """`prediction_settings`' flips, scales and size normalisation in words, for the log."""
    words = (["flips"] if settings["tta"] else []) + \
        ([f"scales {', '.join(f'{scale:g}' for scale in settings['scales'])}"] if settings["scales"] != (1.0,) else [])
    if settings["size_normalisation"]:
        words.append(f"size normalisation {settings['size_normalisation']['nucleus_area']:g}")
    return "stored prediction: " + ", ".join(words) if words else "plain"


def attach_specialists(model_path: str, info: dict, specialists: dict[str, str]) -> dict[str, str]:
    """Copy each specialist beside the model as `specialist-<kind>.keras` (sha256 into info); returns {kind: name}."""
    from pipeline.registry import sha256_of

    folder, named = os.path.dirname(os.path.abspath(model_path)), {}
    for kind, path in specialists.items():
        name = f"specialist-{kind}.keras"
        target = os.path.join(folder, name)
        if os.path.abspath(path) != target:
            shutil.copyfile(path, target + ".partial")
            os.replace(target + ".partial", target)
        info.setdefault("sha256", {})[name] = sha256_of(target)
        named[kind] = name
    return named


def _comparable_stored_score(saved: dict, info: dict, routed: dict[str, str], tuned_on: str) -> float | None:
    """The tune score recorded with the model's stored settings, if an earlier pass tuned them on the same tune
    split with the same specialists (so the two passes' scores measure the same thing); else None.

    Each pass starts from the stored thresholds and can wander to settings that score lower; comparing the
    two keeps re-tuning from ever losing ground on the tune split.
    """
    from pipeline.registry import sha256_of

    if saved.get("tuned_on") != tuned_on or "tune_score" not in saved:
        return None
    stored = {kind: (info.get("sha256") or {}).get(name) for kind, name in (saved.get("specialists") or {}).items()}
    return float(saved["tune_score"]) if stored == {kind: sha256_of(path) for kind, path in routed.items()} else None


def prediction_passes(flips: bool, scales, size_normalised: bool = False) -> float:
    """Forward passes per image (in units of one plain pass) that a way of predicting costs: flips 4, each scale its
    area, size normalisation one plain pass more (it measures the nuclei before zooming)."""
    return (4 if flips else 1) * sum(scale * scale for scale in scales) + (1 if size_normalised else 0)


def stored_passes(saved: dict) -> float:
    """prediction_passes of stored settings (run.json's postprocess)."""
    return prediction_passes(bool(saved.get("tta")), saved.get("scales") or (1.0,),
                             bool(saved.get("size_normalisation")))


def worth_its_cost(scores: dict[str, float], costs: dict[str, float], min_gain: float) -> str:
    """The option to keep: from the cheapest up, a costlier one replaces the kept one only where it scores at least
    `min_gain` more."""
    kept = None
    for name in sorted(scores, key=lambda name: costs[name]):
        if kept is None or scores[name] >= scores[kept] + min_gain:
            kept = name
    return kept


def tune(model: str, data: str = "", write: bool = True, min_gain: float = MIN_GAIN,
         predictions: tuple[str, ...] = tuple(PREDICTIONS), specialists: dict[str, str] | None = None,
         max_cost: float = MAX_COST) -> dict:
    """Tune model's inference settings on its tune split; returns (and writes beside the model) tuning.json.

    A way of predicting whose forward passes exceed `max_cost` times plain prediction's (prediction_passes) is
    not tried (0: try all): inference with the stored settings stays within that factor of plain prediction."""
    from pipeline.augment import apply_appearance, median_nucleus_area, size_normalising_zoom
    from pipeline.evaluation import held_out_refs
    from pipeline.images import normalise
    from pipeline.inference import Predictor, settings_for_kind
    from pipeline.protocol import image_kind
    from pipeline.registry import info_path, read_model_info, resolve_model
    from pipeline.sources import load_sample
    from pipeline.instance_filter import fit_filter
    from pipeline.metric import image_score
    from pipeline.outlines import fit_refiner

    if set(predictions) - set(PREDICTIONS) or not predictions:
        raise ValueError(f"--predictions: choose among {', '.join(PREDICTIONS)}, got {', '.join(predictions)}")
    started = time.time()
    model_path = os.path.abspath(resolve_model(model))
    info = read_model_info(model_path)
    trained = info.get("config", {})
    if info.get("mode") != "native" or info.get("num_classes") != 3:
        raise ValueError("jobs/tune.py tunes native-mode, three-class models (the dsb2018 preset)")
    if trained.get("holdout") == "refit":
        raise ValueError("this model was trained with --holdout refit, on the tune split too: tuning on it would "
                         "flatter it; give --settings-from the model of the same recipe trained with --holdout protocol")
    refs = held_out_refs("tune", data or trained.get("data", ""), trained)
    samples = [load_sample(ref, with_masks=True) for ref in refs]
    truths = [sample.labels for sample in samples]
    inputs = [normalise(apply_appearance(sample.image, info.get("appearance", "rgb"))) for sample in samples]
    saved = info.get("postprocess") or {}
    current = (float(saved.get("threshold", 0.5)), float(saved.get("seed_threshold", 0.5)), int(saved.get("min_size", 10)))
    log = {"model": model_path, "split": "tune", "images": len(refs), "steps": {}}
    print(f"tuning on the tune split: {len(refs)} images", flush=True)

    kinds = [image_kind(sample.image) for sample in samples]

    # Specialists: given ones are judged on their kind's tune images; without any given, the model's own stay.
    from pipeline.registry import specialist_files

    for kind, path in (specialists or {}).items():
        _check_specialist(kind, path, info)
    routed = specialists or specialist_files(model_path, info)
    predictor = Predictor(model_path, batch_size=1, threads=2, tile=int(info.get("tile") or 1024),
                          specialists=routed)  # loaded once
    if specialists:
        routed, log["steps"]["specialists"] = choose_specialists(predictor, specialists, inputs, truths, kinds,
                                                                 min_gain, info=info)

    measured_with = dict(zip(("threshold", "seed_threshold", "min_size"), current))
    median_areas: list[float] = []  # each image's median nucleus in its plain prediction, measured once

    def predict_all(flips: bool, scales: tuple[float, ...], nucleus_area: float,
                    measure: bool = False) -> tuple[list, dict]:
        """Every tune image predicted as inference would with these settings. Size normalisation's first plain
        pass is the same for every target, so `measure` (plain, no size normalisation) measures each image's
        nuclei once for all of them."""
        predictor.tta, predictor.size_normalisation = flips, None
        tick = time.time()
        predicted = []
        for index, (image, kind) in enumerate(zip(inputs, kinds)):
            zoom = size_normalising_zoom(median_areas[index], nucleus_area) if nucleus_area else 1.0
            predictor.scales = tuple(scale * zoom for scale in scales)
            probabilities = predictor.predict_whole(image, kind)
            if measure:
                median_areas.append(median_nucleus_area(probabilities, **measured_with))
            predicted.append(probabilities.astype(np.float16))
        return predicted, {"score": mean_score(truths, [_instances(p, *current) for p in predicted]),
                           "predict_seconds": round(time.time() - tick, 1)}

    # 0. Size normalisation: each target nucleus area scored with plain prediction and the current post-processing;
    # the first (area 0: off) also measures each image's nuclei.
    plain, sizes = {}, {}
    passes = lambda name, zoomed=False: prediction_passes(*PREDICTIONS[name], zoomed)  # noqa: E731
    affordable = lambda name, zoomed=False: not max_cost or passes(name, zoomed) <= max_cost  # noqa: E731
    areas = sorted(set(NUCLEUS_AREAS) | {float(trained.get("nucleus_area") or 0)})  # and the one it trained at
    for area in areas if affordable("plain", True) else [0.0]:
        plain[area], sizes[area] = predict_all(False, (1.0,), area, measure=not area)  # 0 first: it measures
        print(f"  nucleus area {area or 'off':>4} (plain) score {sizes[area]['score']:.4f} "
              f"({sizes[area]['predict_seconds']:.0f} s)", flush=True)
    nucleus_area = max(sizes, key=lambda area: sizes[area]["score"])
    if sizes[nucleus_area]["score"] - sizes[0]["score"] < min_gain:
        nucleus_area = 0
    log["steps"]["size_normalisation"] = {"with": measured_with,
                                          "scores": {str(area): entry for area, entry in sizes.items()},
                                          "chosen": nucleus_area, "tried": len(sizes) > 1}
    plain = plain[nucleus_area]

    # 1. How to predict: each option scored with the current post-processing (and the chosen size normalisation).
    probabilities, step = {}, {}
    for name in predictions:
        if not affordable(name, bool(nucleus_area)):
            print(f"  prediction {name:13s} not tried: {passes(name, bool(nucleus_area)):.1f} forward "
                  f"passes per image, over --max-cost {max_cost:g}", flush=True)
            continue
        if name == "plain":
            probabilities[name], step[name] = plain, sizes[nucleus_area]
        else:
            probabilities[name], step[name] = predict_all(*PREDICTIONS[name], nucleus_area)
        print(f"  prediction {name:13s} score {step[name]['score']:.4f} ({step[name]['predict_seconds']:.0f} s)",
              flush=True)
    del plain
    if not step:
        raise ValueError(f"--predictions {','.join(predictions)}: none costs at most --max-cost {max_cost:g} forward "
                         "passes per image (plain costs 1)")
    best_prediction = worth_its_cost({name: entry["score"] for name, entry in step.items()},
                                     {name: passes(name, bool(nucleus_area)) for name in step}, min_gain)
    log["steps"]["prediction"] = {"with": measured_with, "nucleus_area": nucleus_area, "scores": step,
                                  "chosen": best_prediction}
    chosen_probabilities = probabilities[best_prediction]
    del probabilities

    # 2. Post-processing thresholds on the chosen prediction: every image scored at every combination.
    combos = list(itertools.product(THRESHOLDS, SEED_THRESHOLDS, MIN_SIZES))
    per_image = np.array([[image_score(truth, _instances(p, *combo)) for combo in combos]
                          for truth, p in zip(truths, chosen_probabilities)])
    grid = dict(zip(combos, per_image.mean(axis=0)))
    best = max(grid, key=grid.get)
    print(f"  post-processing threshold {best[0]} seed {best[1]} min size {best[2]}: {grid[best]:.4f} "
          f"(current {current}: {grid.get(current, float('nan')):.4f})", flush=True)
    names = ("threshold", "seed_threshold", "min_size")
    log["steps"]["postprocess"] = {"grid": [{"threshold": t, "seed_threshold": s, "min_size": m, "score": score}
                                            for (t, s, m), score in grid.items()],
                                   "chosen": dict(zip(names, best)), "score": grid[best]}

    # 2b. Stained and bright-field images may get their own values, kept only where they win out of sample.
    by_kind, kind_log = per_kind_settings(per_image, combos, kinds, combos.index(best), min_gain)
    log["steps"]["postprocess_by_kind"] = kind_log
    for kind, entry in kind_log.items():
        print(f"  {kind} ({entry['images']} images): global {entry['global']:.4f}, own {entry['chosen']} "
              f"leave-one-out {entry['leave_one_out']:.4f}: {'kept' if entry['kept'] else 'dropped'}", flush=True)

    # 2c. Clump splitting of the nuclei the chosen settings give each image: objects shaped like several merged
    # nuclei cut apart (the tune split's stained tissue loses most of its score to merged neighbours).
    labels = [_instances(p, *settings_for_kind(*best, by_kind, kind)) for p, kind in zip(chosen_probabilities, kinds)]
    labels, log["steps"]["clump_split"], clump_split = choose_clump_split(truths, labels, chosen_probabilities,
                                                                          min_gain)
    entry = log["steps"]["clump_split"]
    print(f"  clump splitting: {max(entry['scores'].values()):.4f} at {entry['best']} vs "
          f"{entry['unsplit']:.4f} unsplit: {'kept' if entry['kept'] else 'dropped'}", flush=True)

    # 3. The false-positive filter, judged out of fold, on the nuclei steps 2-2c leave.
    cv = filter_cross_validation(truths, labels, chosen_probabilities)
    cutoff = max(cv["by_cutoff"], key=cv["by_cutoff"].get)
    gain = cv["by_cutoff"][cutoff] - cv["unfiltered"]
    keep_filter = gain >= min_gain and _learnable([cv["all_targets"]])
    print(f"  instance filter: out-of-fold {cv['by_cutoff'][cutoff]:.4f} at cutoff {cutoff} vs unfiltered "
          f"{cv['unfiltered']:.4f}: {'kept' if keep_filter else 'dropped'}", flush=True)
    log["steps"]["instance_filter"] = {"unfiltered": cv["unfiltered"], "out_of_fold_by_cutoff": cv["by_cutoff"],
                                       "chosen_cutoff": cutoff, "gain": gain, "kept": keep_filter,
                                       "instances": int(len(cv["all_targets"])),
                                       "true_positive_fraction": float(np.mean(cv["all_targets"]))}

    # 4. The outline refiner, on the nuclei step 3 leaves (filtered out of fold), judged out of fold on the same folds.
    filtered = cv["filtered"][cutoff] if keep_filter else labels
    before = cv["by_cutoff"][cutoff] if keep_filter else cv["unfiltered"]
    outlines = refiner_cross_validation(truths, filtered, chosen_probabilities, [sample.image for sample in samples])
    refiner_cutoff = max(outlines["by_cutoff"], key=outlines["by_cutoff"].get)
    refiner_gain = outlines["by_cutoff"][refiner_cutoff] - before
    keep_refiner = refiner_gain >= min_gain and _learnable([outlines["all_targets"]])
    print(f"  outline refiner: out-of-fold {outlines['by_cutoff'][refiner_cutoff]:.4f} at cutoff {refiner_cutoff} vs "
          f"{before:.4f}: {'kept' if keep_refiner else 'dropped'}", flush=True)
    log["steps"]["outline_refiner"] = {"before": before, "out_of_fold_by_cutoff": outlines["by_cutoff"],
                                       "chosen_cutoff": refiner_cutoff, "gain": refiner_gain, "kept": keep_refiner,
                                       "pixels": int(len(outlines["all_targets"]))}
    flips, scales = PREDICTIONS[best_prediction]
    settings = {"threshold": best[0], "seed_threshold": best[1], "min_size": best[2], "tta": flips,
                "scales": list(scales),
                "size_normalisation": {**measured_with, "nucleus_area": nucleus_area} if nucleus_area else None,
                "clump_split": clump_split,
                "instance_filter": fit_filter(cv["all_features"], cv["all_targets"], cutoff) if keep_filter else None,
                "outline_refiner": fit_refiner(outlines["all_features"], outlines["all_targets"], refiner_cutoff)
                if keep_refiner else None,
                "by_kind": by_kind, "tuned_on": f"tune split of the evaluation protocol ({len(refs)} images)",
                "tune_score": outlines["by_cutoff"][refiner_cutoff] if keep_refiner else before}
    if routed:
        settings["specialists"] = {kind: f"specialist-{kind}.keras" for kind in routed}
    log["settings"] = settings
    stored_score = _comparable_stored_score(saved, info, routed, settings["tuned_on"])
    if stored_score is not None and max_cost and stored_passes(saved) > max_cost:
        stored_score = None  # stored settings over the cost limit are replaced, whatever they scored
    if stored_score is not None and stored_score > settings["tune_score"]:
        log["kept_stored"] = {"stored_tune_score": stored_score, "this_pass": settings["tune_score"]}
        print(f"  the stored settings score {stored_score:.4f} on the tune split, this pass's "
              f"{settings['tune_score']:.4f}: kept the stored ones", flush=True)
        write = False
    log["seconds"] = round(time.time() - started, 1)
    folder = os.path.dirname(model_path)
    fileio.write_text_atomic(os.path.join(folder, "tuning.json"), json.dumps(log, indent=2))
    if write:
        for kind in set((saved.get("specialists") or {})) - set(routed):  # a dropped specialist: no longer listed
            info.get("sha256", {}).pop(saved["specialists"][kind], None)
        if routed:
            settings["specialists"] = attach_specialists(model_path, info, routed)
        info["postprocess"] = settings
        fileio.write_text_atomic(info_path(model_path), json.dumps(info, indent=2))
    return log


def will_tune(trained: dict) -> bool:
    """Whether a training run (its config, as a dict) is tuned on the tune split when its training ends."""
    return bool(trained.get("tune")) and not untunable_reason(trained)


def untunable_reason(trained: dict) -> str:
    """Why a training run (its config, as a dict) cannot be tuned on the tune split after training; '' if it can."""
    holdout = trained.get("holdout", "random")
    if holdout == "refit":
        return ("--holdout refit trains on the tune split too; give it the settings of the same recipe trained with "
                "--holdout protocol: jobs/tune.py --model RUN/model.keras --settings-from SIBLING/model.keras")
    if holdout != "protocol":
        return f"--holdout {holdout} keeps no tune split (--holdout protocol does)"
    if trained.get("kinds"):
        return ("a --kinds run is a specialist; jobs/tune.py --model MODEL --specialists KIND=RUN/model.keras "
                "judges it beside its model")
    if trained.get("mode") != "native" or int(trained.get("num_classes", 2)) != 3:
        return "tuning needs a native-mode, three-class model (--mode native --num-classes 3, as in the preset)"
    return ""


def describe(log: dict) -> str:
    """Two lines for a person: the settings a tuning pass chose (fitted models as on/off) and its tune score."""
    settings, kept = log["settings"], log.get("kept_stored")
    shown = {key: value for key, value in settings.items() if key not in FITTED}
    return (f"{'this pass (not stored)' if kept else 'settings'}: {shown}, "
            f"instance filter {'on' if settings['instance_filter'] else 'off'}, "
            f"outline refiner {'on' if settings['outline_refiner'] else 'off'}\n"
            f"tune_score={kept['stored_tune_score'] if kept else settings['tune_score']:.4f}")


def _check_refit_specialist(kind: str, path: str, model_path: str, info: dict) -> None:
    """A refit's own specialist: trained with --holdout refit --kinds KIND, fine-tuned from the refit model itself."""
    from pipeline.registry import read_model_info, reading_differences

    theirs = read_model_info(path)
    trained = theirs.get("config", {})
    problems = [f"{key} {theirs.get(key)!r} (the model's: {info.get(key)!r})"
                for key in reading_differences(theirs, info)]
    if trained.get("holdout") != "refit":
        problems.append(f"--holdout {trained.get('holdout')} (a refit's specialist: --holdout refit)")
    if trained.get("kinds") != kind:
        problems.append(f"--kinds {trained.get('kinds') or 'all'!r} (not {kind})")
    if not trained.get("init_from") or not os.path.isfile(trained["init_from"]) or \
            not os.path.samefile(trained["init_from"], model_path):
        problems.append(f"--init-from {trained.get('init_from') or 'none'} (not this refit model)")
    if problems:
        raise ValueError(f"--specialists {kind}={path}: not this refit's own {kind} specialist: {'; '.join(problems)}")


def copy_settings(model: str, source: str, specialists: dict[str, str] | None = None) -> dict:
    """Give `model` (a --holdout refit run) the inference settings tuned for `source`, the same recipe trained
    with --holdout protocol, whose tune split was unseen; returns the settings written into model's run.json.

    Refuses a source that was not tuned, or whose recipe (apart from holdout, seed and paths) differs. The
    specialists those settings were tuned with come along, unless `specialists` gives the refit its own: their
    recipe trained with --holdout refit from the refit model, as the refit is the source's recipe trained on the
    train and tune splits together (the recipe itself is the caller's to keep the same).
    """
    from pipeline.registry import info_path, read_model_info, resolve_model, specialist_files

    model_path, source_path = os.path.abspath(resolve_model(model)), os.path.abspath(resolve_model(source))
    info, tuned = read_model_info(model_path), read_model_info(source_path)
    settings = tuned.get("postprocess") or {}
    if "tuned_on" not in settings:
        raise ValueError(f"{source}: its run.json holds no tuned settings (run jobs/tune.py on it first)")
    if tuned.get("config", {}).get("holdout") != "protocol":
        raise ValueError(f"{source}: settings must come from a --holdout protocol run (its tune split unseen)")
    differ = recipe_differences(kept_weights_config(info), kept_weights_config(tuned))
    if differ:
        raise ValueError(f"{source} is a different recipe ({', '.join(differ)} differ): its settings do not transfer")
    info["postprocess"] = {**settings, "tuned_on": f"{settings['tuned_on']}, for {os.path.relpath(source_path)} "
                                                   f"(same recipe, tune split unseen)"}
    carried = specialist_files(source_path, tuned) if settings.get("specialists") else {}
    for kind, path in (specialists or {}).items():
        if kind not in carried:
            raise ValueError(f"--specialists {kind}=...: the settings of {source} were tuned without a {kind} "
                             f"specialist")
        _check_refit_specialist(kind, path, model_path, info)
        carried[kind] = os.path.abspath(path)
        info["postprocess"]["tuned_on"] += f", with this refit's own {kind} specialist"
    if carried:  # the specialists those settings were tuned with, or the refit's own of the same recipe
        info["postprocess"]["specialists"] = attach_specialists(model_path, info, carried)
    fileio.write_text_atomic(info_path(model_path), json.dumps(info, indent=2))
    tuning = os.path.join(os.path.dirname(source_path), "tuning.json")
    if os.path.isfile(tuning):
        with open(tuning, encoding="utf-8") as stream:
            log = json.load(stream)
        log["settings_for"] = {"model": model_path, "copied_from": source_path}
        fileio.write_text_atomic(os.path.join(os.path.dirname(model_path), "tuning.json"), json.dumps(log, indent=2))
    return info["postprocess"]
