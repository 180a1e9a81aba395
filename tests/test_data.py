"""The Ray Data pipeline: shapes, ranges, reproducible split, lenient rows for bad files."""

import numpy as np

import pytest

from pipeline.data.datasets import extra_training_refs, inference_dataset, split_refs, training_dataset, training_refs
from pipeline.io.images import BadImageError
from pipeline.io.sources import list_images


def test_split_is_seeded_and_disjoint():
    refs = training_refs("synthetic", 50, 0)
    train_a, val_a = split_refs(refs, 0.2, 7)
    train_b, val_b = split_refs(list(reversed(refs)), 0.2, 7)
    assert [r.image_id for r in val_a] == [r.image_id for r in val_b] and len(val_a) == 10
    assert not {r.image_id for r in train_a} & {r.image_id for r in val_a}
    assert [r.image_id for r in split_refs(refs, 0.2, 8)[1]] != [r.image_id for r in val_a]


def test_extra_training_data_is_listed_once_and_never_under_a_taken_id(synthetic_folder):
    """--extra-data: each source's images with masks; an id the main data has, or a second copy, is refused."""
    refs = extra_training_refs(synthetic_folder, {"synthetic-0-00000"})
    assert len(refs) == 12 and all(ref.has_masks for ref in refs)
    with pytest.raises(BadImageError, match="already in the training data"):
        extra_training_refs(f"{synthetic_folder},{synthetic_folder}", set())
    with pytest.raises(BadImageError, match="already in the training data"):
        extra_training_refs(synthetic_folder, {refs[3].image_id})


