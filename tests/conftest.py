"""Shared fixtures: one local Ray per test process, synthetic data, the real DSB2018 zip, a tiny model."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("NUCLEI_PROGRESS", "0")

REAL_ZIP = os.path.join(ROOT, "..", "shared", "data", "dsb2018", "stage1_train.zip")

# Small but real: every training test uses the same architecture at a size CPUs train in seconds.
TINY = dict(image_size=128, encoder_width=0.35, batch_size=4, backbone_weights="none")


def pytest_configure(config):
    """Ray's files of this test process and of the jobs it starts, among them the address file that a plain
    `ray.init()` joins, in a folder of their own: a Ray the machine already runs, or another test process'
    simulated cluster, is never joined. A short path: Ray's socket paths must fit in 107 bytes."""
    config.ray_tmpdir = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")


def pytest_unconfigure(config):
    shutil.rmtree(config.ray_tmpdir, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Every test of the session's trained model runs in one test process (pytest-xdist's --dist loadgroup), so
    it is trained once; those tests come first, then the other slow ones, so that two test processes end together."""
    def uses_the_trained_model(item) -> bool:
        return "run_with_a_killed_worker" in getattr(item, "fixturenames", ())

    for item in items:
        if uses_the_trained_model(item):
            item.add_marker(pytest.mark.xdist_group("trained_run"))
    items.sort(key=lambda item: 0 if uses_the_trained_model(item) else 1 if item.get_closest_marker("slow") else 2)


@pytest.fixture(scope="session")
def real_zip() -> str:
    if not os.path.isfile(REAL_ZIP):
        pytest.skip(f"real DSB2018 data not found at {os.path.normpath(REAL_ZIP)} (a fresh checkout has no ../shared)")
    return REAL_ZIP


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) per test process, shared by every test of that process that needs Ray."""
    from pipeline.data.datasets import ensure_ray
    import ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> str:
    """12 synthetic samples in Kaggle's layout (images and masks)."""
    from pipeline.io.synthetic import write_dataset

    folder = str(tmp_path_factory.mktemp("synthetic"))
    write_dataset(folder, 12, seed=5)
    return folder


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stream:
        return int(stream.read().rsplit(")", 1)[1].split()[1])  # the field after the state, past the name


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether process `pid` was started, through any chain of parents, by process `ancestor` (Linux /proc)."""
    try:
        while pid > 1:
            pid = _parent_pid(pid)
            if pid == ancestor:
                return True
    except (OSError, ValueError, IndexError):  # the process is gone
        pass
    return False


class WorkerKiller(threading.Thread):
    """Fault injection from outside the training code, as Ray's own tests do it: once rank 0 has logged
    `after_epochs` epochs to <output>/history.jsonl, SIGKILL the process of one live Ray Train worker of this
    session's Ray (its own local cluster, so only processes this test session started), then watch for the
    workers Ray Train starts in place of the group. `killed` holds the killed pid, `lines_at_kill` how many
    epochs history.jsonl had then, `replacements` the pids of workers started after the kill."""

    def __init__(self, output: str, after_epochs: int):
        super().__init__(name="worker-killer", daemon=True)
        self.history, self.after_epochs = os.path.join(output, "history.jsonl"), after_epochs
        self.killed: list[int] = []
        self.lines_at_kill = 0
        self.replacements: set[int] = set()
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def _logged_epochs(self) -> int:
        if not os.path.exists(self.history):
            return 0
        with open(self.history, encoding="utf-8") as stream:
            return sum(1 for line in stream if line.strip())

    def _workers(self) -> set[int]:
        """Pids of this session's live Ray Train workers: the processes this test process started (its own local
        Ray) whose title Ray set to the actor's class, `ray::RayTrainWorker...` (no dashboard, so no state API)."""
        workers = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as stream:
                    title = stream.read().split(b"\0", 1)[0]
            except OSError:  # gone meanwhile
                continue
            if title.startswith(b"ray::RayTrainWorker") and _descends_from(int(entry), os.getpid()):
                workers.add(int(entry))
        return workers

    def run(self) -> None:
        try:
            group: set[int] = set()
            while not self.stop.is_set() and not self.killed:
                if self._logged_epochs() >= self.after_epochs:
                    group = self._workers()
                    if group:
                        victim = min(group)
                        self.lines_at_kill = self._logged_epochs()
                        os.kill(victim, signal.SIGKILL)
                        self.killed.append(victim)
                        break
                self.stop.wait(0.2)
            while self.killed and not self.stop.is_set() and not self.replacements:
                self.replacements = self._workers() - group
                self.stop.wait(1.0)
        except BaseException as error:  # noqa: BLE001 - reported by the fixture
            self.error = error


@pytest.fixture(scope="session")
def run_with_a_killed_worker(tmp_path_factory, ray_session):
    """A tiny model trained by a Ray Train worker that is killed (SIGKILL) once epoch 2 is logged, in epoch 3 or
    while epoch 2's checkpoint is reported, and replaced by Ray Train. One worker: under MultiWorkerMirroredStrategy a
    step took twice as long on this CPU box (train/worker.py); two workers on two nodes are test_training.py's
    `ray job submit` test.

    Returns (TrainConfig, run.json info, the WorkerKiller that killed it).
    """
    from pipeline.config import TrainConfig
    from pipeline.train.training import run_training

    output = str(tmp_path_factory.mktemp("run"))
    config = TrainConfig(data="synthetic", synthetic_count=40, output=output, epochs=10, workers=1,
                         cpus_per_worker=1.0, learning_rate=3e-3, warmup_epochs=1, patience=10,
                         snapshots=2, seed=3, **TINY)
    killer = WorkerKiller(output, after_epochs=2)
    killer.start()
    try:
        info = run_training(config)
    finally:
        killer.stop.set()
        killer.join(120)
    assert killer.error is None, f"the worker killer failed: {killer.error!r}"
    assert killer.killed, "no Ray Train worker was killed: the fault was never injected"
    assert killer.replacements, "no Ray Train worker was started after the kill"
    return config, info, killer


@pytest.fixture(scope="session")
def trained_run(run_with_a_killed_worker):
    """(TrainConfig, run.json info) of that run: training tests assert on it; inference tests reuse the model."""
    return run_with_a_killed_worker[:2]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
