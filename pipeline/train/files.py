"""A training run's folder, as its driver and its workers share it: history.jsonl (rank 0 writes each epoch's
metrics) and backbone.json (where the encoder's first weights came from)."""
from __future__ import annotations

import json
import os

from pipeline.config import TrainConfig
from pipeline.io.fileio import write_text_atomic

BACKBONE_FILE = "backbone.json"  # rank 0 writes where the encoder's weights came from


def truncate_history(output: str, last_epoch: int) -> None:
    """Drop history.jsonl lines of epochs after the checkpoint a run resumes from (they are redone)."""
    path = os.path.join(os.path.abspath(output), "history.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as stream:
            kept = [line for line in stream if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch]
        write_text_atomic(path, "".join(kept))


def read_history(output: str) -> list[dict]:
    """Per-epoch metrics of the run, as rank 0 wrote them to history.jsonl (all epochs, unlike Ray's result)."""
    path = os.path.join(output, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def backbone_init(config: TrainConfig) -> str:
    """Where the encoder's first weights came from: the file rank 0 wrote, or the model fine-tuned from."""
    if config.init_from:
        return f"--init-from {config.init_from}"
    path = os.path.join(config.output, BACKBONE_FILE)
    if not os.path.exists(path):
        return "unknown"
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)["backbone_init"]
