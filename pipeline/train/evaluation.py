"""Score a trained model on held-out Kaggle-layout images: DSB metric overall and per kind of image.

The validation split is recomputed from the run's own config (seed, fraction, data), so the images
scored are exactly the ones training never saw. Images go through the same streaming segmentation as
jobs/segment.py; scores use pipeline.labels.metric.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from pipeline.config import EvaluateConfig
from pipeline.data.datasets import protocol_refs, split_refs, training_refs
from pipeline.data.protocol import KINDS, image_kind
from pipeline.io import fileio
from pipeline.io.images import encode_png
from pipeline.io.sources import load_sample, read_file
from pipeline.labels.metric import THRESHOLDS, image_scores
from pipeline.model.registry import MODELS_DIR, resolve_model
from pipeline.outputs.folder import find_labels, overlay, read_labels
from pipeline.segment.postprocess import postprocess_settings, prediction_settings
from pipeline.segment.predictor import inspect_model
from pipeline.segment.run import run_segmentation

def summarise(rows: list[dict]) -> list[dict]:
    """Mean score and mean score at IoU 0.5, overall and per kind, from per-image rows."""
    table = []
    for kind in ("all", *KINDS):
        chosen = [row for row in rows if kind == "all" or row["kind"] == kind]
        if chosen:
            table.append({"kind": kind, "images": len(chosen),
                          "score": float(np.mean([row["score"] for row in chosen])),
                          "score_iou50": float(np.mean([row["score_iou50"] for row in chosen]))})
    return table


def picture(image: np.ndarray, truth: np.ndarray, predicted: np.ndarray, height: int = 256) -> np.ndarray:
    """image | true nuclei outlined | predicted nuclei outlined, scaled to `height` pixels."""
    import cv2

    strip = np.concatenate([image, overlay(image, truth), overlay(image, predicted)], axis=1)
    scale = height / image.shape[0]
    return cv2.resize(strip, (int(round(strip.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)


def _truth_and_prediction(ref, output: str):
    """(sample with its true labels, predicted labels read back from the segmentation output) of one image."""
    sample = load_sample(ref, with_masks=True)
    return sample, read_labels(find_labels(output, f"{ref.image_id}/images/{ref.image_id}.png")).astype(np.int32)


def held_out_refs(split: str, data: str, trained: dict) -> list:
    """The images of `split` for a run trained with config `trained`; refuses a split the run trained on."""
    refs = training_refs(data, int(trained.get("synthetic_count", 96)), int(trained.get("seed", 42)))
    if split == "all":
        return refs
    holdout = trained.get("holdout", "random")
    if split == "val":
        if holdout in ("protocol", "refit"):
            raise ValueError(f"this run was trained with --holdout {holdout}: score it with --split "
                             f"{'tune or --split ' if holdout == 'protocol' else ''}test")
        return split_refs(refs, float(trained.get("val_fraction", 0.2)), int(trained.get("seed", 42)))[1]
    same_data = data == trained.get("data") or (os.path.exists(data) and os.path.exists(trained.get("data", "")) and
                                                os.path.samefile(data, trained["data"]))
    if holdout == "refit" and split == "tune":
        raise ValueError("this run was trained with --holdout refit, on the tune split too: score it with --split test")
    if holdout not in ("protocol", "refit") or not same_data:
        raise ValueError(f"--split {split} needs a run trained with --holdout protocol on the same data "
                         f"(this run: --holdout {holdout} on {trained.get('data')!r}): its training images "
                         f"would overlap the {split} split")
    return protocol_refs(refs)[split]


def evaluate(config: EvaluateConfig) -> dict:
    """Segment and score the held-out images of config.model's run; writes scores.csv and pictures/."""
    import pandas as pd

    model_path = os.path.realpath(resolve_model(config.model))
    info = inspect_model(model_path)
    trained = info.config  # the run's TrainConfig, as a dict
    data = config.data or trained.get("data", "")
    if not data:
        raise ValueError("--data is needed: the model's run.json does not name its training data")
    protocol = trained.get("holdout") in ("protocol", "refit")
    split = config.split if config.split != "auto" else ("test" if protocol else "val")
    refs = held_out_refs(split, data, trained)
    print(f"scoring the {split} split: {len(refs)} images", flush=True)
    model_folder = os.path.dirname(model_path)
    shipped = os.path.dirname(model_folder) == os.path.realpath(MODELS_DIR)  # keep models/ clean
    output = os.path.abspath(config.output or (
        os.path.join("runs", "evaluation", os.path.basename(model_folder)) if shipped
        else os.path.join(model_folder, "evaluation")))
    with tempfile.TemporaryDirectory(prefix="evaluate-") as folder:
        for ref in refs:  # the images alone, in Kaggle's test layout
            path = fileio.safe_join(folder, f"{fileio.check_relative(ref.image_id)}/images/{ref.image_id}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as stream:
                stream.write(read_file(ref, ref.image_path) if ref.kind != "synthetic"
                             else encode_png(load_sample(ref, with_masks=False).image))
        # redo: labels a previous evaluation left with other settings must not be reused
        segment = EvaluateConfig(**{**vars(config), "model": model_path, "input": folder, "output": output,
                                    "redo": True, "measurements": False, "report": False})
        result = run_segmentation(segment, output)
    failed = [row for row in result.rows if row["status"] == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} images failed to segment, e.g. {failed[0]['path']}: {failed[0]['error']}")
    rows, pictures = [], []
    for ref in refs:
        sample, predicted = _truth_and_prediction(ref, output)
        scores = image_scores(sample.labels, predicted)
        rows.append({"image_id": ref.image_id, "kind": image_kind(sample.image), "height": sample.height,
                     "width": sample.width, "true_nuclei": int(sample.nuclei), "predicted_nuclei": int(predicted.max()),
                     "score": float(scores.mean()), "score_iou50": float(scores[0])})
        pictures.append((rows[-1]["score"], ref))
    frame = pd.DataFrame(rows).sort_values("score")
    fileio.write_text_atomic(os.path.join(output, "scores.csv"), frame.to_csv(index=False))
    if config.pictures > 0:
        ordered = sorted(pictures, key=lambda item: item[0])
        chosen = ordered[-config.pictures:][::-1] + ordered[:config.pictures]
        for rank, (score, ref) in enumerate(chosen):  # decoded again: only these few, not all images held
            sample, predicted = _truth_and_prediction(ref, output)
            name = f"{'best' if rank < config.pictures else 'worst'}_{score:.3f}_{ref.image_id[:12]}.png"
            fileio.write_bytes_atomic(os.path.join(output, "pictures", name),
                                      encode_png(picture(sample.image, sample.labels, predicted)))
    post = postprocess_settings(config, info)
    summary = {"model": model_path, "data": data, "split": split, **prediction_settings(config, info),
               "postprocess": {**dataclasses.asdict(post), "instance_filter": post.instance_filter is not None,
                               "outline_refiner": post.outline_refiner is not None,
                               "clump_split": post.clump_split is not None},
               "thresholds": [round(float(t), 2) for t in THRESHOLDS], "table": summarise(rows),
               "seconds": round(result.seconds, 1)}
    fileio.write_text_atomic(os.path.join(output, "summary.json"), json.dumps(summary, indent=2))
    return summary


def format_table(summary: dict) -> str:
    """The summary as a Markdown table (what the README shows)."""
    lines = ["| images | n | DSB score | score at IoU 0.5 |", "|---|---:|---:|---:|"]
    for row in summary["table"]:
        lines.append(f"| {row['kind']} | {row['images']} | {row['score']:.3f} | {row['score_iou50']:.3f} |")
    return "\n".join(lines)
