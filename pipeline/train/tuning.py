"""Choose a model's inference settings on the evaluation protocol's tune split, and store them in its run.json.

Every choice is made on the tune split (never the test split), in steps whose scores are all kept in
tuning.json, each kept only where it gains at least MIN_GAIN: (0) size normalisation: the nucleus area each image
is zoomed to (or none), with plain prediction; (1) prediction: plain, flips, flips + scales; (0) and (1) only
within --max-cost forward passes per image (by default neither: they cost 2-13 plain passes); (2) post-processing
thresholds and minimum size, globally and, where it wins out of sample, per kind of image (stained, bright-field);
(2c) clump splitting (pipeline/labels/instances.py: objects shaped like merged nuclei cut apart), one of 8 settings or
none; (3) the false-positive filter (pipeline/labels/instance_filter.py), judged by 5-fold cross-validation over the
tune images so the score that decides is of images the filter did not see; (4) the outline refiner
(pipeline/labels/outlines.py), judged the same way on the nuclei the filter leaves. Before all of these, a kind
specialist given to it (a model fine-tuned on one kind of image) is kept only if that kind's tune images,
predicted as the stored settings predict, score better with it. One process, no Ray: the tune split is small and every candidate reuses the same
predicted probabilities. A pass that scores below the settings an earlier pass stored (same tune split, same
specialists) leaves them in place.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.augment import apply_appearance, median_nucleus_area, predict_scales, size_normalising_zoom
from pipeline.data.protocol import image_kind
from pipeline.io import fileio
from pipeline.io.images import normalise
from pipeline.io.sources import load_sample
from pipeline.labels.instance_filter import fit_filter
from pipeline.labels.metric import image_score
from pipeline.labels.outlines import fit_refiner
from pipeline.model.registry import info_path, read_model_info, resolve_model, sha256_of, specialist_files
from pipeline.model.runinfo import Postprocess, RunInfo
from pipeline.segment.postprocess import settings_for_kind
from pipeline.segment.predictor import Predictor
from pipeline.train.choices import (MIN_SIZES, SEED_THRESHOLDS, THRESHOLDS, choose_clump_split, filter_cross_validation,
                                    instances_at, learnable, mean_score, per_kind_settings, prediction_passes,
                                    refiner_cross_validation, stored_passes, worth_its_cost)
from pipeline.train.evaluation import held_out_refs
from pipeline.train.size_range import size_range
from pipeline.train.specialists import attach_specialists, check_specialist, choose_specialists

PREDICTIONS = {"plain": (False, (1.0,)), "flips": (True, (1.0,)), "flips+scales": (True, (0.8, 1.0, 1.25))}
NUCLEUS_AREAS = (0, 150, 200, 250, 300)  # size normalisation targets in pixels (0: off), chosen on plain prediction
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


def _comparable_stored_score(saved: Postprocess, info: RunInfo, routed: dict[str, str],
                             tuned_on: str) -> float | None:
    """The tune score recorded with the model's stored settings, if an earlier pass tuned them on the same tune
    split with the same specialists (so the two passes' scores measure the same thing); else None.

    Each pass starts from the stored thresholds and can wander to settings that score lower; comparing the
    two keeps re-tuning from ever losing ground on the tune split.
    """
    if saved.tuned_on != tuned_on or saved.tune_score is None:
        return None
    stored = {kind: info.sha256.get(name) for kind, name in saved.specialists.items()}
    return saved.tune_score if stored == {kind: sha256_of(path) for kind, path in routed.items()} else None


def _passes(name: str, zoomed: bool = False) -> float:
    """prediction_passes of a way of predicting in PREDICTIONS, with or without size normalisation."""
    return prediction_passes(*PREDICTIONS[name], zoomed)


@dataclass
class TuneRun:
    """What the tune steps share: the tune split, the loaded model, the limits, the log they fill in, and the
    values each step chooses for the steps after it."""
    model_path: str
    info: RunInfo  # the model's run.json
    samples: list  # the tune split's images with their nuclei
    inputs: list  # each image as the model reads it
    truths: list
    kinds: list[str]
    predictor: Predictor  # the model and the specialists it routes to, loaded once
    routed: dict[str, str]  # {kind: specialist path} the stored settings will route to
    candidates: dict[str, str]  # specialists given to be judged ({} for none)
    predictions: tuple[str, ...]  # the ways of predicting asked for
    min_gain: float
    max_cost: float
    started: float
    log: dict
    saved: Postprocess  # the model's stored settings (run.json's postprocess)
    current: tuple  # their (threshold, seed_threshold, min_size): what steps 0 and 1 score with
    median_areas: list[float] = field(default_factory=list)  # each image's median nucleus, plain, measured once
    # Chosen by the steps, in order:
    nucleus_area: float = 0  # 0: size normalisation's target (0: off)
    plain: tuple[list, dict] | None = None  # 0: plain prediction at that target and its entry, for step 1
    prediction: str = "plain"  # 1: the way of predicting
    probabilities: list | None = None  # 1: the tune images predicted that way
    combos: list[tuple] = field(default_factory=list)  # 2: the threshold grid ...
    per_image: np.ndarray | None = None  # 2: ... each image's score at each of its combinations
    thresholds: tuple | None = None  # 2: (threshold, seed_threshold, min_size)
    by_kind: dict = field(default_factory=dict)  # 2b: rare kinds' own thresholds
    labels: list | None = None  # 2c, 3: each image's nuclei so far
    clump_split: dict | None = None  # 2c
    instance_filter: dict | None = None  # 3: the fitted filter, if kept
    outline_refiner: dict | None = None  # 4: the fitted refiner, if kept
    tune_score: float | None = None  # 3, 4: the tune score of the nuclei so far

    @property
    def measured_with(self) -> dict:
        """The stored post-processing values, by name: size normalisation measures nuclei with them."""
        return dict(zip(("threshold", "seed_threshold", "min_size"), self.current))

    def affordable(self, name: str, zoomed: bool = False) -> bool:
        """Whether a way of predicting costs at most max_cost forward passes per image (0: no limit)."""
        return not self.max_cost or _passes(name, zoomed) <= self.max_cost


def predict_tune_images(run: TuneRun, flips: bool, scales: tuple[float, ...], nucleus_area: float,
                        measure: bool = False) -> tuple[list, dict]:
    """Every tune image predicted as inference would with these flips, scales and size normalisation target
    (Predictor.predict_whole, the predictor itself left as it is), and their score at the stored thresholds.
    Size normalisation's first plain pass is the same for every target, so `measure` (plain, no size
    normalisation) measures each image's nuclei once for all of them."""
    tick = time.time()
    predicted = []
    for index, (image, kind) in enumerate(zip(run.inputs, run.kinds)):
        zoom = size_normalising_zoom(run.median_areas[index], nucleus_area) if nucleus_area else 1.0
        probabilities = predict_scales(np.asarray(image, np.float32), run.predictor.forward_for(kind),
                                       tuple(scale * zoom for scale in scales), run.predictor.tile,
                                       run.predictor.overlap, flips)
        if measure:
            run.median_areas.append(median_nucleus_area(probabilities, **run.measured_with))
        predicted.append(probabilities.astype(np.float16))
    return predicted, {"score": mean_score(run.truths, [instances_at(p, *run.current) for p in predicted]),
                       "predict_seconds": round(time.time() - tick, 1)}


