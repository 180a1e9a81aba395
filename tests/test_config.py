"""The one configuration object per job: flags generated from it, presets, help."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from pipeline.config import TRAIN_PRESETS, SegmentConfig, TrainConfig, parse_args
from pipeline.labels.instances import DEFAULT_CLUMP_SPLIT
from tests.conftest import ROOT


def test_preset_sets_its_values_and_explicit_flags_still_win():
    config = parse_args(TrainConfig, ["--preset", "dsb2018", "--epochs", "3", "--data", "x.zip"])
    assert config.mode == "native" and config.num_classes == 3 and config.appearance == "colour"
    assert config.loss == "ce+dice"
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


@pytest.mark.parametrize("job", ["train", "segment", "submit", "evaluate", "export", "tune", "package", "quickstart"])
def test_every_job_explains_itself(job):
    done = subprocess.run([sys.executable, f"{ROOT}/jobs/{job}.py", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout and ("--output" in done.stdout or "--model" in done.stdout)


def test_installed_commands_are_the_jobs():
    """`pip install -e .` puts each job on the PATH as nuclei-NAME (pyproject.toml's [project.scripts])."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as stream:
        scripts = tomllib.load(stream)["project"]["scripts"]
    assert {name: target for name, target in scripts.items()} == {f"nuclei-{job}": f"jobs.{job}:main" for job in (
        "train", "tune", "segment", "submit", "evaluate", "export", "package", "quickstart")}
    command = os.path.join(os.path.dirname(sys.executable), "nuclei-segment")
    if not os.path.exists(command):
        pytest.skip(f"{command} not installed (pip install -e . installs it)")
    done = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: nuclei-segment") and "--input" in done.stdout
    done = subprocess.run([command, "--input", "no/such/folder", "--output", "out"], capture_output=True, text=True,
                          timeout=120)
    last = done.stderr.strip().splitlines()[-1]  # after TensorFlow's start-up lines
    assert done.returncode == 1 and last.startswith("error:") and "no/such/folder" in last


def test_tensorflow_starts_quietly_unless_asked():
    code = "import pipeline.model.tfkeras as t; t.keras.layers.Dense(2)(t.tf.zeros((1, 3))); print('ok')"
    env = {**os.environ, "NUCLEI_VERBOSE": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok" and done.stderr == ""
    verbose = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**env, "NUCLEI_VERBOSE": "1"})
    assert verbose.returncode == 0 and len(verbose.stderr) > len(done.stderr)  # TensorFlow's own start-up lines


def test_learning_rate_decays_to_the_last_epoch_the_time_limit_allows():
    from pipeline.train.schedule import learning_rate_at

    config = TrainConfig(learning_rate=1e-3, epochs=20, warmup_epochs=2)
    warmup = [learning_rate_at(epoch, config) for epoch in range(2)]
    assert warmup[0] < warmup[1] < 1e-3
    assert learning_rate_at(2, config) == pytest.approx(1e-3)
    full = [learning_rate_at(epoch, config) for epoch in range(2, 21)]
    assert all(a > b for a, b in zip(full, full[1:-1])) and full[-2] > 5e-5
    assert learning_rate_at(20, config) == pytest.approx(5e-5)  # decay ends at the planned last epoch
    # A time limit that leaves room for 10 epochs: the same decay, compressed to end at epoch 10.
    assert learning_rate_at(10, config, epochs=10) == pytest.approx(5e-5)
    assert learning_rate_at(6, config, epochs=10) == pytest.approx(learning_rate_at(11, config))
    assert learning_rate_at(6, config, epochs=40) == learning_rate_at(6, config)  # never longer than asked


def test_a_time_limit_leaves_the_tune_steps_epochs_free_when_the_run_will_be_tuned():
    import dataclasses

    from pipeline.train.schedule import epochs_that_fit
    from pipeline.train.tuning import TUNE_COST_IN_EPOCHS, will_tune

    assert epochs_that_fit(10, seconds_left=600, epoch_seconds=60) == 20
    assert epochs_that_fit(10, seconds_left=600, epoch_seconds=60, reserved_epochs=5) == 15
    assert epochs_that_fit(10, seconds_left=250, epoch_seconds=60, reserved_epochs=5) == 10  # stop now, never fewer
    preset = dataclasses.asdict(parse_args(TrainConfig, ["--preset", "dsb2018"]))
    assert will_tune(preset) and TUNE_COST_IN_EPOCHS > 0
    assert not will_tune({**preset, "holdout": "refit"}) and not will_tune({**preset, "tune": False})


