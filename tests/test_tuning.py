"""Inference choices made on the tune split: the false-positive filter, multi-scale prediction, split refusal."""
import os

import numpy as np
import pytest

from pipeline.labels.instance_filter import (FEATURES, apply_filter, fit_filter, instance_features, keep_probability,
                                        true_positive_targets)


def blobs(rng, count, radius, probability, shape=(96, 96)):
    """Labels of `count` discs and 3-class probabilities where each disc has P(interior) = `probability`."""
    labels = np.zeros(shape, np.int32)
    probabilities = np.zeros((*shape, 3), np.float32)
    probabilities[..., 0] = 1.0
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for index in range(count):
        cy, cx = rng.integers(radius + 1, shape[0] - radius - 1, 2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & (labels == 0)
        labels[disc] = labels.max() + 1
        probabilities[disc] = (1 - probability, probability, 0.0)
    return labels, probabilities


def test_filter_learns_to_drop_faint_specks_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    features, targets = [], []
    for _ in range(20):
        good, good_p = blobs(rng, 4, 8, 0.95)
        bad, bad_p = blobs(rng, 4, 3, 0.55)
        merged = np.where(bad > 0, bad + good.max(), good) * ((good == 0) | (bad == 0))
        merged_p = np.where((bad > 0)[..., None], bad_p, good_p)
        features.append(instance_features(merged, merged_p))
        targets.append((np.unique(merged)[1:] <= good.max()).astype(int))  # feature rows are in label order
    params = fit_filter(np.concatenate(features), np.concatenate(targets), cutoff=0.5)
    assert params["features"] == list(FEATURES) and len(params["coef"]) == len(FEATURES)
    good, good_p = blobs(rng, 3, 8, 0.95)
    assert np.array_equal(apply_filter(good, good_p, params), good)
    speck = good.copy()
    speck[2:6, 2:6] = 0
    speck_p = good_p.copy()
    speck[90:93, 90:93] = good.max() + 1
    speck_p[90:93, 90:93] = (0.45, 0.55, 0)
    kept = apply_filter(speck, speck_p, params)
    assert kept.max() == good.max() and not kept[90:93, 90:93].any()  # the speck is gone, numbering contiguous
    assert apply_filter(speck, speck_p, None) is speck  # no filter: unchanged
    assert keep_probability(instance_features(good, good_p), params).min() > 0.5


def test_true_positive_targets_follow_iou_over_a_half():
    truth = np.zeros((20, 20), np.int32)
    truth[2:8, 2:8] = 1
    predicted = np.zeros_like(truth)
    predicted[2:8, 2:7] = 1  # IoU 30/36
    predicted[12:14, 12:14] = 2  # nothing there
    assert list(true_positive_targets(truth, predicted)) == [1, 0]
    assert list(true_positive_targets(np.zeros_like(truth), predicted)) == [0, 0]


def test_scales_average_back_at_the_images_own_size():
    from pipeline.data.augment import predict_scales

    def forward(batch):  # a "model" that calls bright pixels nucleus: the same at any scale
        nucleus = batch[..., :1]
        return np.concatenate([1 - nucleus, nucleus * 0.8, nucleus * 0.2], axis=-1)

    image = np.zeros((70, 90, 3), np.float32)
    image[20:50, 30:60] = 1.0
    single = predict_scales(image, forward, (1.0,))
    several = predict_scales(image, forward, (0.8, 1.0, 1.25))
    assert single.shape == several.shape == (70, 90, 3)
    assert np.abs(several - single)[25:45, 35:55].max() < 1e-5  # inside the square, far from its edges
    assert np.allclose(several.sum(axis=-1), 1.0, atol=1e-5)


def test_size_normalisation_zooms_an_image_so_its_median_nucleus_has_the_target_area():
    from pipeline.data.augment import predict_scales, size_normalising_zoom

    assert size_normalising_zoom(50, 200) == pytest.approx(2.0)
    assert size_normalising_zoom(800, 200) == pytest.approx(0.5)
    assert size_normalising_zoom(5000, 200) == 0.5 and size_normalising_zoom(5, 200) == 2.0  # within 0.5x-2x
    assert size_normalising_zoom(0, 200) == 1.0 and size_normalising_zoom(100, 0) == 1.0  # nothing found / off
    assert size_normalising_zoom(100, 200, within=(50, 400)) == 1.0  # sizes the model knows: as they are
    assert size_normalising_zoom(25, 200, within=(50, 400)) == 2.0
    seen = []

    def forward(batch):  # bright pixels are nucleus; records the size of every view it is shown
        seen.append(batch.shape[1:3])
        nucleus = batch[..., :1]
        return np.concatenate([1 - nucleus, nucleus * 0.8, nucleus * 0.2], axis=-1)

    labels, _ = blobs(np.random.default_rng(3), 4, 4, 0.9)  # discs of ~49 pixels
    image = np.repeat((labels > 0).astype(np.float32)[..., None], 3, axis=2)
    zoomed = predict_scales(image, forward, (1.0,), size_normalisation={"nucleus_area": 200})
    assert seen == [(96, 96), (192, 192)]  # a first pass measures the nuclei, then the image is predicted at 2x
    assert zoomed.shape == (96, 96, 3) and (zoomed[labels > 0, 0] < 0.5).mean() > 0.9
    at_zoom, zoom, measured = predict_scales(image, forward, (1.0,), size_normalisation={"nucleus_area": 200},
                                             keep_zoom=True)
    assert zoom == 2.0 and at_zoom.shape == (192, 192, 3)  # for post-processing at the size the model knows
    assert measured is None  # the measurement's nuclei are of the first pass, not of these probabilities
    seen.clear()
    kept = predict_scales(image, forward, (1.0,), size_normalisation={"nucleus_area": 200, "within": (40, 60)})
    assert seen == [(96, 96)] and kept.shape == (96, 96, 3)  # in range: the measuring pass is the prediction
    from pipeline.data.augment import size_normalisation_for

    stored = {"nucleus_area": 200, "within": (40, 60), "by_kind": {"stained": {"nucleus_area": 400, "within": [100, 800]}}}
    assert size_normalisation_for(stored, "fluorescence") == {"nucleus_area": 200, "within": (40, 60)}
    seen.clear()  # a stained image's ~49-pixel nuclei are under the sizes of stained training images: zoomed to 400
    predict_scales(image, forward, (1.0,), size_normalisation=size_normalisation_for(stored, "stained"))
    assert seen == [(96, 96), (192, 192)]
    from pipeline.segment.postprocess import PostSettings, labels_at_zoom

    in_range = predict_scales(image, forward, (1.0,), keep_zoom=True, size_normalisation={
        "nucleus_area": 200, "within": (40, 60), "threshold": 0.5, "min_size": 10})
    settings = PostSettings(threshold=0.5, min_size=10)
    assert in_range.zoom == 1.0 and in_range.measured[0] == (0.5, None, 10)
    fresh = labels_at_zoom(in_range.probabilities, 96, 96, 1.0, None, settings)
    assert fresh.max() == labels.max()  # every disc
    assert np.array_equal(labels_at_zoom(in_range.probabilities, 96, 96, 1.0, None, settings, in_range.measured), fresh)
    stand_in = ((0.5, None, 10), np.zeros((96, 96), np.int32))  # the measurement's nuclei are used as they are...
    assert labels_at_zoom(in_range.probabilities, 96, 96, 1.0, None, settings, stand_in).max() == 0
    other = PostSettings(threshold=0.6, min_size=10)  # ...only when found with the same settings
    assert labels_at_zoom(in_range.probabilities, 96, 96, 1.0, None, other, stand_in).max() == labels.max()
    seen.clear()
    assert np.array_equal(predict_scales(image, forward, (1.0,)), forward(image[None])[0])  # off: one pass as is
    assert seen == [(96, 96), (96, 96)]


def test_test_split_is_refused_for_a_run_that_may_have_trained_on_it(synthetic_folder):
    from pipeline.train.evaluation import held_out_refs

    trained = {"data": synthetic_folder, "holdout": "random", "seed": 1, "val_fraction": 0.25}
    with pytest.raises(ValueError, match="--holdout protocol"):
        held_out_refs("test", synthetic_folder, trained)
    protocol = {**trained, "holdout": "protocol"}
    test, tune = held_out_refs("test", synthetic_folder, protocol), held_out_refs("tune", synthetic_folder, protocol)
    assert test and tune and not {r.image_id for r in test} & {r.image_id for r in tune}
    with pytest.raises(ValueError, match="--split tune or --split test"):
        held_out_refs("val", synthetic_folder, protocol)
    refit = {**trained, "holdout": "refit"}
    assert [r.image_id for r in held_out_refs("test", synthetic_folder, refit)] == [r.image_id for r in test]
    with pytest.raises(ValueError, match="on the tune split too"):
        held_out_refs("tune", synthetic_folder, refit)


def _run_json(folder, holdout, postprocess, **config):
    import json
    import os

    os.makedirs(folder, exist_ok=True)
    info = {"format": "nuclei-unet/1", "mode": "native", "num_classes": 3, "postprocess": postprocess,
            "config": {"holdout": holdout, "seed": 1, "output": str(folder), "loss": "ce+dice", **config}}
    (folder / "run.json").write_text(json.dumps(info))
    (folder / "model.keras").write_bytes(b"not read")
    return folder / "model.keras"


def test_the_size_range_is_the_training_images_nucleus_sizes_and_starts_higher_after_coarse_crops(
        tmp_path, synthetic_folder, monkeypatch):
    """Images inside the sizes a model trained on are left as they are; one trained with --low-resolution is zoomed
    up from the 10th percentile of its training images' median nucleus areas instead of the 2nd. A kind with a
    specialist gets the range of its own training images."""
    import numpy as np

    from pipeline.data.augment import true_median_area
    from pipeline.data.protocol import image_kind
    from pipeline.io.sources import load_sample
    from pipeline.model.registry import read_model_info
    from pipeline.train.size_range import size_range, store_size_range, trained_refs

    trained = {"data": synthetic_folder, "val_fraction": 0.25}
    plain = _run_json(tmp_path / "plain", "random", {"threshold": 0.6, "seed_threshold": 0.5, "min_size": 12}, **trained)
    coarse = _run_json(tmp_path / "coarse", "random", {"threshold": 0.6}, low_resolution=0.5, **trained)
    refs = trained_refs(read_model_info(str(plain)))
    areas = [true_median_area(load_sample(ref).labels) for ref in refs]
    assert len(set(areas)) > 5 and np.percentile(areas, 10) > np.percentile(areas, 2)
    stored = store_size_range(str(plain))
    assert stored["within"] == [round(float(np.percentile(areas, q)), 1) for q in (2, 98)]
    assert stored["nucleus_area"] == round(float(np.median(areas)), 1) and stored["min_size"] == 12
    assert read_model_info(str(plain)).postprocess.size_normalisation == stored  # written into run.json
    assert store_size_range(str(coarse))["within"] == [round(float(np.percentile(areas, q)), 1) for q in (10, 98)]
    measured_as_tuned = size_range(read_model_info(str(plain)), measure={"threshold": 0.4, "seed_threshold": 0.3,
                                                                         "min_size": 20})
    assert (measured_as_tuned["threshold"], measured_as_tuned["seed_threshold"], measured_as_tuned["min_size"]) == (
        0.4, 0.3, 20)  # the tune step measures nuclei with the settings it chose
    assert "by_kind" not in stored  # no specialist: one range
    kinds = [image_kind(load_sample(ref).image) for ref in refs]
    kind = max(set(kinds), key=kinds.count)
    own = [area for area, of in zip(areas, kinds) if of == kind]
    assert "by_kind" not in size_range(read_model_info(str(coarse)), kinds=(kind,))  # too few of its kind
    monkeypatch.setattr("pipeline.train.size_range.MIN_IMAGES_OF_KIND", len(own))
    by_kind = size_range(read_model_info(str(coarse)), kinds=(kind,))["by_kind"]
    assert by_kind == {kind: {"nucleus_area": round(float(np.median(own)), 1),  # a specialist's kind: its own sizes
                              "within": [round(float(np.percentile(own, q)), 1) for q in (2, 98)]}}


def test_a_refit_run_takes_its_protocol_siblings_tuned_settings(tmp_path):
    import hashlib
    import json

    from pipeline.train.specialists import copy_settings
    from pipeline.train.tuning import tune

    tuned = {"threshold": 0.7, "seed_threshold": 0.4, "min_size": 30, "tta": True, "scales": [1.0],
             "instance_filter": None, "tuned_on": "tune split of the evaluation protocol (90 images)"}
    sibling = _run_json(tmp_path / "sibling", "protocol", tuned)
    refit = _run_json(tmp_path / "refit", "refit", {"threshold": 0.6, "seed_threshold": 0.5, "min_size": 30},
                      colour_augment=False)  # an option newer than the sibling's run: its default matches
    with pytest.raises(ValueError, match="--settings-from"):
        tune(str(refit))  # tuning on images it trained on would flatter it
    recorded = json.loads((tmp_path / "sibling" / "run.json").read_text())
    recorded["sha256"] = {"model.keras": hashlib.sha256(b"not read").hexdigest()}
    (tmp_path / "sibling" / "run.json").write_text(json.dumps(recorded))
    settings = copy_settings(str(refit), str(sibling))
    assert settings["threshold"] == 0.7 and settings["tta"] is True and "same recipe" in settings["tuned_on"]
    assert f"sha256 {hashlib.sha256(b'not read').hexdigest()[:12]}" in settings["tuned_on"]  # the source, by content
    assert json.loads((tmp_path / "refit" / "run.json").read_text())["postprocess"] == settings
    # Fine-tunes of the two (--init-from) are the same recipe; a fine-tune of another start is not.
    sibling_tune = _run_json(tmp_path / "sibling_tune", "protocol", tuned, init_from=str(sibling), low_resolution=0.5)
    refit_tune = _run_json(tmp_path / "refit_tune", "refit", {"threshold": 0.6}, init_from=str(refit),
                           low_resolution=0.5)
    assert copy_settings(str(refit_tune), str(sibling_tune))["threshold"] == 0.7
    stranger = _run_json(tmp_path / "stranger", "protocol", tuned)
    (tmp_path / "stranger" / "model.keras").write_bytes(b"another start")
    sibling_tune = _run_json(tmp_path / "sibling_tune", "protocol", tuned, init_from=str(stranger), low_resolution=0.5)
    with pytest.raises(ValueError, match="init_from differ"):
        copy_settings(str(refit_tune), str(sibling_tune))
    untuned = _run_json(tmp_path / "untuned", "protocol", {"threshold": 0.6})
    with pytest.raises(ValueError, match="no tuned settings"):
        copy_settings(str(refit), str(untuned))
    other = _run_json(tmp_path / "other", "protocol", tuned, loss="ce")
    with pytest.raises(ValueError, match="loss differ"):
        copy_settings(str(refit), str(other))


def test_a_keep_best_run_whose_best_epoch_was_its_last_counts_as_keep_last(tmp_path):
    import json

    from pipeline.train.specialists import copy_settings

    tuned = {"threshold": 0.7, "seed_threshold": 0.4, "min_size": 30, "tuned_on": "tune split"}
    sibling = _run_json(tmp_path / "sibling", "protocol", tuned, keep="last")
    refit = _run_json(tmp_path / "refit", "refit", {"threshold": 0.6}, keep="best")
    info = json.loads((tmp_path / "refit" / "run.json").read_text())
    for best_epoch, transfers in ((37, False), (40, True)):  # early stopping's pick, or the last epoch's weights
        (tmp_path / "refit" / "run.json").write_text(json.dumps({**info, "epochs_run": 40, "best_epoch": best_epoch}))
        if transfers:
            assert copy_settings(str(refit), str(sibling))["threshold"] == 0.7
        else:
            with pytest.raises(ValueError, match="keep differ"):
                copy_settings(str(refit), str(sibling))


def test_a_refit_takes_its_own_specialist_only_if_it_was_fine_tuned_from_the_refit(tmp_path):
    import json

    from pipeline.train.specialists import copy_settings

    tuned = {"threshold": 0.7, "tuned_on": "tune split", "specialists": {"stained": "specialist-stained.keras"}}
    sibling = _run_json(tmp_path / "sibling", "protocol", tuned)
    (tmp_path / "sibling" / "specialist-stained.keras").write_bytes(b"the sibling's specialist")
    refit = _run_json(tmp_path / "refit", "refit", {"threshold": 0.6})
    own = _run_json(tmp_path / "own", "refit", {}, kinds="stained", init_from=str(refit))
    own.write_bytes(b"the refit's own specialist")
    wrong = {"protocol": _run_json(tmp_path / "p", "protocol", {}, kinds="stained", init_from=str(refit)),
             "not this refit model": _run_json(tmp_path / "s", "refit", {}, kinds="stained", init_from=str(sibling)),
             "not stained": _run_json(tmp_path / "k", "refit", {}, kinds="fluorescence", init_from=str(refit))}
    for why, path in wrong.items():
        with pytest.raises(ValueError, match=why):
            copy_settings(str(refit), str(sibling), {"stained": str(path)})
    with pytest.raises(ValueError, match="tuned without a bright-field specialist"):
        copy_settings(str(refit), str(sibling), {"bright-field": str(own)})
    attached = tmp_path / "refit" / "specialist-stained.keras"
    assert copy_settings(str(refit), str(sibling))["specialists"] == {"stained": "specialist-stained.keras"}
    assert attached.read_bytes() == b"the sibling's specialist"  # by default the sibling's comes along
    settings = copy_settings(str(refit), str(sibling), {"stained": str(own)})
    assert attached.read_bytes() == b"the refit's own specialist" and "own stained specialist" in settings["tuned_on"]
    info = json.loads((tmp_path / "refit" / "run.json").read_text())
    assert info["postprocess"]["threshold"] == 0.7 and info["sha256"]["specialist-stained.keras"]


def test_a_rare_kind_keeps_its_own_thresholds_only_where_they_win_out_of_sample():
    from pipeline.segment.postprocess import settings_for_kind
    from pipeline.train.choices import per_kind_settings

    combos = [(0.5, 0.5, 15), (0.7, 0.4, 30), (0.6, 0.6, 50)]
    kinds = ["fluorescence"] * 6 + ["stained"] * 4 + ["bright-field"] * 2
    per_image = np.zeros((len(kinds), len(combos)))
    per_image[:6] = (0.5, 0.7, 0.6)            # fluorescence: the global choice (index 1) is best
    per_image[6:10] = (0.2, 0.3, 0.45)         # stained: consistently better with its own values
    per_image[10:] = (0.9, 0.1, 0.1)           # bright-field: too few images to judge
    chosen, log = per_kind_settings(per_image, combos, kinds, global_index=1)
    assert chosen == {"stained": {"threshold": 0.6, "seed_threshold": 0.6, "min_size": 50}}
    assert log["stained"]["leave_one_out"] == pytest.approx(0.45) and log["stained"]["global"] == pytest.approx(0.3)
    assert "bright-field" not in log
    noisy = per_image.copy()
    noisy[6:10] = [(0.8, 0.3, 0.0), (0.0, 0.3, 0.7), (0.8, 0.3, 0.0), (0.0, 0.3, 0.7)]  # best differs per image
    chosen, log = per_kind_settings(noisy, combos, kinds, global_index=1)
    assert chosen == {} and not log["stained"]["kept"]  # in sample it would look better; out of sample it is not
    assert log["stained"]["in_sample"] > log["stained"]["global"]
    assert settings_for_kind(0.7, 0.4, 30, {"stained": {"threshold": 0.6, "seed_threshold": 0.6, "min_size": 50}},
                             "stained") == (0.6, 0.6, 50)
    assert settings_for_kind(0.7, 0.4, 30, {"stained": {"threshold": 0.6}}, "fluorescence") == (0.7, 0.4, 30)


def test_clump_splitting_is_kept_only_where_the_truth_has_the_merged_nuclei_apart():
    from pipeline.train.choices import choose_clump_split
    from tests.test_instances import clump_scene

    truth, merged = clump_scene()
    probabilities = np.zeros((*truth.shape, 3), np.float32)
    labels, entry, setting = choose_clump_split([truth], [merged], [probabilities], min_gain=0.002)
    assert entry["kept"] and setting == entry["chosen"] and labels[0].max() == 8
    assert entry["gain"] > 0.05 and entry["unsplit"] < max(entry["scores"].values())
    # Where the truth draws the figure of eight as one nucleus, splitting it only loses: left as it was.
    labels, entry, setting = choose_clump_split([merged], [merged], [probabilities], min_gain=0.002)
    assert not entry["kept"] and setting is None and labels[0] is merged and entry["best"]
    # Inference applies the stored setting between the watershed and the filter.
    import dataclasses

    from pipeline.segment.postprocess import PostSettings, labels_at_original_size

    probabilities[..., 0] = (merged == 0)
    probabilities[..., 1] = (merged > 0)
    plain = PostSettings(threshold=0.5, min_size=10, seed_threshold=0.5)
    whole = labels_at_original_size(probabilities, *merged.shape, plain)
    cut = labels_at_original_size(probabilities, *merged.shape, dataclasses.replace(
        plain, clump_split={"min_area_ratio": 1.5, "max_solidity": 0.95, "spacing": 1.2}))
    assert whole.max() == 7 and cut.max() == 8


def test_postprocess_gives_each_kind_of_image_its_own_thresholds(tmp_path):
    from pipeline.outputs.folder import read_labels
    from pipeline.segment.postprocess import PostSettings
    from pipeline.segment.run import Writing, finish_batch

    probabilities = np.zeros((2, 40, 40, 3), np.float16)
    probabilities[..., 0] = 1
    probabilities[:, 10:25, 10:25] = (0.4, 0.6, 0.0)  # one nucleus, P(interior) 0.6 for both images
    ids = ["grey", "pink"]
    batch = {"image_id": np.array(ids), "path": np.array([f"{i}/images/{i}.png" for i in ids]),
             "height": np.array([40, 40]), "width": np.array([40, 40]), "ok": np.array([True, True]),
             "error": np.array(["", ""], dtype=object), "kind": np.array(["file", "file"]),
             "source": np.array(["", ""]), "image_kind": np.array(["fluorescence", "stained"]),
             "probabilities": probabilities}
    settings = PostSettings(threshold=0.7, min_size=10, seed_threshold=0.7,
                            by_kind={"stained": {"threshold": 0.5, "seed_threshold": 0.5, "min_size": 10}})
    out = finish_batch(batch, str(tmp_path / "out"), settings, Writing(max_pixels=10**6))
    assert list(out["status"]) == ["done", "done"]
    assert list(out["nuclei"]) == [0, 1]  # the global 0.7 finds nothing; the stained image's own 0.5 finds it
    assert read_labels(str(tmp_path / "out" / out["labels"][1])).max() == 1


def _pixel_model(folder, sharpness: float):
    """A saved model whose logits follow each pixel's red channel: sharpness > 0 finds bright nuclei, 0 finds none."""
    import json

    from pipeline.model.network import save_for_inference
    from pipeline.model.tfkeras import keras

    inputs = keras.layers.Input((None, None, 3))
    layer = keras.layers.Conv2D(3, 1)
    model = keras.Model(inputs, layer(inputs))
    weights = np.zeros((1, 1, 3, 3), np.float32)
    weights[0, 0, 0] = (-sharpness, sharpness, 0.0)
    layer.set_weights([weights, np.array([sharpness / 2 + 1, -sharpness / 2, -10.0], np.float32)])
    folder.mkdir()
    save_for_inference(model, str(folder / "model.keras"))
    (folder / "run.json").write_text(json.dumps({"mode": "native", "num_classes": 3, "appearance": "colour",
                                                 "image_size": 128, "config": {"holdout": "protocol"}}))
    return str(folder / "model.keras")


def test_tuning_stores_its_settings_and_a_later_pass_never_loses_ground(tmp_path, synthetic_folder):
    import json

    from pipeline.train.tuning import tune

    model = _pixel_model(tmp_path / "run", 20.0)
    run_json = tmp_path / "run" / "run.json"
    info = json.loads(run_json.read_text())
    info["config"].update(data=synthetic_folder, seed=1, synthetic_count=12)
    run_json.write_text(json.dumps(info))

    log = tune(model, predictions=("plain",))
    stored = json.loads(run_json.read_text())["postprocess"]
    assert "kept_stored" not in log and 0.05 < stored["tune_score"] == log["settings"]["tune_score"] <= 1
    assert stored["threshold"] in (0.5, 0.6, 0.7, 0.8) and stored["tuned_on"].startswith("tune split")
    outlines = log["steps"]["outline_refiner"]  # judged out of fold; stored only when it gained
    assert set(outlines["out_of_fold_by_cutoff"]) == {0.4, 0.45, 0.5, 0.55, 0.6} and outlines["pixels"] > 0
    assert (stored["outline_refiner"] is not None) == outlines["kept"]
    # An earlier pass whose settings scored better on the same tune split keeps them ...
    better = {**stored, "threshold": 0.55, "tune_score": 1.0}
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "postprocess": better}))
    log = tune(model, predictions=("plain",))
    assert log["kept_stored"] == {"stored_tune_score": 1.0, "this_pass": log["settings"]["tune_score"]}
    assert json.loads(run_json.read_text())["postprocess"] == better
    # ... but a score recorded on other images (or with other specialists) measures something else.
    other = {**better, "tuned_on": "tune split of the evaluation protocol (500 images)"}
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "postprocess": other}))
    log = tune(model, predictions=("plain",))
    assert "kept_stored" not in log and json.loads(run_json.read_text())["postprocess"]["threshold"] != 0.55


