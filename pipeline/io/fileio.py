"""Filesystem helpers: local paths and pyarrow URIs (s3://...), safe joins, atomic writes."""
from __future__ import annotations

import functools
import os
import posixpath
import tempfile
from pathlib import PurePosixPath

import pyarrow.fs as pafs


class UnsafePathError(ValueError):
    """A path from untrusted input (archive member, image id) that would escape its folder."""


def is_uri(location: str) -> bool:
    """True for 'scheme://...' locations that pyarrow's filesystems handle (s3://, gs://, ...)."""
    return "://" in str(location) and not str(location).startswith("file://")


@functools.lru_cache(maxsize=32)
def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI; cached per process."""
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def check_relative(path: str) -> str:
    """Return a normalised relative POSIX path, or raise UnsafePathError if it could escape a folder."""
    if not path or "\x00" in path:
        raise UnsafePathError(f"unsafe path {path!r}: empty or contains NUL")
    text = path.replace("\\", "/")
    pure = PurePosixPath(text)
    if pure.is_absolute() or (len(text) > 1 and text[1] == ":"):
        raise UnsafePathError(f"unsafe path {path!r}: absolute")
    if any(part == ".." for part in pure.parts):
        raise UnsafePathError(f"unsafe path {path!r}: contains '..'")
    parts = [part for part in pure.parts if part not in ("", ".")]
    if not parts:
        raise UnsafePathError(f"unsafe path {path!r}: names no file")
    return "/".join(parts)


def safe_join(root: str, relative: str) -> str:
    """Join an untrusted relative path under root; the result is guaranteed to stay inside root."""
    relative = check_relative(relative)
    if is_uri(root):  # keep a query (?endpoint_override=...) at the end, where pyarrow reads it
        base, _, query = root.partition("?")
        return posixpath.join(base.rstrip("/"), relative) + (f"?{query}" if query else "")
    root_abs = os.path.realpath(root)
    joined = os.path.realpath(os.path.join(root_abs, relative))
    if os.path.commonpath([root_abs, joined]) != root_abs:
        raise UnsafePathError(f"unsafe path {relative!r}: resolves outside {root}")
    return joined


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_bytes_atomic(location: str, data: bytes) -> None:
    """Write a file so that readers see either nothing or the whole file, never half of it."""
    if is_uri(location):  # object stores publish an object only once it is complete
        fs, path = resolve(location)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    directory = os.path.dirname(os.path.abspath(location))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".partial-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished files get the usual permissions
        os.replace(temporary, location)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def remove_partials(folder: str, older_than: float) -> int:
    """Delete the temporary files write_bytes_atomic leaves behind when its process is killed mid-write (local
    folders; only files last written before `older_than`, so a live writer's are left alone); returns how many."""
    removed = 0
    if is_uri(folder) or not os.path.isdir(folder):
        return 0
    for directory, _, names in os.walk(folder):
        for name in names:
            if name.startswith(".partial-") and name.endswith(".tmp"):
                path = os.path.join(directory, name)
                try:
                    if os.path.getmtime(path) < older_than:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:  # its writer finished (or cleaned up) meanwhile
                    pass
    return removed


def write_text_atomic(location: str, text: str) -> None:
    """Text version of write_bytes_atomic (UTF-8)."""
    write_bytes_atomic(location, text.encode("utf-8"))


def exists(location: str) -> bool:
    """True when a file exists at a local path or URI."""
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str) -> bytes:
    """Whole file at a local path or URI."""
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()
