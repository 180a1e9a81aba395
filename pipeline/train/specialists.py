"""Kind specialists (models fine-tuned on one kind of image) given to the tune step: parsed, checked against the
model, kept only where their kind's tune images score better, and attached to run.json; settings copied from a model
(a refit keeps its parent's choices)."""
from __future__ import annotations

import copy
import itertools
import json
import os
import shutil

import numpy as np

from pipeline.config import SegmentConfig, recipe_differences
from pipeline.data.protocol import KINDS
from pipeline.io import fileio
from pipeline.labels.metric import image_score
from pipeline.model.registry import (info_path, read_model_info, reading_differences, resolve_model, sha256_of,
                                     specialist_files)
from pipeline.model.runinfo import RunInfo
from pipeline.segment.postprocess import prediction_settings
from pipeline.train.choices import (MIN_SIZES, SEED_THRESHOLDS, THRESHOLDS, describe_prediction, instances_at,
                                    leave_one_out_score)


def parse_specialists(text: str) -> dict[str, str]:
    """'stained=runs/st/model.keras,...' -> {kind: path}; one clear error for anything else."""
    specialists = {}
    for part in (part.strip() for part in text.split(",") if part.strip()):
        kind, _, path = part.partition("=")
        if kind.strip() not in KINDS or not path.strip():
            raise ValueError(f"--specialists: KIND=MODEL with KIND one of {', '.join(KINDS)}, got {part!r}")
        specialists[kind.strip()] = path.strip()
    return specialists


def check_specialist(kind: str, path: str, info: RunInfo | dict) -> None:
    """A specialist must read images as the model does and must not have trained on the tune split."""
    theirs = read_model_info(path)
    differ = reading_differences(theirs, info)
    if differ:
        raise ValueError(f"--specialists {kind}={path}: it differs from the model in {', '.join(differ)}")
    if theirs.config.get("holdout") != "protocol":
        raise ValueError(f"--specialists {kind}={path}: it must be trained with --holdout protocol (the tune split "
                         f"unseen), as it is judged on the tune split")


