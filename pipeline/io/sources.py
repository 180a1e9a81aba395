"""Readers for Kaggle's DSB2018 layout (folder or .zip, local or URI), plain image trees and synthetic data.

Listing happens once on the driver and yields small picklable SampleRefs plus a list of problems;
loading a ref (decode, merge masks) happens wherever the ref is sent: a loop, a Ray task, a test.
Pure Python: no Ray or TensorFlow import.
"""
from __future__ import annotations

import os
import posixpath

import numpy as np
import pyarrow.fs as pafs

from pipeline.io import fileio
from pipeline.io.blocks import ZarrWindows, is_zarr, local_window_path
from pipeline.io.images import IMAGE_EXTENSIONS, DEFAULT_MAX_PIXELS, BadImageError, Decoded, decode_mask, read_image
from pipeline.io.samples import Listing, Sample, SampleRef, open_zip, read_file
from pipeline.io.synthetic import render_sample
from pipeline.io.units import TIFF_SUFFIXES, pixel_size_from_tiff, pixel_size_from_zarr

SYNTHETIC = "synthetic"

ZARR_SUFFIX = ".zarr"  # a folder read as one image (Zarr / OME-Zarr store), on a local file system


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_input_name(name: str) -> bool:
    return _is_image_name(name) or name.lower().endswith(ZARR_SUFFIX)


OME_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.zarr")  # one suffix each: the image id drops it whole


def _strip_extension(path: str) -> str:
    for suffix in OME_SUFFIXES:
        if path.lower().endswith(suffix):
            return path[:-len(suffix)]
    root, _ = posixpath.splitext(path)
    return root


# ---------------------------------------------------------------- listing

def list_kaggle(source: str) -> Listing:
    """List a Kaggle-layout dataset (`<id>/images/<id>.png`, `<id>/masks/*.png`) in a folder or zip."""
    if source == SYNTHETIC or source.startswith(SYNTHETIC + ":"):
        raise ValueError("use pipeline.io.synthetic.synthetic_refs for synthetic data")
    paths, problems, kind = _list_files(source)
    groups: dict[str, dict[str, list[str]]] = {}
    for path in paths:
        parts = path.split("/")
        if len(parts) == 3 and parts[1] in ("images", "masks"):
            groups.setdefault(parts[0], {"images": [], "masks": []})[parts[1]].append(path)
        else:
            problems.append((path, "not in Kaggle layout <id>/images/<id>.png or <id>/masks/*.png"))
    listing = Listing(problems=problems)
    for image_id in sorted(groups):
        images = sorted(p for p in groups[image_id]["images"] if _is_image_name(p))
        masks = sorted(p for p in groups[image_id]["masks"] if _is_image_name(p))
        if not images:
            listing.problems.append((f"{image_id}/images", "no image file in the images/ folder"))
            continue
        preferred = [p for p in images if _strip_extension(posixpath.basename(p)) == image_id]
        image_path = (preferred or images)[0]
        for extra in images:
            if extra != image_path:
                listing.problems.append((extra, f"second image for id {image_id}; using {image_path}"))
        listing.refs.append(SampleRef(image_id=image_id, kind=kind, source=source, image_path=image_path,
                                      mask_paths=tuple(masks), has_masks=bool(masks)))
    return listing


def list_images(source: str) -> Listing:
    """List every image under a folder tree or zip (recursive), for inference.

    Ids are the path relative to the source without extension, so equal names in different
    subfolders stay distinct; Kaggle's `<id>/images/<id>.png` gets the plain id and its masks are
    labels, not inputs.
    """
    paths, problems, kind = _list_files(source)
    paths = _zarr_stores_collapsed(paths, problems)
    listing = Listing(problems=problems)
    seen: dict[str, str] = {}
    for path in sorted(paths):
        parts = path.split("/")
        if len(parts) >= 3 and parts[-2] == "masks":
            continue  # Kaggle labels beside their image
        if not _is_input_name(path):
            listing.problems.append((path, "not an image file (extension is not one of "
                                           + ", ".join(IMAGE_EXTENSIONS + (ZARR_SUFFIX,)) + ")"))
            continue
        if len(parts) >= 3 and parts[-2] == "images":
            image_id = parts[-3]
        else:
            image_id = _strip_extension(path)
        if image_id in seen:
            listing.problems.append((path, f"duplicate image id {image_id!r} (also {seen[image_id]})"))
            continue
        seen[image_id] = path
        listing.refs.append(SampleRef(image_id=image_id, kind=kind, source=source, image_path=path))
    return listing


def _zarr_stores_collapsed(paths: list[str], problems: list[tuple[str, str]]) -> list[str]:
    """Paths with the files inside a Zarr store (object storage, archives; a local walk lists the store itself)
    replaced by one problem per store: stores are read from local folders only."""
    kept, stores = [], set()
    for path in paths:
        parts = path.split("/")
        inside = next((index for index, part in enumerate(parts[:-1]) if part.lower().endswith(ZARR_SUFFIX)), None)
        if inside is None:
            kept.append(path)
        else:
            stores.add("/".join(parts[:inside + 1]))
    problems.extend((store, "a Zarr store in object storage or an archive: copy it to a local folder to read it")
                    for store in sorted(stores))
    return kept


