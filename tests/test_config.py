"""The one configuration object per job: flags generated from it, presets, help."""
import subprocess
import sys

import pytest

from pipeline.config import TRAIN_PRESETS, SegmentConfig, TrainConfig, parse_args
from tests.conftest import ROOT


def test_preset_sets_its_values_and_explicit_flags_still_win():
    config = parse_args(TrainConfig, ["--preset", "dsb2018", "--epochs", "3", "--data", "x.zip"])
    assert config.mode == "native" and config.num_classes == 3 and config.appearance == "standardised"
    assert config.augment and config.epochs == 3 and config.data == "x.zip"
    assert all(getattr(config, key) == value for key, value in TRAIN_PRESETS["dsb2018"].items() if key != "epochs")


def test_defaults_are_the_notebook_recipe():
    config = parse_args(TrainConfig, [])
    assert (config.mode, config.num_classes, config.appearance, config.image_size) == ("resize", 2, "rgb", 128)


def test_bad_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, ["--image-size", "100"])
    assert "multiple of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(SegmentConfig, [], required=("input",))


@pytest.mark.parametrize("job", ["train", "segment", "submit", "evaluate", "quickstart"])
def test_every_job_explains_itself(job):
    done = subprocess.run([sys.executable, f"{ROOT}/jobs/{job}.py", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout and "--output" in done.stdout
