"""What a sample is (SampleRef: where it lives; Sample: decoded) and where its bytes come from (folder, URI, zip).

Small, picklable refs travel to Ray tasks; bytes are read wherever a ref is loaded. No Ray or TensorFlow.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from pipeline.io import fileio
from pipeline.io.images import BadImageError, Decoded

MAX_MEMBER_BYTES = 1 << 30  # an archive member larger than this is refused (zip bombs)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives. `kind` is 'file' (folder or URI), 'zip' (archive member) or 'synthetic'."""

    image_id: str
    kind: str
    source: str  # folder, zip path/URI, or the synthetic seed as text
    image_path: str = ""  # path inside source (relative, POSIX)
    mask_paths: tuple[str, ...] = ()
    has_masks: bool = False
    index: int = 0  # synthetic sample number

    def to_row(self) -> dict:
        """A plain dict for Ray Data rows."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # not asdict: it deep-copies
        row["mask_paths"] = list(self.mask_paths)
        return row

    @classmethod
    def from_row(cls, row: dict) -> "SampleRef":
        values = {name: row[name] for name in (f.name for f in dataclasses.fields(cls))}
        values["mask_paths"] = tuple(values["mask_paths"])
        values["index"] = int(values["index"])
        values["has_masks"] = bool(values["has_masks"])
        return cls(**values)


@dataclass
class Listing:
    """What a source holds: usable refs, and every file that was left out with the reason."""

    refs: list[SampleRef] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass
class Sample:
    """A decoded sample at its original resolution."""

    image_id: str
    image: np.ndarray  # HxWx3 uint8 RGB
    mask: np.ndarray | None  # HxW uint8 in {0, 1}: union of the nuclei
    labels: np.ndarray | None  # HxW int32: 0 background, 1..N one label per nucleus
    nuclei: int  # number of mask files
    reading: Decoded | None = None  # what reading the file chose (channel, plane, intensity), for the manifest

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])



def open_zip(source: str) -> zipfile.ZipFile:
    """Open an archive once per process (its central directory is parsed once).

    Keyed by process id: a forked child must not share its parent's file offset (reads would interleave).
    """
    return _open_zip_in_process(source, os.getpid())


@functools.lru_cache(maxsize=8)
def _open_zip_in_process(source: str, pid: int) -> zipfile.ZipFile:
    if fileio.is_uri(source):
        fs, path = fileio.resolve(source)
        return zipfile.ZipFile(fs.open_input_file(path))
    if not os.path.isfile(source):
        raise FileNotFoundError(f"archive not found: {source}")
    return zipfile.ZipFile(source)


def _member_name(archive: zipfile.ZipFile, path: str) -> zipfile.ZipInfo:
    for candidate in (path, path.replace("/", "\\")):
        try:
            return archive.getinfo(candidate)
        except KeyError:
            continue
    raise BadImageError(f"archive member not found: {path}")


def read_file(ref: SampleRef, path: str) -> bytes:
    """Bytes of a file of a ref (its image or one of its masks), wherever the ref lives."""
    path = fileio.check_relative(path)
    if ref.kind == "zip":
        archive = open_zip(ref.source)
        info = _member_name(archive, path)
        if info.file_size > MAX_MEMBER_BYTES:
            raise BadImageError(f"archive member is {info.file_size:,} bytes, over {MAX_MEMBER_BYTES:,}")
        return archive.read(info)
    location = fileio.safe_join(ref.source, path)
    try:
        return fileio.read_bytes(location)
    except OSError as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise BadImageError(f"unreadable file: {reason}") from error
