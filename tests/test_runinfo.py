"""run.json as a typed record (pipeline/model/runinfo.py): old files load, nothing is lost on a rewrite, broken ones are
refused in one line."""
import json
import os
import re

import pytest

from pipeline.model.registry import MODELS_DIR
from pipeline.model.runinfo import DEFAULT_TILE, FORMAT, Postprocess, RunInfo, RunInfoError

SHIPPED = os.path.join(MODELS_DIR, "dsb2018", "run.json")
# What tests/test_segment.py's native-mode model has beside it: a hand-written run.json of four keys, no format.
MINIMAL = {"image_size": 64, "num_classes": 3, "mode": "native", "appearance": "standardised"}


def _refused(values, where="runs/x/run.json") -> str:
    with pytest.raises(RunInfoError) as refused:
        RunInfo.from_dict(values, where)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{where}: ")
    return message


def test_the_shipped_models_run_json_round_trips_key_for_key():
    with open(SHIPPED, encoding="utf-8") as stream:
        text = stream.read()
    raw = json.loads(text)
    info = RunInfo.from_dict(raw, SHIPPED)
    assert info.to_dict() == raw and list(info.to_dict()) == list(raw)  # every key and value, in the file's order
    assert list(info.postprocess.to_dict()) == list(raw["postprocess"])
    assert json.dumps(info.to_dict(), indent=2) == text  # so a rewrite changes nothing
    # typed: the values readers use, without .get(key, default)
    assert (info.format, info.mode, info.appearance, info.image_size, info.num_classes) == \
        (FORMAT, "native", "colour", 128, 3)
    assert info.postprocess.thresholds == (0.7, 0.4, 30) and info.postprocess.tta is False
    assert info.postprocess.instance_filter["kind"] == "logistic" and info.postprocess.by_kind["bright-field"]
    assert info.config["preset"] == "dsb2018" and info.sha256["model.keras"]
    assert info.extra == {} and info.config["holdout"] == "refit"  # every key has its field; shipped as a refit
    assert re.fullmatch(r"runs/[\w-]+/model\.keras", info.packaged_from) and info.effective_tile == 1024


def test_a_minimal_old_run_json_loads_with_defaults_and_writes_back_as_it_was(tmp_path):
    from pipeline.config import SegmentConfig
    from pipeline.segment.postprocess import postprocess_settings, prediction_settings

    info = RunInfo.from_dict(MINIMAL)
    assert (info.image_size, info.num_classes, info.mode, info.appearance) == (64, 3, "native", "standardised")
    assert info.format == "" and info.postprocess.thresholds == (0.5, 0.5, 10) and info.postprocess.scales == [1.0]
    assert info.effective_tile == DEFAULT_TILE and info.sha256 == {} and info.config == {}
    assert info.to_dict() == MINIMAL  # no defaults written into it
    for config in (SegmentConfig(), SegmentConfig(threshold=0.6, tta=True)):
        assert postprocess_settings(config, info) == postprocess_settings(config, MINIMAL)
        assert prediction_settings(config, info) == prediction_settings(config, MINIMAL)
    assert RunInfo.of(None).to_dict() == {} and RunInfo.of(None).mode == "resize"  # no run.json at all
    # An old file of the tests' making (tests/test_tuning.py): format 1, a partial postprocess.
    partial = {"format": "nuclei-unet/1", "mode": "native", "num_classes": 3, "postprocess": {"threshold": 0.6},
               "config": {"holdout": "refit", "seed": 1}}
    assert RunInfo.from_dict(partial).to_dict() == partial


def test_unknown_keys_survive_a_read_and_a_write(tmp_path):
    path = str(tmp_path / "run.json")
    with open(SHIPPED, encoding="utf-8") as stream:
        values = json.load(stream)
    values["from_the_future"] = {"any": [1, 2]}
    values["postprocess"]["new_step"] = 0.5
    (tmp_path / "run.json").write_text(json.dumps(values))
    info = RunInfo.read(path)
    assert info.extra["from_the_future"] == {"any": [1, 2]} and info.postprocess.extra == {"new_step": 0.5}
    info.postprocess.threshold = 0.65  # a change, as jobs/tune.py makes
    info.write(path)
    written = json.loads((tmp_path / "run.json").read_text())
    assert written == {**values, "postprocess": {**values["postprocess"], "threshold": 0.65}}
    assert not [name for name in os.listdir(tmp_path) if name != "run.json"]  # atomic: no partial file left


