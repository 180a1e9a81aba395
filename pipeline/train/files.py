"""A training run's folder, as its driver and its workers share it: history.jsonl (rank 0 writes each epoch's
metrics), backbone.json (where the encoder's first weights came from) and logs/: each worker's own output
(TensorFlow, Keras, Ray Train) and console.txt, the lines a person reads, which the driver shows as they come."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading

from pipeline.config import TrainConfig
from pipeline.io.fileio import write_text_atomic

BACKBONE_FILE = "backbone.json"  # rank 0 writes where the encoder's weights came from
LOGS = "logs"  # each worker's own output, and console.txt
CONSOLE_FILE = os.path.join(LOGS, "console.txt")  # the workers' lines for the driver's console
SHOWN_METRICS = ("loss", "val_loss", "val_nucleus_iou")  # what an epoch's line and the run's summary show


def say(output: str, text: str) -> None:
    """A worker's line for the person at the driver's console (the driver shows console.txt as it grows); with no
    run folder (a callback used alone), only printed."""
    print(text, flush=True)  # and in the worker's own log
    if not output:
        return
    path = os.path.join(os.path.abspath(output), CONSOLE_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(text.rstrip("\n") + "\n")


def epoch_line(metrics: dict, epochs: int) -> str:
    """'epoch 3/12: loss 0.412, val_loss 0.398, val_nucleus_iou 0.71, 9 s' from an epoch's logs."""
    shown = [f"{name} {metrics[name]:.3g}" for name in SHOWN_METRICS if name in metrics]
    seconds = f", {metrics['epoch_seconds']:.0f} s" if "epoch_seconds" in metrics else ""
    return f"epoch {metrics['epoch']}/{epochs}: {', '.join(shown)}{seconds}"


def send_output_to_log(output: str, rank: int) -> None:
    """From here on, this worker's stdout and stderr (TensorFlow's C++ lines, Keras, Ray Train's notices) go to
    OUTPUT/logs/worker-RANK.log instead of the driver's console; NUCLEI_VERBOSE=1 leaves them on the console."""
    if os.environ.get("NUCLEI_VERBOSE") == "1":
        return
    folder = os.path.join(os.path.abspath(output), LOGS)
    os.makedirs(folder, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(os.path.join(folder, f"worker-{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


@contextlib.contextmanager
def console_of(output: str, interval: float = 0.5):
    """While the block runs, show each line the workers add to OUTPUT/logs/console.txt (from its end when the block
    starts: a resumed run's old lines are not shown again)."""
    path = os.path.join(os.path.abspath(output), CONSOLE_FILE)
    start = os.path.getsize(path) if os.path.exists(path) else 0
    done = threading.Event()

    def show() -> None:
        nonlocal start
        if os.path.exists(path):
            with open(path, "rb") as stream:
                stream.seek(start)
                data = stream.read()
            lines = data[:data.rfind(b"\n") + 1]  # whole lines only
            start += len(lines)
            if lines:
                sys.stdout.write(lines.decode("utf-8", errors="replace"))
                sys.stdout.flush()

    def follow() -> None:
        while not done.wait(interval):
            show()

    thread = threading.Thread(target=follow, name="console", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        show()


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
