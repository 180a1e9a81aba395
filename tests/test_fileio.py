"""Atomic writes and safe joins of untrusted paths."""
import os

import pytest

from pipeline.io.fileio import UnsafePathError, remove_partials, safe_join, write_bytes_atomic


def test_atomic_write_leaves_only_the_finished_file_with_usual_permissions(tmp_path):
    target = tmp_path / "deep" / "labels.png"
    write_bytes_atomic(str(target), b"payload")
    assert target.read_bytes() == b"payload"
    assert os.listdir(target.parent) == ["labels.png"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_killed_writers_temporary_files_are_removed_and_a_live_writers_kept(tmp_path):
    import time

    (tmp_path / "labels" / "sub").mkdir(parents=True)
    stale, live = tmp_path / "labels" / "sub" / ".partial-a1.tmp", tmp_path / "labels" / ".partial-b2.tmp"
    finished = tmp_path / "labels" / "image.png"
    for path in (stale, live, finished):
        path.write_bytes(b"data")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    os.utime(finished, (time.time() - 60, time.time() - 60))
    assert remove_partials(str(tmp_path), older_than=time.time() - 30) == 1
    assert not stale.exists() and live.exists() and finished.exists()
    assert remove_partials(str(tmp_path / "missing"), older_than=time.time()) == 0


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
