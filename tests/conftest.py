"""Shared fixtures: one local Ray for the whole session, synthetic data, the real DSB2018 zip, a tiny model."""
from __future__ import annotations

import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("NUCLEI_PROGRESS", "0")

REAL_ZIP = os.path.join(ROOT, "..", "shared", "data", "dsb2018", "stage1_train.zip")

# Small but real: every training test uses the same architecture at a size CPUs train in seconds.
TINY = dict(image_size=128, encoder_width=0.35, batch_size=4, backbone_weights="none")


@pytest.fixture(scope="session")
def real_zip() -> str:
    if not os.path.isfile(REAL_ZIP):
        pytest.skip(f"real DSB2018 data not found at {os.path.normpath(REAL_ZIP)} (a fresh checkout has no ../shared)")
    return REAL_ZIP


@pytest.fixture(scope="session")
def ray_session():
    """A single local Ray instance (2 CPUs) shared by every test that needs Ray."""
    from pipeline.data import ensure_ray
    import ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> str:
    """12 synthetic samples in Kaggle's layout (images and masks)."""
    from pipeline.synthetic import write_dataset

    folder = str(tmp_path_factory.mktemp("synthetic"))
    write_dataset(folder, 12, seed=5)
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, ray_session):
    """A tiny model trained by two MWMS workers, one of which is killed after epoch 2 and replaced.

    Returns (TrainConfig, run.json info). Training tests assert on it; inference tests reuse the model.
    """
    from pipeline.config import TrainConfig
    from pipeline.training import run_training

    output = str(tmp_path_factory.mktemp("run"))
    config = TrainConfig(data="synthetic", synthetic_count=64, output=output, epochs=12, workers=2,
                         cpus_per_worker=0.5, learning_rate=3e-3, warmup_epochs=1, patience=10, crash_at_epoch=2,
                         snapshots=2, seed=3, **TINY)
    info = run_training(config)
    return config, info


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