def tune_specialists(run: TuneRun) -> None:
    """Specialists given are judged on their kind's tune images; without any given, the model's own stay."""
    if run.candidates:
        run.routed, run.log["steps"]["specialists"] = choose_specialists(
            run.predictor, run.candidates, run.inputs, run.truths, run.kinds, run.min_gain, info=run.info)


def tune_size_normalisation(run: TuneRun) -> None:
    """0. Size normalisation: each target nucleus area scored with plain prediction and the current
    post-processing; the first (area 0: off) also measures each image's nuclei."""
    plain, sizes = {}, {}
    trained_at = float(run.info.config.get("nucleus_area") or 0)
    areas = sorted(set(NUCLEUS_AREAS) | {trained_at})  # and the one it trained at
    for area in areas if run.affordable("plain", True) else [0.0]:
        plain[area], sizes[area] = predict_tune_images(run, False, (1.0,), area, measure=not area)  # 0 first
        print(f"  nucleus area {area or 'off':>4} (plain) score {sizes[area]['score']:.4f} "
              f"({sizes[area]['predict_seconds']:.0f} s)", flush=True)
    nucleus_area = max(sizes, key=lambda area: sizes[area]["score"])
    if sizes[nucleus_area]["score"] - sizes[0]["score"] < run.min_gain:
        nucleus_area = 0
    run.log["steps"]["size_normalisation"] = {"with": run.measured_with,
                                              "scores": {str(area): entry for area, entry in sizes.items()},
                                              "chosen": nucleus_area, "tried": len(sizes) > 1}
    run.nucleus_area, run.plain = nucleus_area, (plain[nucleus_area], sizes[nucleus_area])