def test_a_costlier_way_of_predicting_must_gain_min_gain_over_the_cheaper_kept_one():
    from pipeline.train.choices import worth_its_cost

    costs = {"plain": 1, "flips": 4, "flips+scales": 12.8}
    assert worth_its_cost({"plain": 0.6216, "flips": 0.6288, "flips+scales": 0.6323}, costs, 0.005) == "flips"
    assert worth_its_cost({"plain": 0.6216, "flips": 0.6250, "flips+scales": 0.6270}, costs, 0.005) == "flips+scales"
    assert worth_its_cost({"plain": 0.6216, "flips": 0.6250, "flips+scales": 0.6260}, costs, 0.005) == "plain"
    assert worth_its_cost({"flips": 0.5, "plain": 0.6}, costs, 0.005) == "plain"


def test_ways_of_predicting_over_the_cost_limit_are_neither_tried_nor_kept(tmp_path, synthetic_folder):
    import json

    from pipeline.train.choices import prediction_passes
    from pipeline.train.tuning import tune

    assert prediction_passes(False, (1.0,)) == 1 and prediction_passes(False, (1.0,), True) == 2
    assert prediction_passes(True, (0.8, 1.0, 1.25)) == pytest.approx(4 * (0.64 + 1 + 1.5625))
    model = _pixel_model(tmp_path / "run", 20.0)
    run_json = tmp_path / "run" / "run.json"
    info = json.loads(run_json.read_text())
    info["config"].update(data=synthetic_folder, seed=1, synthetic_count=12)
    run_json.write_text(json.dumps(info))
    log = tune(model)  # every way of predicting asked for, under the default cost limit (1.5 passes)
    assert list(log["steps"]["prediction"]["scores"]) == ["plain"] and not log["steps"]["size_normalisation"]["tried"]
    stored = json.loads(run_json.read_text())["postprocess"]
    assert stored["tta"] is False and stored["scales"] == [1.0]
    assert stored["size_normalisation"]["within"]  # only the training sizes' range: no second pass in range
    # Stored settings over the limit give way to this pass, even with a higher recorded tune score.
    costly = {**stored, "tta": True, "tune_score": 1.0}
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "postprocess": costly}))
    log = tune(model)
    assert "kept_stored" not in log and json.loads(run_json.read_text())["postprocess"]["tta"] is False