def _list_files(source: str) -> tuple[list[str], list[tuple[str, str]], str]:
    """All file paths (relative, POSIX) in a folder or zip, the problems met, and the ref kind."""
    if str(source).split("?")[0].lower().endswith(".zip"):
        return (*_list_zip(source), "zip")
    if not fileio.is_uri(source):
        return (*_list_local(source), "file")
    fs, root = fileio.resolve(source)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"input folder not found: {source}")
    paths = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type == pafs.FileType.File:
            paths.append(posixpath.relpath(entry.path, root))
    return paths, [], "file"


def _list_local(source: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Walk a local folder without following symlinked folders; symlinks leading outside are refused."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"input folder not found: {source}")
    root = os.path.realpath(source)
    paths: list[str] = []
    problems: list[tuple[str, str]] = []
    for directory, subdirectories, files in os.walk(root, onerror=lambda error: problems.append(
            (os.path.relpath(error.filename or root, root), f"unreadable folder: {error.strerror}"))):
        for name in sorted(subdirectories):
            full = os.path.join(directory, name)
            if os.path.islink(full):
                problems.append((os.path.relpath(full, root).replace(os.sep, "/"), "symlinked folder not followed"))
            elif name.lower().endswith(ZARR_SUFFIX):  # a Zarr store is one image, not a tree of chunk files
                paths.append(os.path.relpath(full, root).replace(os.sep, "/"))
        subdirectories[:] = sorted(name for name in subdirectories if not name.lower().endswith(ZARR_SUFFIX))
        for name in sorted(files):
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not os.path.exists(target):
                    problems.append((relative, "broken or looping symlink"))
                    continue
                if os.path.commonpath([root, target]) != root:
                    problems.append((relative, "symlink points outside the input folder"))
                    continue
            paths.append(relative)
    return paths, problems


def _list_zip(source: str) -> tuple[list[str], list[tuple[str, str]]]:
    archive = open_zip(source)
    paths, problems = [], []
    for info in archive.infolist():
        if info.is_dir():
            continue
        try:
            name = fileio.check_relative(info.filename)
        except fileio.UnsafePathError as error:
            problems.append((info.filename, f"unsafe archive member: {error}"))
            continue
        paths.append(name)
    return paths, problems


def load_sample(ref: SampleRef, *, with_masks: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                channel: str = "") -> Sample:
    """Decode a ref: the RGB image and, when asked, the merged mask and instance labels. `channel`: the nuclear
    channel asked for (--nuclear-channel; pipeline.io.channels).

    Raises BadImageError naming what is wrong (the caller adds the file path).
    """
    if ref.kind == "synthetic":
        return render_sample(int(ref.source), ref.index, with_masks=with_masks)
    reading = (_read_zarr(ref, max_pixels, channel) if ref.image_path.lower().endswith(ZARR_SUFFIX)
               else read_image(read_file(ref, ref.image_path), max_pixels=max_pixels, channel=channel))
    image = reading.image
    if not with_masks:
        return Sample(ref.image_id, image, None, None, 0, reading)
    if not ref.mask_paths:
        raise BadImageError("no masks/ folder (or it holds no mask files)")
    labels = np.zeros(image.shape[:2], np.int32)
    for number, mask_path in enumerate(ref.mask_paths, start=1):
        try:
            nucleus = decode_mask(read_file(ref, mask_path))
        except BadImageError as error:
            raise BadImageError(f"{mask_path}: {error}") from None
        if nucleus.shape != labels.shape:
            raise BadImageError(f"{mask_path}: mask is {nucleus.shape[1]}x{nucleus.shape[0]} but the image is "
                                f"{labels.shape[1]}x{labels.shape[0]}")
        labels[nucleus] = number
    return Sample(ref.image_id, image, (labels > 0).astype(np.uint8), labels, len(ref.mask_paths), reading)


def _read_zarr(ref: SampleRef, max_pixels: int, channel: str = "") -> Decoded:
    """A Zarr store's whole image (pipeline.io.blocks.ZarrWindows), within the pixel limit."""
    if ref.kind != "file" or fileio.is_uri(ref.source):
        raise BadImageError("Zarr stores are read from local folders only")
    try:
        reader = ZarrWindows(fileio.safe_join(ref.source, ref.image_path), channel)
    except BadImageError:
        raise
    except (OSError, ValueError, KeyError) as error:
        raise BadImageError(f"unreadable Zarr store: {str(error).splitlines()[0] if str(error) else error!r}") from None
    if reader.height * reader.width > max_pixels:
        raise BadImageError(f"image is {reader.width}x{reader.height} = {reader.height * reader.width:,} pixels, over "
                            f"the limit of {max_pixels:,}")
    return reader.read_whole()


def describe(ref: SampleRef) -> str:
    """Human-readable location of a ref's image, for error messages."""
    if ref.kind == "synthetic":
        return f"synthetic sample {ref.index} (seed {ref.source})"
    if ref.kind == "zip":
        return f"{ref.source}!{ref.image_path}"
    return fileio.safe_join(ref.source, ref.image_path) if ref.image_path else ref.source


def pixel_size_of(ref: SampleRef, given: float = 0.0) -> tuple[float | None, str]:
    """(micrometres per pixel, its source) for an input: --pixel-size when given, else a TIFF's or OME-Zarr's own
    metadata."""
    if given > 0:
        return float(given), "--pixel-size"
    local = local_window_path(ref)
    if is_zarr(ref.image_path):
        return pixel_size_from_zarr(local) if local else (None, "")
    if ref.image_path.lower().endswith(TIFF_SUFFIXES):
        return pixel_size_from_tiff(local or read_file(ref, ref.image_path))  # a path: metadata only
    return None, ""