def tune_prediction(run: TuneRun) -> None:
    """1. How to predict: each option scored with the current post-processing (and the chosen size normalisation)."""
    probabilities, step = {}, {}
    zoomed = bool(run.nucleus_area)
    for name in run.predictions:
        if not run.affordable(name, zoomed):
            print(f"  prediction {name:13s} not tried: {_passes(name, zoomed):.1f} forward "
                  f"passes per image, over --max-cost {run.max_cost:g}", flush=True)
            continue
        if name == "plain":
            probabilities[name], step[name] = run.plain
        else:
            probabilities[name], step[name] = predict_tune_images(run, *PREDICTIONS[name], run.nucleus_area)
        print(f"  prediction {name:13s} score {step[name]['score']:.4f} ({step[name]['predict_seconds']:.0f} s)",
              flush=True)
    run.plain = None
    if not step:
        raise ValueError(f"--predictions {','.join(run.predictions)}: none costs at most --max-cost {run.max_cost:g} "
                         "forward passes per image (plain costs 1)")
    run.prediction = worth_its_cost({name: entry["score"] for name, entry in step.items()},
                                    {name: _passes(name, zoomed) for name in step}, run.min_gain)
    run.log["steps"]["prediction"] = {"with": run.measured_with, "nucleus_area": run.nucleus_area, "scores": step,
                                      "chosen": run.prediction}
    run.probabilities = probabilities[run.prediction]


def tune_thresholds(run: TuneRun) -> None:
    """2. Post-processing thresholds on the chosen prediction: every image scored at every combination."""
    run.combos = list(itertools.product(THRESHOLDS, SEED_THRESHOLDS, MIN_SIZES))
    run.per_image = np.array([[image_score(truth, instances_at(p, *combo)) for combo in run.combos]
                              for truth, p in zip(run.truths, run.probabilities)])
    grid = dict(zip(run.combos, run.per_image.mean(axis=0)))
    best = run.thresholds = max(grid, key=grid.get)
    print(f"  post-processing threshold {best[0]} seed {best[1]} min size {best[2]}: {grid[best]:.4f} "
          f"(current {run.current}: {grid.get(run.current, float('nan')):.4f})", flush=True)
    names = ("threshold", "seed_threshold", "min_size")
    run.log["steps"]["postprocess"] = {"grid": [{"threshold": t, "seed_threshold": s, "min_size": m, "score": score}
                                                for (t, s, m), score in grid.items()],
                                       "chosen": dict(zip(names, best)), "score": grid[best]}


def tune_kind_thresholds(run: TuneRun) -> None:
    """2b. Stained and bright-field images may get their own values, kept only where they win out of sample."""
    run.by_kind, kind_log = per_kind_settings(run.per_image, run.combos, run.kinds,
                                              run.combos.index(run.thresholds), run.min_gain)
    run.log["steps"]["postprocess_by_kind"] = kind_log
    for kind, entry in kind_log.items():
        print(f"  {kind} ({entry['images']} images): global {entry['global']:.4f}, own {entry['chosen']} "
              f"leave-one-out {entry['leave_one_out']:.4f}: {'kept' if entry['kept'] else 'dropped'}", flush=True)


def tune_clump_split(run: TuneRun) -> None:
    """2c. Clump splitting of the nuclei the chosen settings give each image: objects shaped like several merged
    nuclei cut apart (the tune split's stained tissue loses most of its score to merged neighbours)."""
    labels = [instances_at(p, *settings_for_kind(*run.thresholds, run.by_kind, kind))
              for p, kind in zip(run.probabilities, run.kinds)]
    run.labels, entry, run.clump_split = choose_clump_split(run.truths, labels, run.probabilities, run.min_gain)
    run.log["steps"]["clump_split"] = entry
    print(f"  clump splitting: {max(entry['scores'].values()):.4f} at {entry['best']} vs "
          f"{entry['unsplit']:.4f} unsplit: {'kept' if entry['kept'] else 'dropped'}", flush=True)