def test_each_nucleus_area_is_scored_on_what_inference_predicts_with_it(tmp_path, synthetic_folder):
    """The tune step measures each image's nuclei once for every size-normalisation target; its scores must be
    those of inference's own size normalisation (which measures them itself, image by image)."""
    import json

    from pipeline.data.augment import apply_appearance
    from pipeline.train.evaluation import held_out_refs
    from pipeline.io.images import normalise
    from pipeline.segment.predictor import Predictor
    from pipeline.io.sources import load_sample
    from pipeline.train.choices import instances_at, mean_score
    from pipeline.train.tuning import tune

    model = _pixel_model(tmp_path / "run", 20.0)
    run_json = tmp_path / "run" / "run.json"
    info = json.loads(run_json.read_text())
    info["config"].update(data=synthetic_folder, seed=1, synthetic_count=12)
    run_json.write_text(json.dumps(info))
    step = tune(model, predictions=("plain",), write=False, max_cost=0)["steps"]["size_normalisation"]
    samples = [load_sample(ref) for ref in held_out_refs("tune", synthetic_folder, info["config"])]
    measured_with = step["with"]
    scores = {}
    for area, entry in step["scores"].items():
        predictor = Predictor(model, batch_size=1, threads=2,
                              size_normalisation={**measured_with, "nucleus_area": float(area)} if float(area) else None)
        predicted = [predictor.predict_whole(normalise(apply_appearance(sample.image, "colour"))).astype(np.float16)
                     for sample in samples]
        scores[area] = mean_score([sample.labels for sample in samples],
                                  [instances_at(p, *measured_with.values()) for p in predicted])
        assert scores[area] == pytest.approx(entry["score"], abs=1e-9), area
    assert len(set(scores.values())) > 1  # the targets zoomed the images differently