def test_postprocess_settings_come_from_flags_then_the_models_run_json():
    from pipeline.segment.postprocess import postprocess_settings

    saved = {"postprocess": {"threshold": 0.6, "seed_threshold": 0.4, "min_size": 30}}
    assert dataclasses.asdict(postprocess_settings(SegmentConfig(), saved)) == {"threshold": 0.6, "seed_threshold": 0.4, "min_size": 30,
                                                            "instance_filter": None, "outline_refiner": None,
                                                            "clump_split": None, "by_kind": {}}
    assert dataclasses.asdict(postprocess_settings(SegmentConfig(), {})) == {"threshold": 0.5, "seed_threshold": 0.5, "min_size": 10,
                                                         "instance_filter": None, "outline_refiner": None,
                                                         "clump_split": None, "by_kind": {}}
    flags = parse_args(SegmentConfig, ["--threshold", "0.7", "--min-size", "5"])
    assert dataclasses.asdict(postprocess_settings(flags, saved)) == {"threshold": 0.7, "seed_threshold": 0.4, "min_size": 5,
                                                  "instance_filter": None, "outline_refiner": None,
                                                  "clump_split": None, "by_kind": {}}
    # Clump splitting: run.json's setting by default; --no-split-clumps turns it off, --split-clumps on (the
    # defaults for a model that stores none).
    stored = {"min_area_ratio": 2.0, "max_solidity": 0.9, "spacing": 0.9}
    tuned = {"postprocess": {**saved["postprocess"], "clump_split": stored}}
    assert postprocess_settings(SegmentConfig(), tuned).clump_split == stored
    assert postprocess_settings(parse_args(SegmentConfig, ["--no-split-clumps"]), tuned).clump_split is None
    assert postprocess_settings(parse_args(SegmentConfig, ["--split-clumps"]), saved).clump_split == \
        DEFAULT_CLUMP_SPLIT


def test_inference_choices_come_from_run_json_unless_flags_say_otherwise():
    from pipeline.segment.postprocess import postprocess_settings, prediction_settings

    fitted = {"kind": "logistic", "cutoff": 0.5}
    saved = {"postprocess": {"tta": True, "scales": [0.8, 1.0, 1.25], "instance_filter": fitted}}
    assert prediction_settings(SegmentConfig(), saved) == {"tta": True, "scales": (0.8, 1.0, 1.25), "size_normalisation": None}
    assert prediction_settings(SegmentConfig(), {}) == {"tta": False, "scales": (1.0,), "size_normalisation": None}
    flags = parse_args(SegmentConfig, ["--no-tta", "--scales", "1,1.5", "--no-instance-filter"])
    assert prediction_settings(flags, saved) == {"tta": False, "scales": (1.0, 1.5), "size_normalisation": None}
    stored = {"nucleus_area": 200, "threshold": 0.7, "seed_threshold": 0.4, "min_size": 30}
    sized = {"mode": "native", "postprocess": {**saved["postprocess"], "size_normalisation": stored}}
    assert prediction_settings(SegmentConfig(), sized)["size_normalisation"] == stored
    assert prediction_settings(parse_args(SegmentConfig, ["--nucleus-area", "0"]), sized)["size_normalisation"] is None
    assert prediction_settings(parse_args(SegmentConfig, ["--nucleus-area", "150"]), {"mode": "native"})[
        "size_normalisation"] == {"nucleus_area": 150, "threshold": 0.5, "seed_threshold": 0.5, "min_size": 10}
    with pytest.raises(ValueError, match="native-mode"):
        prediction_settings(parse_args(SegmentConfig, ["--nucleus-area", "150"]), {"mode": "resize"})
    ranged = {"mode": "native", "postprocess": {"size_normalisation": {**stored, "within": [60, 2000]}}}
    assert prediction_settings(SegmentConfig(), ranged)["size_normalisation"]["within"] == [60, 2000]
    assert "within" not in prediction_settings(parse_args(SegmentConfig, ["--nucleus-area", "150"]), ranged)[
        "size_normalisation"]  # a target given zooms every image
    assert prediction_settings(parse_args(SegmentConfig, ["--diameter", "40"]), ranged)[
        "size_normalisation"]["diameter"] == 40
    with pytest.raises(ValueError, match="stores no nucleus size"):
        prediction_settings(parse_args(SegmentConfig, ["--diameter", "40"]), {"mode": "native"})
    assert postprocess_settings(SegmentConfig(), saved).instance_filter == fitted
    assert postprocess_settings(flags, saved).instance_filter is None
    refined = {"postprocess": {**saved["postprocess"], "outline_refiner": fitted}}
    assert postprocess_settings(SegmentConfig(), refined).outline_refiner == fitted
    assert postprocess_settings(parse_args(SegmentConfig, ["--no-refine-outlines"]), refined).outline_refiner is None
    with pytest.raises(ValueError, match="no fitted outline refiner"):
        postprocess_settings(parse_args(SegmentConfig, ["--refine-outlines"]), saved)
    own = {"stained": {"threshold": 0.6, "seed_threshold": 0.6, "min_size": 50}}
    with_kinds = {"postprocess": {**saved["postprocess"], "by_kind": own}}
    assert postprocess_settings(SegmentConfig(), with_kinds).by_kind == own
    assert postprocess_settings(parse_args(SegmentConfig, ["--min-size", "5"]), with_kinds).by_kind == {}
    with pytest.raises(ValueError, match="no fitted instance filter"):
        postprocess_settings(parse_args(SegmentConfig, ["--instance-filter"]), {})
    with pytest.raises(ValueError, match="between 0.25 and 4"):
        prediction_settings(parse_args(SegmentConfig, ["--scales", "1,9"]), {})