def tune_instance_filter(run: TuneRun) -> None:
    """3. The false-positive filter, judged out of fold, on the nuclei steps 2-2c leave."""
    cv = filter_cross_validation(run.truths, run.labels, run.probabilities)
    cutoff = max(cv["by_cutoff"], key=cv["by_cutoff"].get)
    gain = cv["by_cutoff"][cutoff] - cv["unfiltered"]
    keep = gain >= run.min_gain and learnable([cv["all_targets"]])
    print(f"  instance filter: out-of-fold {cv['by_cutoff'][cutoff]:.4f} at cutoff {cutoff} vs unfiltered "
          f"{cv['unfiltered']:.4f}: {'kept' if keep else 'dropped'}", flush=True)
    run.log["steps"]["instance_filter"] = {"unfiltered": cv["unfiltered"], "out_of_fold_by_cutoff": cv["by_cutoff"],
                                           "chosen_cutoff": cutoff, "gain": gain, "kept": keep,
                                           "instances": int(len(cv["all_targets"])),
                                           "true_positive_fraction": float(np.mean(cv["all_targets"]))}
    run.instance_filter = fit_filter(cv["all_features"], cv["all_targets"], cutoff) if keep else None
    if keep:  # step 4 goes on from the nuclei the filter leaves, filtered out of fold
        run.labels = cv["filtered"][cutoff]
    run.tune_score = cv["by_cutoff"][cutoff] if keep else cv["unfiltered"]


def tune_outline_refiner(run: TuneRun) -> None:
    """4. The outline refiner, on the nuclei step 3 leaves (filtered out of fold), judged out of fold on the same
    folds."""
    before = run.tune_score
    outlines = refiner_cross_validation(run.truths, run.labels, run.probabilities,
                                        [sample.image for sample in run.samples])
    cutoff = max(outlines["by_cutoff"], key=outlines["by_cutoff"].get)
    gain = outlines["by_cutoff"][cutoff] - before
    keep = gain >= run.min_gain and learnable([outlines["all_targets"]])
    print(f"  outline refiner: out-of-fold {outlines['by_cutoff'][cutoff]:.4f} at cutoff {cutoff} vs "
          f"{before:.4f}: {'kept' if keep else 'dropped'}", flush=True)
    run.log["steps"]["outline_refiner"] = {"before": before, "out_of_fold_by_cutoff": outlines["by_cutoff"],
                                           "chosen_cutoff": cutoff, "gain": gain, "kept": keep,
                                           "pixels": int(len(outlines["all_targets"]))}
    run.outline_refiner = fit_refiner(outlines["all_features"], outlines["all_targets"], cutoff) if keep else None
    if keep:
        run.tune_score = outlines["by_cutoff"][cutoff]


# The tune steps, in order: each reads what the ones before it chose and records its own entry in the log.
STEPS = (tune_specialists, tune_size_normalisation, tune_prediction, tune_thresholds, tune_kind_thresholds,
         tune_clump_split, tune_instance_filter, tune_outline_refiner)


def _tunable_model(model: str) -> tuple[str, RunInfo]:
    """(absolute model path, run.json) of a model the tune step can tune; one clear error for any other."""
    model_path = os.path.abspath(resolve_model(model))
    info = read_model_info(model_path)
    if info.mode != "native" or info.num_classes != 3:
        raise ValueError("jobs/tune.py tunes native-mode, three-class models (the dsb2018 preset)")
    if info.config.get("holdout") == "refit":
        raise ValueError("this model was trained with --holdout refit, on the tune split too: tuning on it would "
                         "flatter it; give --settings-from the model of the same recipe trained with --holdout protocol")
    return model_path, info


def start_tuning(model: str, data: str, min_gain: float, predictions: tuple[str, ...],
                 specialists: dict[str, str] | None, max_cost: float) -> TuneRun:
    """Check the model and the specialists given, load the tune split and the model: the steps' shared state."""
    if set(predictions) - set(PREDICTIONS) or not predictions:
        raise ValueError(f"--predictions: choose among {', '.join(PREDICTIONS)}, got {', '.join(predictions)}")
    started = time.time()
    model_path, info = _tunable_model(model)
    trained = info.config  # the run's TrainConfig, as a dict
    refs = held_out_refs("tune", data or trained.get("data", ""), trained)
    samples = [load_sample(ref, with_masks=True) for ref in refs]
    inputs = [normalise(apply_appearance(sample.image, info.appearance)) for sample in samples]
    saved = info.postprocess
    log = {"model": model_path, "split": "tune", "images": len(refs), "steps": {}}
    print(f"tuning on the tune split: {len(refs)} images", flush=True)
    for kind, path in (specialists or {}).items():
        check_specialist(kind, path, info)
    routed = specialists or specialist_files(model_path, info)
    predictor = Predictor(model_path, batch_size=1, threads=2, tile=info.effective_tile,
                          specialists=routed)  # loaded once
    return TuneRun(model_path=model_path, info=info, samples=samples, inputs=inputs,
                   truths=[sample.labels for sample in samples], kinds=[image_kind(sample.image) for sample in samples],
                   predictor=predictor, routed=routed, candidates=specialists or {}, predictions=predictions,
                   min_gain=min_gain, max_cost=max_cost, started=started, log=log, saved=saved,
                   current=saved.thresholds)


