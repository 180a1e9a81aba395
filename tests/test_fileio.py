"""Atomic writes and safe joins of untrusted paths."""
import os

import pytest

from pipeline.fileio import UnsafePathError, safe_join, write_bytes_atomic


def test_atomic_write_leaves_only_the_finished_file_with_usual_permissions(tmp_path):
    target = tmp_path / "deep" / "labels.png"
    write_bytes_atomic(str(target), b"payload")
    assert target.read_bytes() == b"payload"
    assert os.listdir(target.parent) == ["labels.png"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("relative", ["../x.png", "/etc/passwd", "a/../../x", "", "C:/x.png"])
def test_paths_that_would_escape_are_refused(tmp_path, relative):
    with pytest.raises(UnsafePathError):
        safe_join(str(tmp_path), relative)


def test_symlinked_folder_pointing_out_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to("/etc")
    with pytest.raises(UnsafePathError):
        safe_join(str(tmp_path / "out"), "link/passwd")
    assert safe_join(str(tmp_path / "out"), "a/b.png").startswith(str(tmp_path / "out"))