def test_tuning_after_training_is_the_presets_choice_and_not_part_of_its_recipe():
    import dataclasses

    from pipeline.config import recipe_differences
    from pipeline.train.tuning import untunable_reason

    preset = parse_args(TrainConfig, ["--preset", "dsb2018"])
    assert preset.tune and not parse_args(TrainConfig, ["--preset", "dsb2018", "--no-tune"]).tune
    assert not parse_args(TrainConfig, []).tune
    mine = dataclasses.asdict(preset)
    assert recipe_differences(mine, {**mine, "tune": False}) == []  # a sibling tuned by hand is the same recipe
    assert untunable_reason(mine) == ""
    assert "--settings-from" in untunable_reason({**mine, "holdout": "refit"})
    assert "keeps no tune split" in untunable_reason({**mine, "holdout": "random"})
    assert "--specialists" in untunable_reason({**mine, "kinds": "stained"})
    assert "three-class" in untunable_reason({**mine, "num_classes": 2})
    assert "three-class" in untunable_reason(dataclasses.asdict(parse_args(TrainConfig, ["--holdout", "protocol"])))


# A run of this recipe before the dropped trials' options were removed: each of them recorded, at its "off" value.
OLD_OPTIONS_OFF = {"border": "all", "fine_head": 0, "crop_pool": 1, "nucleus_crops": 0.0, "weight_average": 0.0,
                   "crash_at_epoch": -1}


def test_removed_options_at_their_off_values_change_no_recipe_and_on_they_are_named():
    import dataclasses

    from pipeline.config import REMOVED_OPTIONS, recipe_differences, removed_options_used

    current = dataclasses.asdict(parse_args(TrainConfig, ["--preset", "dsb2018"]))
    old = {**current, **OLD_OPTIONS_OFF}
    assert set(OLD_OPTIONS_OFF) == set(REMOVED_OPTIONS) and not set(REMOVED_OPTIONS) & set(current)
    assert recipe_differences(old, current) == [] == recipe_differences(current, old)
    assert recipe_differences({**old, "crash_at_epoch": 2}, current) == []  # a test hook: never the recipe
    assert recipe_differences({**old, "border": "core"}, current) == ["border"]
    assert TrainConfig.from_json(json.dumps(old)) == TrainConfig(**current)
    assert removed_options_used(old) == removed_options_used({**old, "crash_at_epoch": 2}) == ""
    assert removed_options_used({**old, "fine_head": 64}) == \
        "trained with fine_head=64, an option this version no longer has"
    assert removed_options_used({**old, "weight_average": 0.999, "loss": "ce+dice+lovasz"}) == \
        "trained with weight_average=0.999, loss=ce+dice+lovasz, options this version no longer has"


def test_an_interrupted_run_with_a_removed_option_on_is_not_resumed(tmp_path):
    import dataclasses

    from pipeline.train.training import _saved_config

    config = {**dataclasses.asdict(TrainConfig(output=str(tmp_path))), **OLD_OPTIONS_OFF}
    (tmp_path / "ray_run.json").write_text(json.dumps({"name": "train-x", "storage": str(tmp_path / "ray")}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _saved_config(str(tmp_path), TrainConfig()).resume
    assert _saved_config(str(tmp_path), TrainConfig(time_limit=5.0, epochs=99)) == dataclasses.replace(
        _saved_config(str(tmp_path), TrainConfig()), time_limit=5.0)  # a new budget; every other flag is ignored
    (tmp_path / "config.json").write_text(json.dumps({**config, "crop_pool": 3}))
    with pytest.raises(ValueError, match=r"config.json: trained with crop_pool=3, an option this version no longer "
                                         r"has; it cannot be resumed"):
        _saved_config(str(tmp_path), TrainConfig())


def test_a_data_file_given_by_two_paths_is_the_same_recipe(tmp_path, monkeypatch):
    from pipeline.config import recipe_differences

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.zip").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    same = recipe_differences({"data": "data/train.zip"}, {"data": str(tmp_path / "data" / "train.zip")})
    other = recipe_differences({"data": "data/train.zip"}, {"data": "data/other.zip"})
    assert same == [] and other == ["data"]
    assert recipe_differences({"data": "s3://a/train.zip"}, {"data": "s3://b/train.zip"}) == ["data"]


def test_verbose_is_a_flag_of_every_job_and_turns_the_libraries_logs_on(monkeypatch):
    from pipeline.config import SegmentConfig, TrainConfig, TuneConfig, parse_args

    for name in ("NUCLEI_VERBOSE", "NUCLEI_RAY_LOGS"):
        monkeypatch.delenv(name, raising=False)
    quiet = parse_args(SegmentConfig, ["--input", "x"])
    assert isinstance(quiet, SegmentConfig) and "NUCLEI_VERBOSE" not in os.environ
    assert isinstance(parse_args(TuneConfig, ["--model", "m"]), TuneConfig)
    assert isinstance(parse_args(TrainConfig, ["--verbose"]), TrainConfig)
    assert os.environ["NUCLEI_VERBOSE"] == os.environ["NUCLEI_RAY_LOGS"] == "1"