def tuned_settings(run: TuneRun) -> dict:
    """The inference settings the steps chose, as run.json's postprocess stores them."""
    flips, scales = PREDICTIONS[run.prediction]
    threshold, seed_threshold, min_size = run.thresholds
    settings = {"threshold": threshold, "seed_threshold": seed_threshold, "min_size": min_size, "tta": flips,
                "scales": list(scales),
                "size_normalisation": {**run.measured_with, "nucleus_area": run.nucleus_area} if run.nucleus_area
                else None,
                "clump_split": run.clump_split, "instance_filter": run.instance_filter,
                "outline_refiner": run.outline_refiner, "by_kind": run.by_kind,
                "tuned_on": f"tune split of the evaluation protocol ({len(run.samples)} images)",
                "tune_score": run.tune_score}
    if run.routed:
        settings["specialists"] = {kind: f"specialist-{kind}.keras" for kind in run.routed}
    return settings


def keeps_stored(run: TuneRun, settings: dict) -> bool:
    """Whether the model's stored settings stay: tuned on the same tune split with the same specialists, within
    max_cost, and scoring better there than this pass's `settings` (logged and said when they do)."""
    saved = run.saved
    stored_score = _comparable_stored_score(saved, run.info, run.routed, settings["tuned_on"])
    if stored_score is not None and run.max_cost and stored_passes(saved) > run.max_cost:
        stored_score = None  # stored settings over the cost limit are replaced, whatever they scored
    kept = stored_score is not None and stored_score > settings["tune_score"]
    if kept:
        run.log["kept_stored"] = {"stored_tune_score": stored_score, "this_pass": settings["tune_score"]}
        print(f"  the stored settings score {stored_score:.4f} on the tune split, this pass's "
              f"{settings['tune_score']:.4f}: kept the stored ones", flush=True)
    return kept


def write_tuning(run: TuneRun, settings: dict, write: bool) -> None:
    """tuning.json beside the model, and where `write`, `settings` (with the specialists kept copied beside the
    model, those dropped unlisted) into its run.json."""
    folder = os.path.dirname(run.model_path)
    fileio.write_text_atomic(os.path.join(folder, "tuning.json"), json.dumps(run.log, indent=2))
    if not write:
        return
    saved, info = run.saved, run.info
    for kind in set(saved.specialists) - set(run.routed):  # a dropped specialist: no longer listed
        info.sha256.pop(saved.specialists[kind], None)
    if run.routed:
        settings["specialists"] = attach_specialists(run.model_path, info, run.routed)
    info.postprocess = Postprocess.from_dict(settings, info_path(run.model_path), "postprocess.")
    info.write(info_path(run.model_path))


def tune(model: str, data: str = "", write: bool = True, min_gain: float = MIN_GAIN,
         predictions: tuple[str, ...] = tuple(PREDICTIONS), specialists: dict[str, str] | None = None,
         max_cost: float = MAX_COST) -> dict:
    """Tune model's inference settings on its tune split; returns (and writes beside the model) tuning.json.

    A way of predicting whose forward passes exceed `max_cost` times plain prediction's (prediction_passes) is
    not tried (0: try all): inference with the stored settings stays within that factor of plain prediction."""
    run = start_tuning(model, data, min_gain, predictions, specialists, max_cost)
    for step in STEPS:
        step(run)
    settings = run.log["settings"] = tuned_settings(run)
    if not settings["size_normalisation"]:
        settings["size_normalisation"] = size_range(run.info, data, settings, tuple(run.routed))
    if keeps_stored(run, settings):
        write = False
    run.log["seconds"] = round(time.time() - run.started, 1)
    write_tuning(run, settings, write)
    return run.log


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