def test_a_specialist_is_kept_only_where_it_beats_the_model_on_its_kind(tmp_path):
    from pipeline.segment.predictor import Predictor
    from pipeline.train.specialists import check_specialist, choose_specialists, parse_specialists

    rng = np.random.default_rng(3)
    truths = [blobs(rng, 4, 6, 1.0)[0] for _ in range(4)]
    inputs = [np.repeat((labels > 0)[..., None], 3, axis=2).astype(np.float32) for labels in truths]
    kinds = ["stained", "stained", "stained", "fluorescence"]
    finds, blind = _pixel_model(tmp_path / "finds", 20.0), _pixel_model(tmp_path / "blind", 0.0)

    def choose(model, candidates):
        predictor = Predictor(model, batch_size=1, threads=1, specialists=candidates)
        kept, log = choose_specialists(predictor, candidates, inputs, truths, kinds, min_gain=0.002)
        assert set(predictor.forwards) == set(kept)  # it goes on routing only the kinds kept
        return kept, log

    kept, log = choose(blind, {"stained": finds})
    assert kept == {"stained": os.path.abspath(finds)} and log["stained"]["images"] == 3
    assert log["stained"]["leave_one_out"]["specialist"] > 0.9 > log["stained"]["leave_one_out"]["model"]
    kept, log = choose(finds, {"stained": blind})
    assert kept == {} and log["stained"]["kept"] is False
    kept, log = choose(blind, {"bright-field": finds})
    assert kept == {} and "fewer than 3" in log["bright-field"]["why"]

    # Judged as inference will predict: with the run's stored flips and scales, not plain prediction.
    import itertools

    from pipeline.train.choices import MIN_SIZES, SEED_THRESHOLDS, THRESHOLDS, instances_at, leave_one_out_score
    from pipeline.labels.metric import image_score

    stored = {"tta": True, "scales": [1.0, 1.25]}
    predictor = Predictor(blind, batch_size=1, threads=1, specialists={"stained": finds})
    kept, log = choose_specialists(predictor, {"stained": finds}, inputs, truths, kinds, 0.002,
                                   info={"postprocess": stored})
    assert log["stained"]["prediction"] == "stored prediction: flips, scales 1, 1.25"
    assert predictor.tta is True and predictor.scales == (1.0, 1.25)
    as_inference = Predictor(blind, batch_size=1, threads=1, tta=True, scales=(1.0, 1.25),
                             specialists={"stained": finds})
    combos = list(itertools.product(THRESHOLDS, SEED_THRESHOLDS, MIN_SIZES))
    per_image = np.array([[image_score(truths[i], instances_at(as_inference.predict_whole(inputs[i], "stained"), *combo))
                           for combo in combos] for i in range(3)])
    assert log["stained"]["leave_one_out"]["specialist"] == pytest.approx(leave_one_out_score(per_image), abs=1e-12)
    assert choose(blind, {"stained": finds})[1]["stained"]["prediction"] == "plain"

    assert parse_specialists(" stained=a/model.keras ") == {"stained": "a/model.keras"}
    with pytest.raises(ValueError, match="KIND=MODEL"):
        parse_specialists("purple=a/model.keras")
    import json
    info = json.loads((tmp_path / "blind" / "run.json").read_text())
    check_specialist("stained", finds, info)
    (tmp_path / "finds" / "run.json").write_text(json.dumps({**info, "config": {"holdout": "refit"}}))
    with pytest.raises(ValueError, match="--holdout protocol"):
        check_specialist("stained", finds, info)


