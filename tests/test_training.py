"""Ray Train: a run survives a killed worker and a killed job, two MultiWorkerMirroredStrategy workers train on two
nodes of a `ray job submit` cluster, and each leaves a usable run."""
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def test_a_killed_worker_is_replaced_and_the_run_learns_on(run_with_a_killed_worker):
    config, info, killer = run_with_a_killed_worker
    history = [json.loads(line) for line in open(os.path.join(config.output, "history.jsonl"))]
    epochs = [row["epoch"] for row in history]
    # One worker's process was SIGKILLed once epoch 2 was logged, at some point of epoch 3 (or of epoch 2's
    # report), and a new worker group took over. It resumed from the last committed checkpoint (epoch 1, 2 or
    # 3) and rewrote the history from there, so every epoch appears once; a start from scratch would repeat them.
    assert len(killer.killed) == 1 and killer.replacements and not set(killer.killed) & killer.replacements
    assert 2 <= killer.lines_at_kill < config.epochs
    assert epochs == list(range(1, config.epochs + 1))
    first, best = history[0], min(history, key=lambda row: row["val_loss"])
    assert best["val_loss"] < first["val_loss"] * 0.8
    assert max(row["val_nucleus_iou"] for row in history) > first["val_nucleus_iou"] + 0.05
    assert max(row["nucleus_iou"] for row in history) > 0.3  # the training set is learnt clearly
    assert info["workers"] == 1 and info["epochs_run"] == config.epochs
    assert info["backbone_init"] == "none"  # rank 0 recorded where the encoder's weights came from


def test_run_folder_holds_model_logs_and_snapshots(trained_run):
    from pipeline.model.network import load_model

    config, info = trained_run
    assert glob.glob(os.path.join(config.output, "tensorboard", "**", "events.out.tfevents.*"), recursive=True)
    assert len(glob.glob(os.path.join(config.output, "snapshots", "epoch_*.png"))) >= config.epochs - 1
    model, run = load_model(os.path.join(config.output, "model.keras"))
    assert run.image_size == 128 and run.num_classes == 2
    x = np.random.default_rng(0).random((2, 128, 128, 3)).astype(np.float32)
    again, _ = load_model(os.path.join(config.output, "model.keras"))
    assert np.array_equal(model.predict(x, verbose=0), again.predict(x, verbose=0))


def test_model_does_not_predict_only_background(trained_run):
    """The trap of Keras' BatchNorm momentum from random init: a model that segments nothing."""
    from pipeline.data.datasets import training_dataset, training_refs
    from pipeline.model.network import load_model

    config, _ = trained_run
    model, _ = load_model(os.path.join(config.output, "model.keras"))
    batch = training_dataset(training_refs("synthetic", 8, 99), 128, 10**8, 2).take_batch(8)
    predicted = np.argmax(model.predict(batch["image"], verbose=0), axis=-1)
    assert predicted.mean() > 0.2 * batch["mask"].mean()