def test_keys_set_after_reading_are_written_and_a_new_record_writes_what_training_writes():
    info = RunInfo.from_dict({"num_classes": 2, "postprocess": {"threshold": 0.5}})
    info.image_size, info.sha256 = 64, {"model.keras": "ab" * 32}  # as load_model and package_model do
    info.postprocess.specialists = {"stained": "specialist-stained.keras"}
    assert info.to_dict() == {"num_classes": 2, "postprocess": {"threshold": 0.5,
                                                                "specialists": {"stained": "specialist-stained.keras"}},
                              "image_size": 64, "sha256": {"model.keras": "ab" * 32}}
    new = RunInfo(format=FORMAT, image_size=128, num_classes=3, mode="native", appearance="colour",
                  postprocess=Postprocess(threshold=0.6, seed_threshold=0.5, min_size=30))
    written = new.to_dict()
    assert list(written) == list(RunInfo.WRITTEN)  # every key training writes, None ones too (tile of resize mode)
    assert written["postprocess"] == {"threshold": 0.6, "seed_threshold": 0.5, "min_size": 30}  # untuned: no tuned_on
    assert RunInfo.from_dict(written) == new


def test_a_broken_run_json_is_refused_in_one_line(tmp_path):
    assert _refused({"image_size": "abc"}) == "runs/x/run.json: image_size must be an integer or null, got 'abc'"
    assert "postprocess.min_size must be an integer" in _refused({"postprocess": {"min_size": "30px"}})
    assert "postprocess.tta must be true or false" in _refused({"postprocess": {"tta": "yes"}})
    assert "postprocess.scales must be a non-empty list of numbers" in _refused({"postprocess": {"scales": []}})
    assert "mode must be one of resize, native, got 'tiled'" in _refused({"mode": "tiled"})
    assert "sha256 must be a JSON object" in _refused({"sha256": "ab"})
    assert "format 'nuclei-unet/9' is not one this version reads" in _refused({**MINIMAL, "format": "nuclei-unet/9"})
    assert "appearance is missing" in _refused({"format": FORMAT, "image_size": 64, "num_classes": 3, "mode": "native"})
    assert "must be a JSON object" in _refused([1, 2])
    (tmp_path / "run.json").write_text('{"image_size": 64,')
    with pytest.raises(RunInfoError, match=r"run.json: not valid JSON \(.* at line 1 column \d+\)$"):
        RunInfo.read(str(tmp_path / "run.json"))
    # a value set in code that would not read back is refused before anything is written
    info = RunInfo.from_dict(MINIMAL)
    info.image_size = "64"
    with pytest.raises(RunInfoError, match="image_size must be an integer"):
        info.write(str(tmp_path / "new.json"))
    assert not (tmp_path / "new.json").exists()


def test_every_model_loader_checks_run_json_and_the_removed_options(tmp_path):
    from pipeline.model.registry import ModelFileError, read_model_info

    (tmp_path / "model.keras").write_bytes(b"not read: no sha256 recorded")
    model = str(tmp_path / "model.keras")
    (tmp_path / "run.json").write_text(json.dumps({**MINIMAL, "num_classes": "three"}))
    with pytest.raises(RunInfoError) as refused:
        read_model_info(model)
    assert str(refused.value) == f"{tmp_path / 'run.json'}: num_classes must be an integer or null, got 'three'"
    (tmp_path / "run.json").write_text(json.dumps({**MINIMAL, "fine_head": 64, "config": {"loss": "ce+dice"}}))
    with pytest.raises(ModelFileError, match="trained with fine_head=64, an option this version no longer has"):
        read_model_info(model)
    (tmp_path / "run.json").write_text(json.dumps({**MINIMAL, "fine_head": 0, "config": {"border": "core"}}))
    with pytest.raises(ModelFileError, match="border=core"):
        read_model_info(model)
    (tmp_path / "run.json").write_text(json.dumps({**MINIMAL, "fine_head": 0}))
    assert read_model_info(model).to_dict() == {**MINIMAL, "fine_head": 0}


def test_kept_weights_and_trained_options_read_the_run_as_before():
    info = RunInfo.from_dict({"mode": "native", "best_epoch": 40, "epochs_run": 40,
                              "config": {"keep": "best", "mode": "resize", "loss": "ce"}})
    assert info.kept_weights_config() == {"keep": "last", "mode": "resize", "loss": "ce"}
    assert info.trained_options() == {"keep": "best", "mode": "native", "loss": "ce"}  # the top level wins
    early = RunInfo.from_dict({"best_epoch": 37, "epochs_run": 40, "config": {"keep": "best"}})
    assert early.kept_weights_config() == {"keep": "best"}
