"""Readers: Kaggle layout from folder and zip, image trees, strict errors, unsafe members, real data."""
import os
import zipfile

import cv2
import numpy as np
import pytest

from pipeline.data.datasets import training_refs
from pipeline.io.images import BadImageError
from pipeline.io.sources import list_images, list_kaggle, load_sample


def png(array):
    return cv2.imencode(".png", array)[1].tobytes()


def zip_folder(folder: str, path: str, extra: dict | None = None) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for directory, _, files in os.walk(folder):
            for name in files:
                full = os.path.join(directory, name)
                archive.write(full, os.path.relpath(full, folder))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


def test_folder_and_zip_give_the_same_samples(synthetic_folder, tmp_path):
    archive = zip_folder(synthetic_folder, str(tmp_path / "data.zip"))
    from_folder, from_zip = list_kaggle(synthetic_folder), list_kaggle(archive)
    assert [r.image_id for r in from_folder.refs] == [r.image_id for r in from_zip.refs]
    assert len(from_folder.refs) == 12 and not from_folder.problems
    a, b = load_sample(from_folder.refs[3]), load_sample(from_zip.refs[3])
    assert (a.image == b.image).all() and (a.labels == b.labels).all()
    assert a.mask.shape == a.image.shape[:2] and set(np.unique(a.mask)) <= {0, 1}
    assert a.nuclei == len(from_folder.refs[3].mask_paths) == len(np.unique(a.labels)) - 1


def test_unsafe_zip_members_are_refused(synthetic_folder, tmp_path):
    archive = zip_folder(synthetic_folder, str(tmp_path / "evil.zip"),
                         {"../escape.png": png(np.zeros((4, 4), np.uint8)),
                          "/abs/images/abs.png": png(np.zeros((4, 4), np.uint8))})
    listing = list_kaggle(archive)
    reasons = dict(listing.problems)
    assert "unsafe archive member" in reasons["../escape.png"]
    assert "unsafe archive member" in reasons["/abs/images/abs.png"]
    assert len(listing.refs) == 12
    with pytest.raises(BadImageError, match="escape.png: unsafe archive member"):
        training_refs(archive, 0, 0)  # strict mode: one line naming the file


def make_sample(root, image_id, image, masks):
    os.makedirs(os.path.join(root, image_id, "images"))
    with open(os.path.join(root, image_id, "images", image_id + ".png"), "wb") as stream:
        stream.write(image if isinstance(image, bytes) else png(image))
    if masks is not None:
        os.makedirs(os.path.join(root, image_id, "masks"))
        for k, mask in enumerate(masks):
            with open(os.path.join(root, image_id, "masks", f"m{k}.png"), "wb") as stream:
                stream.write(mask if isinstance(mask, bytes) else png(mask))


@pytest.mark.parametrize("case, match", [
    ("size", "mask is 5x5 but the image is 8x8"),
    ("missing", "no masks/ folder"),
    ("corrupt", "m0.png: mask is not a decodable image"),
    ("truncated", "not a decodable image"),
])
def test_strict_errors_name_the_file(tmp_path, case, match):
    good = np.zeros((8, 8), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 255
    if case == "size":
        make_sample(tmp_path, "a", good, [np.zeros((5, 5), np.uint8)])
    elif case == "missing":
        make_sample(tmp_path, "a", good, None)
    elif case == "corrupt":
        make_sample(tmp_path, "a", good, [b"not a png"])
    else:
        make_sample(tmp_path, "a", png(good)[:30], [mask])
    with pytest.raises(BadImageError, match=match):
        refs = training_refs(str(tmp_path), 0, 0)
        load_sample(refs[0])


def test_image_tree_ids_are_relative_paths(tmp_path):
    for sub in ("plate1", "plate2/deep"):
        os.makedirs(tmp_path / sub)
        (tmp_path / sub / "well.png").write_bytes(png(np.zeros((4, 4), np.uint8)))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "plate1" / "well.jpg").write_bytes(png(np.zeros((4, 4), np.uint8)))
    listing = list_images(str(tmp_path))
    assert sorted(r.image_id for r in listing.refs) == ["plate1/well", "plate2/deep/well"]
    reasons = dict(listing.problems)
    assert "not an image file" in reasons["notes.txt"]
    assert "duplicate image id" in reasons["plate1/well.png"] or "duplicate image id" in reasons["plate1/well.jpg"]


def test_kaggle_test_layout_gives_plain_ids_and_ignores_masks(synthetic_folder):
    listing = list_images(synthetic_folder)
    assert [r.image_id for r in listing.refs] == [r.image_id for r in list_kaggle(synthetic_folder).refs]
    assert not listing.problems


def test_symlinks_out_of_the_folder_are_refused(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(np.zeros((4, 4), np.uint8)))
    root = tmp_path / "in"
    root.mkdir()
    (root / "link.png").symlink_to(outside)
    (root / "loop.png").symlink_to(root / "loop.png")
    reasons = dict(list_images(str(root)).problems)
    assert reasons["link.png"] == "symlink points outside the input folder"
    assert reasons["loop.png"] == "broken or looping symlink"


def test_real_zip_reads_600_samples_with_their_masks(real_zip):
    listing = list_kaggle(real_zip)
    assert len(listing.refs) == 600 and not listing.problems
    for ref in listing.refs[::60]:
        sample = load_sample(ref)
        assert sample.mask.shape == sample.image.shape[:2]
        assert set(np.unique(sample.mask)) <= {0, 1}
        assert sample.nuclei == len(ref.mask_paths) == len(np.unique(sample.labels)) - 1


def test_a_forked_process_reads_the_zip_through_its_own_handle(synthetic_folder, tmp_path):
    from pipeline.io.sources import read_file

    archive = zip_folder(synthetic_folder, str(tmp_path / "data.zip"))
    refs = list_kaggle(archive).refs
    paths = [(ref, path) for ref in refs for path in (ref.image_path, *ref.mask_paths)]
    expected = [read_file(ref, path) for ref, path in paths]  # the parent has opened (and cached) the archive

    def read_all() -> bool:
        try:
            return all([read_file(ref, path) for ref, path in paths] == expected for _ in range(5))
        except zipfile.BadZipFile:
            return False

    child = os.fork()
    if child == 0:  # a shared file offset would interleave both processes' reads: CRC errors, wrong bytes
        os._exit(0 if read_all() else 1)
    parent_ok = read_all()
    assert parent_ok and os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