def choose_specialists(predictor, candidates: dict[str, str], inputs: list, truths: list, kinds: list[str],
                       min_gain: float, info: RunInfo | dict | None = None) -> tuple[dict, dict]:
    """Keep each kind's specialist whose tune images score better with it than with the model, both predicted
    as inference predicts with the model's run.json `info` (flips, scales, size normalisation:
    `prediction_settings`; plain prediction where none are stored) and at their best post-processing values out
    of sample (leave-one-out over the threshold grid).

    `predictor` holds the model and the candidates (Predictor(..., specialists=candidates)); the losers are
    removed from it, so it goes on routing only the kinds kept.
    """
    combos = list(itertools.product(THRESHOLDS, SEED_THRESHOLDS, MIN_SIZES))
    settings = prediction_settings(SegmentConfig(), info)
    predictor.tta, predictor.scales, predictor.size_normalisation = (settings[key] for key in
                                                                     ("tta", "scales", "size_normalisation"))
    prediction = describe_prediction(settings)
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
            per_image = np.array([[image_score(truths[i], instances_at(predicted[i], *combo)) for combo in combos]
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


def attach_specialists(model_path: str, info: RunInfo, specialists: dict[str, str]) -> dict[str, str]:
    """Copy each specialist beside the model as `specialist-<kind>.keras` (sha256 into info); returns {kind: name}."""
    folder, named = os.path.dirname(os.path.abspath(model_path)), {}
    for kind, path in specialists.items():
        name = f"specialist-{kind}.keras"
        target = os.path.join(folder, name)
        if os.path.abspath(path) != target:
            shutil.copyfile(path, target + ".partial")
            os.replace(target + ".partial", target)
        info.sha256[name] = sha256_of(target)
        named[kind] = name
    return named


def _check_refit_specialist(kind: str, path: str, model_path: str, info: RunInfo) -> None:
    """A refit's own specialist: trained with --holdout refit --kinds KIND, fine-tuned from the refit model itself."""
    theirs = read_model_info(path)
    trained = theirs.config  # its TrainConfig, as a dict
    problems = [f"{key} {getattr(theirs, key)!r} (the model's: {getattr(info, key)!r})"
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


def _by_content(digest: str) -> str:
    """How a refit's run.json names the model whose settings it took (copy_settings), so it can be found again."""
    return f"sha256 {digest[:12]}"


def _sibling_starts(refit_start: str | None, source_start: str | None) -> bool:
    """Whether two fine-tunes started from a refit and its protocol sibling: the refit's start took its settings
    from the source's start, as its run.json says by the sibling's sha256 (copy_settings writes it)."""
    if not refit_start or not source_start or not os.path.isfile(refit_start) or not os.path.isfile(source_start):
        return False
    copied = read_model_info(refit_start).postprocess.tuned_on or ""
    return _by_content(sha256_of(source_start)) in copied


def copy_settings(model: str, source: str, specialists: dict[str, str] | None = None) -> dict:
    """Give `model` (a --holdout refit run) the inference settings tuned for `source`, the same recipe trained
    with --holdout protocol, whose tune split was unseen; returns the settings written into model's run.json.

    Refuses a source that was not tuned, or whose recipe (apart from holdout, seed and paths) differs; two fine-tunes
    are the same recipe when the refit's start is the refit of the source's start (_sibling_starts). The
    specialists those settings were tuned with come along, unless `specialists` gives the refit its own: their
    recipe trained with --holdout refit from the refit model, as the refit is the source's recipe trained on the
    train and tune splits together (the recipe itself is the caller's to keep the same).
    """
    model_path, source_path = os.path.abspath(resolve_model(model)), os.path.abspath(resolve_model(source))
    info, tuned = read_model_info(model_path), read_model_info(source_path)
    settings = tuned.postprocess
    if settings.tuned_on is None:
        raise ValueError(f"{source}: its run.json holds no tuned settings (run jobs/tune.py on it first)")
    if tuned.config.get("holdout") != "protocol":
        raise ValueError(f"{source}: settings must come from a --holdout protocol run (its tune split unseen)")
    differ = recipe_differences(info.kept_weights_config(), tuned.kept_weights_config())
    if "init_from" in differ and _sibling_starts(info.config.get("init_from"), tuned.config.get("init_from")):
        differ.remove("init_from")
    if differ:
        raise ValueError(f"{source} is a different recipe ({', '.join(differ)} differ): its settings do not transfer")
    info.postprocess = copy.deepcopy(settings)  # the same keys as the source's, in the same order
    digest = (tuned.sha256 or {}).get("model.keras")  # names the source after it is replaced on disk
    by_content = f"model.keras {_by_content(digest)}, " if digest else ""
    info.postprocess.tuned_on = (f"{settings.tuned_on}, for {os.path.relpath(source_path)} "
                                 f"({by_content}same recipe, tune split unseen)")
    carried = specialist_files(source_path, tuned) if settings.specialists else {}
    for kind, path in (specialists or {}).items():
        if kind not in carried:
            raise ValueError(f"--specialists {kind}=...: the settings of {source} were tuned without a {kind} "
                             f"specialist")
        _check_refit_specialist(kind, path, model_path, info)
        carried[kind] = os.path.abspath(path)
        info.postprocess.tuned_on += f", with this refit's own {kind} specialist"
    if carried:  # the specialists those settings were tuned with, or the refit's own of the same recipe
        info.postprocess.specialists = attach_specialists(model_path, info, carried)
    info.write(info_path(model_path))
    tuning = os.path.join(os.path.dirname(source_path), "tuning.json")
    if os.path.isfile(tuning):
        with open(tuning, encoding="utf-8") as stream:
            log = json.load(stream)
        log["settings_for"] = {"model": model_path, "copied_from": source_path}
        fileio.write_text_atomic(os.path.join(os.path.dirname(model_path), "tuning.json"), json.dumps(log, indent=2))
    return info.postprocess.to_dict()