def _ray_start(ray_bin: str, env: dict, *flags: str) -> subprocess.Popen:
    """`ray start ... --block` with ports of its own (the test session's Ray already holds the default ones)."""
    agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(4))
    return subprocess.Popen([ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                             "--object-store-memory=500000000", "--disable-usage-stats", *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _joined(address: str, count: int, seconds: float) -> bool:
    """Whether the cluster behind the dashboard at `address` has `count` alive nodes within `seconds`."""
    from ray.util.state import list_nodes

    deadline = time.time() + seconds
    while True:
        try:
            if len(list_nodes(address=address, filters=[("state", "=", "ALIVE")])) >= count:
                return True
        except Exception:  # noqa: BLE001 - the dashboard not answering yet
            pass
        if time.time() > deadline:
            return False
        time.sleep(1)


def _committed_checkpoints(output) -> str:
    """Ray Train's record of the checkpoints it has registered for the run in `output` ('' before the first)."""
    found = glob.glob(str(output / "ray" / "*" / "checkpoint_manager_snapshot.json"))
    return open(found[0], encoding="utf-8").read() if found else ""


def test_a_job_on_two_nodes_killed_mid_run_resumes_stops_at_its_time_limit_and_tunes(tmp_path):
    """`ray start --head` on loopback and a second node joining it (two raylets: two nodes, one machine). `ray job
    submit` trains one MWMS worker on each node (STRICT_SPREAD); its driver is SIGKILLed once epoch 2's checkpoint
    is committed. A second `ray job submit ... --resume` continues from that checkpoint (at most the epoch in flight
    is redone) with a new, tiny --time-limit: rank 0's decision to stop must reach the worker on the other node. The
    run then chooses its inference settings on the tune split (its own --tune), as jobs/tune.py would. Then stop
    only these two nodes."""
    from ray.job_submission import JobSubmissionClient

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # A temp folder per node (short: Ray's socket paths must fit in 107 bytes): a node's runtime-env agent unpacks the
    # job's working directory there, and two agents unpacking into one folder pulled files from under the driver.
    temp_dirs = [tempfile.mkdtemp(prefix="rh", dir="/tmp") for _ in range(2)]
    nodes = [_ray_start(ray_bin, env, "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dashboard}", f"--temp-dir={temp_dirs[0]}")]
    output = tmp_path / "run"
    address = f"http://127.0.0.1:{dashboard}"

    def submitted(submission: str) -> bool:
        try:
            JobSubmissionClient(address).get_job_status(submission)
            return True
        except Exception:  # noqa: BLE001 - no such job (or no answer): not submitted
            return False

    def submit(submission: str, *flags: str, wait: bool = True) -> subprocess.CompletedProcess:
        """`ray job submit` under the id `submission`; again while the head's job agent is not up yet (it comes a
        little after the dashboard) or the dashboard dropped the request before the job existed (seen once under
        load): the id makes a second job of the same submission impossible."""
        for _ in range(30):
            job = subprocess.run([ray_bin, "job", "submit", "--address", address, "--submission-id", submission,
                                  "--working-dir", ROOT, *([] if wait else ["--no-wait"]), "--", sys.executable,
                                  "jobs/train.py", "--output", str(output), *flags],
                                 env=env, capture_output=True, text=True, timeout=900)
            text = job.stdout + job.stderr
            dropped = job.returncode != 0 and "Connection aborted" in text and not submitted(submission)
            if "No available agent" not in text and not dropped:
                return job
            time.sleep(2)
        return job

    try:
        for _ in range(360):  # up to 3 minutes: on a loaded 2-core machine the dashboard took over one
            try:
                socket.create_connection(("127.0.0.1", dashboard), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.5)
        for _ in range(3):  # the worker node must have joined before a STRICT_SPREAD job is placed (once it never did)
            nodes.append(_ray_start(ray_bin, env, f"--address=127.0.0.1:{port}", f"--temp-dir={temp_dirs[1]}"))
            if _joined(address, 2, seconds=90):
                break
            os.killpg(nodes.pop().pid, signal.SIGKILL)  # another try, with ports of its own
        assert _joined(address, 2, seconds=1), "the second node never joined the head"
        submission = "nuclei-two-nodes-first"
        first = submit(submission, "--epochs", "5", "--data", "synthetic", "--synthetic-count", "16", "--workers", "2",
                       "--placement", "STRICT_SPREAD", "--cpus-per-worker", "0.5", "--mode", "native",
                       "--num-classes", "3", "--crops-per-image", "2", "--holdout", "protocol", "--tune",
                       "--image-size", "64", "--encoder-width", "0.35", "--decoder-width", "0.25", "--batch-size", "4",
                       "--backbone-weights", "none", "--snapshots", "1", "--warmup-epochs", "0", "--seed", "4",
                       wait=False)
        assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
        client = JobSubmissionClient(address)
        deadline = time.time() + 600
        while "epoch_0002" not in _committed_checkpoints(output):
            status = client.get_job_status(submission)
            assert not status.is_terminal() and time.time() < deadline, (
                f"the job ended ({status}) before its second checkpoint: {client.get_job_logs(submission)[-4000:]}")
            time.sleep(0.2)
        os.kill(int(client.get_job_info(submission).driver_info.pid), signal.SIGKILL)
        done_before = [json.loads(line)["epoch"] for line in open(output / "history.jsonl")]
        assert 2 <= max(done_before) < 5, done_before
        assert not (output / "model.keras").exists()
        for _ in range(120):  # Ray ends the dead driver's Ray Train workers, and their hold on the two nodes
            if client.get_job_status(submission).is_terminal():
                break
            time.sleep(0.5)

        resumed = submit("nuclei-two-nodes-resumed", "--resume", "--time-limit", "0.001")  # minutes: stop after the first resumed epoch
        log = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0 and "succeeded" in log, log[-4000:]
        assert len(set(re.findall(r"worker rank \d of 2 on node (\w+)", log))) == 2, log[-4000:]
        started_at = int(re.search(r"resuming from the checkpoint of epoch (\d+)", log).group(1))
        assert started_at >= 2  # continued, not started over
        assert started_at >= max(done_before) - 1  # at most the epoch in flight when it was killed is redone
        assert f"time limit: stopping after epoch {started_at + 1}" in log, log[-4000:]
        epochs = [json.loads(line)["epoch"] for line in open(output / "history.jsonl")]
        assert epochs == list(range(1, started_at + 2))  # one line per epoch: lines of redone epochs were replaced
        info = json.loads((output / "run.json").read_text())
        assert info["epochs_run"] == started_at + 1
        assert (output / "model.keras").is_file()
        assert glob.glob(str(output / "tensorboard" / "**" / "events.out.tfevents.*"), recursive=True)
        assert glob.glob(str(output / "snapshots" / "*.png"))
        # The tune step, after the resumed training (the run's own --tune).
        stored, tuning = info["postprocess"], json.loads((output / "tuning.json").read_text())
        assert stored["tuned_on"].startswith("tune split") and stored["tune_score"] == tuning["settings"]["tune_score"]
        assert {"threshold", "seed_threshold", "min_size", "tta", "scales"} <= set(stored)
        assert f"tune_score={stored['tune_score']:.4f}" in log and "run.json holds the settings" in log
    finally:  # a test cluster's state is not worth a clean stop (30 s): kill both nodes' processes at once
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        for node in nodes:
            node.wait(30)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_fine_tuning_starts_from_the_given_model_on_the_chosen_kinds_only(trained_run, synthetic_folder, tmp_path):
    """--init-from starts from a trained model's weights (steps too small to move them leave them as they were);
    --kinds keeps only that kind of image, --extra-data's images too, which join training only; --keep last runs
    every epoch and keeps the last one's weights and metrics; a model of another architecture or a kind with no
    images is refused."""
    import dataclasses

    from pipeline.data.datasets import image_kinds, training_refs
    from pipeline.model.network import load_model
    from pipeline.io.synthetic import synthetic_refs
    from pipeline.train.training import run_training

    config, _ = trained_run
    start = os.path.join(config.output, "model.keras")
    tuned = dataclasses.replace(config, output=str(tmp_path / "tuned"), init_from=start, kinds="fluorescence",
                                epochs=2, workers=1, cpus_per_worker=1.0, learning_rate=1e-12, warmup_epochs=0,
                                patience=1, keep="last", snapshots=0, synthetic_count=20,
                                extra_data=synthetic_folder)
    info = run_training(tuned)
    assert info["config"]["init_from"] == start and info["config"]["kinds"] == "fluorescence"
    assert info["backbone_init"] == f"--init-from {start}"
    history = [json.loads(line) for line in (tmp_path / "tuned" / "history.jsonl").read_text().splitlines()]
    assert info["epochs_run"] == info["kept_epoch"] == 2 and 1 <= info["best_epoch"] <= 2
    assert info["final_metrics"]["val_loss"] == history[-1]["val_loss"]
    kinds = list(image_kinds(synthetic_refs(20, config.seed)).values())  # synthetic data has all three looks
    extra = list(image_kinds(training_refs(synthetic_folder, 0, 0)).values())
    assert 0 < extra.count("fluorescence") < len(extra)
    assert info["train_images"] + info["val_images"] == kinds.count("fluorescence") + extra.count("fluorescence")
    assert info["val_images"] < kinds.count("fluorescence")
    before, after = load_model(start)[0], load_model(os.path.join(tuned.output, "model.keras"))[0]
    assert len(before.trainable_weights) == len(after.trainable_weights)
    for mine, theirs in zip(before.trainable_weights, after.trainable_weights):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), atol=1e-6)

    with pytest.raises(ValueError, match="--kinds stained: .* has 0 training and 0 validation images"):
        run_training(dataclasses.replace(tuned, output=str(tmp_path / "none"), kinds="stained", synthetic_count=4))
    with pytest.raises(ValueError, match="--init-from .* differs from this run in encoder_width"):
        run_training(dataclasses.replace(tuned, output=str(tmp_path / "other"), encoder_width=0.5))


def test_the_quickstart_prints_a_short_console_and_keeps_the_rest_in_the_run_folder(tmp_path):
    """README command 1, short: at most 40 lines (start, data, one per epoch, results), ending with the score;
    TensorFlow's, Keras' and Ray Train's own lines are in the run folder's logs, not on the console."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "quickstart.py"), "--output", str(tmp_path),
                           "--epochs", "2", "--train-images", "8", "--test-images", "2"],
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, capture_output=True,
                          text=True, timeout=900)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(lines[-40:])
    assert len(lines) <= 40 and lines[-1].startswith("score="), "\n".join(lines)
    assert [line for line in lines if line.startswith("epoch ")] == [line for line in lines if "val_loss" in line
                                                                     and not line.startswith("model:")]
    assert len([line for line in lines if line.startswith("epoch ")]) == 2
    for noise in ("absl", "oneDNN", "cuda", "Checkpoint successfully", "logging.cc", "TrainingReport"):
        assert not any(noise in line for line in lines), noise
    worker_log = (tmp_path / "run" / "logs" / "worker-0.log").read_text()
    assert "Epoch 2/2" in worker_log  # Keras' own lines, kept