def test_training_rows_have_model_shapes(ray_session, synthetic_folder):
    refs = training_refs(synthetic_folder, 0, 0)
    dataset = training_dataset(refs, 128, 10**8, 2)
    batch = dataset.take_batch(12, batch_format="numpy")
    assert batch["image"].shape == (12, 128, 128, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["mask"].shape == (12, 128, 128, 1) and set(np.unique(batch["mask"])) == {0, 1}


def test_three_class_targets(ray_session):
    dataset = training_dataset(training_refs("synthetic", 4, 0), 128, 10**8, 3)
    assert set(np.unique(dataset.take_batch(4)["mask"])) == {0, 1, 2}


def test_inference_rows_keep_bad_files_with_reasons(ray_session, synthetic_folder, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(synthetic_folder, folder)
    (folder / "empty.png").write_bytes(b"")
    (folder / "page.png").write_text("<html>oops</html>")
    refs = list_images(str(folder)).refs
    rows = {row["image_id"]: row for row in inference_dataset(refs, 64, 10**8).iter_rows()}
    assert len(rows) == 14
    assert not rows["empty"]["ok"] and "empty file" in rows["empty"]["error"]
    assert not rows["page"]["ok"] and "not a decodable image" in rows["page"]["error"]
    good = rows["synthetic-5-00000"]
    assert good["ok"] and good["image"].shape == (64, 64, 3) and good["height"] in (256, 360, 520)


def test_real_images_through_the_pipeline(ray_session, real_zip):
    refs = training_refs(real_zip, 0, 0)[:40]
    batch = training_dataset(refs, 128, 10**8, 2).take_batch(40)
    assert batch["image"].shape == (40, 128, 128, 3) and batch["mask"].max() == 1


def test_native_mode_cuts_seeded_crops_at_full_resolution(ray_session, synthetic_folder):
    refs = training_refs(synthetic_folder, 0, 0)[:4]
    options = dict(mode="native", appearance="standardised", crops_per_image=5, augment=True, seed=1)
    batch = training_dataset(refs, 96, 10**8, 3, **options).take_batch(100)
    again = training_dataset(refs, 96, 10**8, 3, **options).take_batch(100)
    assert batch["image"].shape == (20, 96, 96, 3) and batch["mask"].shape == (20, 96, 96, 1)
    assert sorted(batch["image_id"]) == sorted(np.repeat([r.image_id for r in refs], 5))
    assert set(np.unique(batch["mask"])) == {0, 1, 2}
    order = np.argsort(batch["image_id"], kind="stable"), np.argsort(again["image_id"], kind="stable")
    np.testing.assert_array_equal(batch["image"][order[0]], again["image"][order[1]])


def test_native_mode_inference_rows_keep_each_image_size(ray_session, synthetic_folder):
    refs = list_images(synthetic_folder).refs
    rows = list(inference_dataset(refs, 128, 10**8, mode="native", appearance="standardised").iter_rows())
    assert len(rows) == 12
    for row in rows:
        assert row["ok"] and row["image"].shape == (row["height"], row["width"], 3)


def test_inference_rows_classify_kinds_only_when_asked(synthetic_folder):
    from pipeline.data.datasets import preprocess_inference
    from pipeline.io.images import normalise, resize_image
    from pipeline.data.protocol import image_kind
    from pipeline.io.sources import load_sample

    refs = list_images(synthetic_folder).refs[:6]
    batch = refs_dataset_batch(refs)
    with_kinds = preprocess_inference(batch, 64, 10**8, kinds=True)
    without = preprocess_inference(batch, 64, 10**8, kinds=False)
    images = [load_sample(ref, with_masks=False).image for ref in refs]
    assert list(with_kinds["image_kind"]) == [image_kind(image) for image in images]
    assert "" not in set(with_kinds["image_kind"]) and set(without["image_kind"]) == {""}
    np.testing.assert_array_equal(without["image"], with_kinds["image"])
    np.testing.assert_array_equal(without["image"][0], normalise(resize_image(images[0], 64)))


def refs_dataset_batch(refs) -> dict:
    """The numpy columns a block of the refs dataset hands to preprocess_inference."""
    from pipeline.data.refs_source import ref_rows

    return {name: column.to_numpy(zero_copy_only=False) for name, column in
            zip(ref_rows(refs)[0].column_names, ref_rows(refs)[0].columns)}


def test_refs_dataset_keeps_every_ref_across_the_requested_blocks(ray_session):
    from pipeline.data.datasets import refs_dataset
    from pipeline.data.refs_source import RefsDatasource
    from pipeline.io.sources import SampleRef

    refs = [SampleRef(f"id-{i}", "zip", "a.zip", f"id-{i}/images/id-{i}.png", (f"id-{i}/masks/m.png",), True, i)
            for i in range(23)]
    dataset = refs_dataset(refs, blocks=5)
    assert dataset.materialize().num_blocks() == 5
    rows = sorted(dataset.take_all(), key=lambda row: row["index"])
    assert [SampleRef.from_row(row) for row in rows] == refs
    assert refs_dataset([], blocks=3).count() == 0
    # Shards as ray.data.from_items splits: the first ones hold one more (training workers get the same rows).
    assert [task.metadata.num_rows for task in RefsDatasource(refs).get_read_tasks(5)] == [5, 5, 5, 4, 4]


def test_rare_kinds_get_their_own_number_of_crops(synthetic_folder):
    from pipeline.data.datasets import preprocess_training
    from pipeline.data.protocol import image_kind
    from pipeline.io.sources import load_sample

    refs = training_refs(synthetic_folder, 0, 0)
    kinds = {ref.image_id: image_kind(load_sample(ref, with_masks=False).image) for ref in refs}
    assert set(kinds.values()) == {"fluorescence", "stained", "bright-field"}
    batch = {name: np.asarray([ref.to_row()[name] for ref in refs], dtype=object) for name in refs[0].to_row()}
    rows = preprocess_training(batch, 64, 10**8, 3, mode="native", crops_per_image=2, crops_per_rare_image=5)
    ids, counts = np.unique(rows["image_id"], return_counts=True)
    assert {image_id: int(count) for image_id, count in zip(ids, counts)} == \
        {image_id: 2 if kind == "fluorescence" else 5 for image_id, kind in kinds.items()}


def test_size_normalised_training_crops_zoom_each_image_towards_the_target_nucleus_area(synthetic_folder):
    from scipy import ndimage

    from pipeline.data.augment import random_crops, true_median_area
    from pipeline.data.datasets import preprocess_training
    from pipeline.io.sources import load_sample

    yy, xx = np.mgrid[:32, :32]
    disc = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 36).astype(np.int32)
    crop, labels = random_crops(np.zeros((32, 32, 3), np.uint8), disc, 64, 1, np.random.default_rng(0), False, zoom=2)[0]
    assert crop.shape == (64, 64, 3) and abs(int((labels > 0).sum()) - 4 * int(disc.sum())) < 0.1 * 4 * disc.sum()
    assert true_median_area(disc) == disc.sum() and true_median_area(np.zeros((4, 4), np.int32)) == 0.0

    refs = training_refs(synthetic_folder, 0, 0)[:3]
    batch = {name: np.asarray([ref.to_row()[name] for ref in refs], dtype=object) for name in refs[0].to_row()}
    native = max(true_median_area(load_sample(ref, with_masks=True).labels) for ref in refs)

    def median_crop_nucleus(nucleus_area):  # median pixels of the nuclei (connected) in the crops
        rows = preprocess_training(batch, 64, 10**8, 3, mode="native", crops_per_image=6, nucleus_area=nucleus_area)
        areas = [np.bincount(component.ravel())[1:] for component in
                 (ndimage.label(mask[..., 0] == 1)[0] for mask in rows["mask"])]
        return np.median(np.concatenate(areas))

    assert median_crop_nucleus(4 * native) > 2 * median_crop_nucleus(0)  # every image zoomed 2x


def test_a_job_joins_a_cluster_only_where_ray_init_would(monkeypatch, tmp_path):
    """ensure_ray sends the environment with the job (a runtime_env) only to a cluster it joins: RAY_ADDRESS, or the
    address `ray start` leaves in Ray's folder; otherwise it starts a Ray of its own, whose workers inherit it."""
    from pipeline.data.datasets import _joins_a_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert not _joins_a_cluster(None)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379")
    assert _joins_a_cluster(None)
    assert not _joins_a_cluster(2)  # tests: a Ray of the process's own
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert _joins_a_cluster(2)


def test_a_relative_encoder_weights_path_is_made_absolute_before_ray_starts(ray_session, monkeypatch, tmp_path):
    """$NUCLEI_BACKBONE_WEIGHTS as the README sets it (relative to where the job starts) is made absolute before Ray's
    workers, which run in folders of their own, read it: a training worker found no file and started from random
    weights."""
    import os

    from pipeline.data.datasets import ensure_ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NUCLEI_BACKBONE_WEIGHTS", "../shared/weights/mobilenet_v2")
    ensure_ray()
    assert os.environ["NUCLEI_BACKBONE_WEIGHTS"] == str(tmp_path.parent / "shared" / "weights" / "mobilenet_v2")