def test_cross_validation_leaves_objects_alone_when_its_targets_hold_one_class():
    """A weak model whose every object is false (no true nuclei here) gives the filter and the refiner nothing
    to tell apart: both keep the labels as they are instead of failing to fit."""
    from pipeline.train.choices import filter_cross_validation, refiner_cross_validation

    rng = np.random.default_rng(5)
    pairs = [blobs(rng, 3, 6, 0.9) for _ in range(5)]
    labels, probabilities = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    truths = [np.zeros_like(label) for label in labels]
    images = [np.repeat((label > 0)[..., None] * 200, 3, axis=2).astype(np.uint8) for label in labels]
    filtered = filter_cross_validation(truths, labels, probabilities)
    assert not filtered["all_targets"].any() and len(filtered["all_targets"]) == 15
    assert all(all(np.array_equal(a, b) for a, b in zip(kept, labels)) for kept in filtered["filtered"].values())
    refined = refiner_cross_validation(truths, labels, probabilities, images)
    assert len(refined["all_targets"]) > 0 and set(refined["by_cutoff"].values()) == {0.0}


def test_labels_made_at_the_zoom_come_back_at_the_images_size():
    import cv2

    from pipeline.segment.postprocess import PostSettings, labels_at_zoom

    labels, _ = blobs(np.random.default_rng(3), 4, 4, 0.9)
    zoomed = cv2.resize(labels.astype(np.int32), (labels.shape[1] * 2, labels.shape[0] * 2),
                        interpolation=cv2.INTER_NEAREST)
    nucleus = (zoomed > 0).astype(np.float32)[..., None]
    probabilities = np.concatenate([1 - nucleus, nucleus * 0.9, nucleus * 0.1], axis=-1)
    found = labels_at_zoom(probabilities, *labels.shape, 2.0, None,
                           PostSettings(threshold=0.5, min_size=10, seed_threshold=0.5))
    assert found.shape == labels.shape and found.max() == labels.max()
    assert sorted(np.unique(found)) == list(range(labels.max() + 1))  # 1..N, nothing lost in the way back
