"""Images too large to segment whole: cut into blocks, each segmented on its own, every nucleus kept once.

The blocks' cores tile the image exactly; each block is read with a margin around its core (its window) and
keeps only the nuclei whose centre lies in its core and that no cut edge of the window truncates. With a margin
wider than a nucleus, each nucleus is then kept whole by exactly one block: none is cut at a seam or counted
twice. The image's label image is filled block by block in block order (`LabelCanvas`, memory-mapped on disk),
so memory is bounded by the block size, not the image size. Windows of TIFF / OME-TIFF files (tifffile's Zarr
view) and of Zarr / OME-Zarr stores are read chunk by chunk without decoding the whole image; other formats are
decoded whole once.
Pure numpy, SciPy, tifffile and zarr: no Ray or TensorFlow (pipeline.segment.blockwise runs the blocks on Ray).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from pipeline.io.channels import colour_choice, select_plane
from pipeline.io.images import channel_names, image_from_array, intensity_levels, uint8_levels
from pipeline.io import fileio
from pipeline.io.ome import ome_axes, ome_channel_names, ome_multiscales
from pipeline.io.samples import open_zip
from pipeline.io.units import TIFF_SUFFIXES

BLOCK_MARGIN = 128  # pixels read around each block's core: wider than the largest nucleus the model outlines
ALIGN = 32  # the encoder's total stride
SAMPLE_GRID, SAMPLE_SIDE = 4, 256  # the whole-image sample: 4 x 4 windows of 256 pixels spread over the image
ZARR_SUFFIX = ".zarr"


@dataclass(frozen=True)
class Block:
    """One block: `window` (top, bottom, left, right) is read and segmented; `core` is the part it answers for."""

    index: int
    window: tuple[int, int, int, int]
    core: tuple[int, int, int, int]


def is_large(height: int, width: int, block_size: int) -> bool:
    """Whether an image is segmented block by block: more pixels than four blocks (block_size 0: never)."""
    return block_size > 0 and height * width > 4 * block_size * block_size


def plan_blocks(height: int, width: int, block_size: int, margin: int = BLOCK_MARGIN) -> list[Block]:
    """Blocks whose cores (at most block_size square, as equal as possible) tile the image, in row-major order."""
    rows, cols = max(1, math.ceil(height / block_size)), max(1, math.ceil(width / block_size))
    ys = np.linspace(0, height, rows + 1).round().astype(int)
    xs = np.linspace(0, width, cols + 1).round().astype(int)
    blocks = []
    for row in range(rows):
        for col in range(cols):
            core = (int(ys[row]), int(ys[row + 1]), int(xs[col]), int(xs[col + 1]))
            # Windows start on the model's stride grid (multiples of ALIGN), as whole-image tiles do: the encoder
            # samples every window on the same grid, so a nucleus comes out as it would in the whole image.
            top, left = max(0, core[0] - margin) // ALIGN * ALIGN, max(0, core[2] - margin) // ALIGN * ALIGN
            window = (top, min(height, core[1] + margin), left, min(width, core[3] + margin))
            blocks.append(Block(len(blocks), window, core))
    return blocks


def keep_core_nuclei(labels: np.ndarray, block: Block, height: int, width: int) -> np.ndarray:
    """The nuclei of a block's labels that the block answers for, numbered 1..n (uint32, window-sized).

    Kept: centre (centroid, in pixel-centre coordinates) inside the core, and not touching a window edge that is
    a cut through the image (an edge of the image itself is no cut)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    top, bottom, left, right = block.window
    core_top, core_bottom, core_left, core_right = block.core
    boxes = ndimage.find_objects(labels)
    kept = np.zeros(len(boxes) + 1, np.uint32)
    present = [index for index, box in enumerate(boxes, start=1) if box is not None]
    if not present:
        return np.zeros(labels.shape, np.uint32)
    centres = np.asarray(ndimage.center_of_mass(np.ones(labels.shape, np.uint8), labels, present), np.float64)
    count = 0
    for index, (y, x) in zip(present, centres):
        rows, cols = boxes[index - 1]
        cut = ((rows.start == 0 and top > 0) or (rows.stop == labels.shape[0] and bottom < height)
               or (cols.start == 0 and left > 0) or (cols.stop == labels.shape[1] and right < width))
        inside = (core_top - 0.5 <= top + y < core_bottom - 0.5) and (core_left - 0.5 <= left + x < core_right - 0.5)
        if inside and not cut:
            count += 1
            kept[index] = count
    return kept[labels]


def shift_measurements(rows: dict, offset: int, top: int, left: int, pixel_size_um: float | None) -> dict:
    """A block's measurement rows (pipeline.outputs.measure) in the whole image: labels after `offset`, positions moved
    by the window's corner."""
    rows = {name: np.asarray(values).copy() for name, values in rows.items()}
    rows["label"] += offset
    for name in ("centroid_x", "bbox_x0", "bbox_x1"):
        rows[name] += left
    for name in ("centroid_y", "bbox_y0", "bbox_y1"):
        rows[name] += top
    size = float(pixel_size_um) if pixel_size_um else np.nan
    rows["centroid_x_um"] = rows["centroid_x"] * size
    rows["centroid_y_um"] = rows["centroid_y"] * size
    return rows


class LabelCanvas:
    """The whole image's labels in a file on disk, filled block by block; a pixel two blocks' nuclei both claim
    stays with the first. The file is mapped only while a block is pasted or a band of it written, so the
    driver's memory follows the block, not the image."""

    TILE = 512  # the label TIFF's tiles

    def __init__(self, path: str, height: int, width: int):
        self.path, self.shape = path, (height, width)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint32, shape=self.shape).flush()
        self.nuclei = 0
        self.covered = 0

    @property
    def array(self) -> np.ndarray:
        """The labels so far, mapped read-only."""
        return np.load(self.path, mmap_mode="r")

    def paste(self, kept: np.ndarray, block: Block) -> int:
        """Add a block's kept nuclei (keep_core_nuclei) after those pasted so far; returns their label offset."""
        top, bottom, left, right = block.window
        array = np.load(self.path, mmap_mode="r+")
        region = array[top:bottom, left:right]
        mask = (kept > 0) & (region == 0)
        offset = self.nuclei
        region[mask] = kept[mask].astype(np.uint32) + offset
        array.flush()
        del region, array  # unmapped: the pages go back to the page cache
        self.nuclei += int(kept.max(initial=0))
        self.covered += int(np.count_nonzero(mask))
        return offset

    def summary(self) -> dict:
        """The manifest's per-image summary (as pipeline.outputs.measure.image_summary), without reading the labels back."""
        return {"nuclei": self.nuclei, "mean_area": round(self.covered / self.nuclei, 2) if self.nuclei else 0.0,
                "covered_fraction": round(self.covered / max(1, self.shape[0] * self.shape[1]), 6)}

    def _tiles(self):
        """The labels tile by tile in row-major order (edge tiles padded with 0), one band of rows mapped at a time."""
        tile = self.TILE
        height, width = self.shape
        for top in range(0, height, tile):
            band = np.array(np.load(self.path, mmap_mode="r")[top:top + tile])  # a copy: the map is dropped here
            for left in range(0, width, tile):
                part = band[:, left:left + tile]
                if part.shape != (tile, tile):
                    part = np.pad(part, ((0, tile - part.shape[0]), (0, tile - part.shape[1])))
                yield np.ascontiguousarray(part)

    def write_tiff(self, path: str, pixel_size_um: float | None = None, ome: bool = False) -> None:
        """The labels as a tiled, compressed 32-bit (OME-)TIFF, written band by band from the file."""
        import tifffile

        metadata = {"axes": "YX"} if ome else None
        if ome and pixel_size_um:
            metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeXUnit="µm", PhysicalSizeY=pixel_size_um,
                            PhysicalSizeYUnit="µm")
        tifffile.imwrite(path, self._tiles(), shape=self.shape, dtype=np.uint32, tile=(self.TILE, self.TILE),
                         compression="zlib", bigtiff=self.shape[0] * self.shape[1] * 4 > 2 ** 31, ome=ome,
                         metadata=metadata)

    def close(self) -> None:
        """Remove the file."""
        if os.path.exists(self.path):
            os.unlink(self.path)


# ---------------------------------------------------------------- reading windows

class ArrayWindows:
    """Windows of an image already decoded whole (formats that cannot be read in parts)."""

    def __init__(self, image: np.ndarray):
        self.image = image
        self.height, self.width = image.shape[:2]

    def read(self, window: tuple[int, int, int, int]) -> np.ndarray:
        top, bottom, left, right = window
        return np.ascontiguousarray(self.image[top:bottom, left:right])


class _FileWindows:
    """What TIFF and Zarr windows share: the nuclear plane of each window (pipeline.io.channels), its values mapped to
    0-255 by levels and an RGB image's colour choice made once for the whole image, so that every block has the
    same look. Measured on a sample of windows at the first read that needs them, unless given (a block's task gets
    its image's)."""

    _array = None
    axes = ""
    names: tuple = ()  # the channel names its metadata gives

    def _setup(self, channel: str, levels: tuple[float, float] | None, colours: str | None) -> None:
        self.channel, self._levels, self._colours = channel, levels, colours

    @property
    def levels(self) -> tuple[float, float] | None:
        self._measure()
        return self._levels

    @property
    def colours(self) -> str:
        self._measure()
        return self._colours

    def _measure(self) -> None:
        needs_levels = self._levels is None  # 8-bit too: a dim grey one is stretched (uint8_levels)
        if self._colours is not None and not needs_levels:
            return
        parts = [select_plane(self._raw(window), self.axes, self.names, self.channel, "keep")[0]
                 for row in sample_windows(self.height, self.width) for window in row]
        if self._colours is None:
            self._colours = (colour_choice(np.concatenate([part.reshape(-1, 1, 3) for part in parts]))
                             if parts[0].ndim == 3 else "keep")
        if needs_levels:
            planes = [select_plane(part, "YXS" if part.ndim == 3 else "YX", colours=self._colours)[0] for part in parts]
            pixels = np.concatenate([plane.reshape(-1, plane.shape[2] if plane.ndim == 3 else 1) for plane in planes])
            self._levels = uint8_levels(pixels) if pixels.dtype == np.uint8 else intensity_levels(pixels)

    @property
    def notes(self):
        """What reading the image chose (pipeline.io.images.Decoded's notes), from a corner of it."""
        return self.read_decoded((0, min(self.height, 64), 0, min(self.width, 64)))

    def _raw(self, window: tuple[int, int, int, int]) -> np.ndarray:
        top, bottom, left, right = window
        index = tuple(slice(top, bottom) if axis == "Y" else slice(left, right) if axis == "X" else slice(None)
                      for axis in self.axes)
        return np.asarray(self._array[index])

    def read_decoded(self, window: tuple[int, int, int, int]):
        """The window as pipeline.io.images.Decoded (the image and what reading chose)."""
        return image_from_array(self._raw(window), self.axes, self.names, self.channel, self.levels, self.colours)

    def read_whole(self):
        """The whole image as pipeline.io.images.Decoded, its levels and colours measured on all of it."""
        return image_from_array(self._raw((0, self.height, 0, self.width)), self.axes, self.names, self.channel)

    def read(self, window: tuple[int, int, int, int]) -> np.ndarray:
        return self.read_decoded(window).image


class TiffWindows(_FileWindows):
    """Windows of a TIFF / OME-TIFF file (its first series, full resolution), decoding only the tiles or strips a
    window covers. `channel`: --nuclear-channel; `levels`, `colours`: the whole image's intensity levels and colour
    choice (measured when first needed if not given)."""

    def __init__(self, path: str, channel: str = "", levels: tuple[float, float] | None = None,
                 colours: str | None = None):
        import tifffile
        import zarr

        self.path = path
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            self.axes = series.axes
            shape = series.levels[0].shape if series.levels else series.shape
            self.names = channel_names(tiff, series)
        self.height, self.width = int(shape[self.axes.index("Y")]), int(shape[self.axes.index("X")])
        self._array = zarr.open(tifffile.imread(path, aszarr=True, series=0, level=0), mode="r")
        self._setup(channel, levels, colours)


class ZarrWindows(_FileWindows):
    """Windows of a Zarr store (v2 or v3), reading only the chunks a window covers: an OME-Zarr image (its
    full-resolution level, axes from its `multiscales` metadata, channel names from its `omero` ones) or a plain
    2-D / 3-D array (YX, YXC when the last axis has at most 4 channels, else CYX). Channels and other axes as
    TiffWindows."""

    def __init__(self, path: str, channel: str = "", levels: tuple[float, float] | None = None,
                 colours: str | None = None):
        import zarr

        self.path = path
        node = zarr.open(path, mode="r")
        if isinstance(node, zarr.Array):
            self._array = node
            self.axes = _guess_axes(node.shape)
        else:
            multiscales = ome_multiscales(dict(node.attrs))
            if not multiscales:
                raise ValueError(f"{path}: a Zarr group without OME-Zarr `multiscales` metadata")
            self._array = node[multiscales[0]["datasets"][0]["path"]]
            self.axes = ome_axes(multiscales[0], self._array.ndim)
            self.names = ome_channel_names(dict(node.attrs))
        if "Y" not in self.axes or "X" not in self.axes:
            raise ValueError(f"{path}: no y and x axes in {self.axes!r}")
        self.height, self.width = (int(self._array.shape[self.axes.index(axis)]) for axis in "YX")
        self._setup(channel, levels, colours)


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXC" if shape[2] <= 4 else "CYX"
    raise ValueError(f"a Zarr array of shape {shape}: give a 2-D (YX) or 3-D (YXC, CYX) array, or an OME-Zarr image")


def is_zarr(path: str) -> bool:
    """Whether an input path names a Zarr store (a folder named *.zarr)."""
    return path.rstrip("/").lower().endswith(ZARR_SUFFIX)


def open_windows(path: str, channel: str = "", levels: tuple[float, float] | None = None, colours: str | None = None):
    """The window reader of a local TIFF file or Zarr store (`channel`: --nuclear-channel; `levels`, `colours`: the
    whole image's intensity levels and colour choice, measured when first needed if not given)."""
    return (ZarrWindows if is_zarr(path) else TiffWindows)(path, channel, levels, colours)


def local_window_path(ref) -> str | None:
    """The local path of a ref whose windows can be read (a TIFF file or a Zarr store on this machine), else None."""
    if ref.kind != "file" or fileio.is_uri(ref.source) or not (
            ref.image_path.lower().endswith(TIFF_SUFFIXES) or is_zarr(ref.image_path)):
        return None
    return fileio.safe_join(ref.source, ref.image_path)


def image_shape(ref) -> tuple[int, int] | None:
    """(height, width) of a listed image from its header only (TIFF, or what Pillow reads lazily: PNG, JPEG, ...);
    None for object-store files or an unreadable header (they are segmented whole, as any image)."""
    import zipfile

    local = local_window_path(ref)
    try:
        if local:
            reader = open_windows(local)
            return reader.height, reader.width
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # our own limit applies, with our own message
        if ref.kind == "zip":
            with open_zip(ref.source).open(fileio.check_relative(ref.image_path)) as stream, Image.open(stream) as image:
                return int(image.size[1]), int(image.size[0])
        if ref.kind == "file" and not fileio.is_uri(ref.source):
            with Image.open(fileio.safe_join(ref.source, ref.image_path)) as image:
                return int(image.size[1]), int(image.size[0])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, IndexError):
        return None
    return None


def sample_windows(height: int, width: int, grid: int = SAMPLE_GRID, side: int = SAMPLE_SIDE) -> list[list[tuple]]:
    """The whole-image sample's windows, row by row: grid x grid windows of `side` pixels spread over the image."""
    ys = np.linspace(0, max(0, height - side), grid).round().astype(int)
    xs = np.linspace(0, max(0, width - side), grid).round().astype(int)
    return [[(int(y), int(y) + side, int(x), int(x) + side) for x in xs] for y in ys]


def sample_mosaic(reader, grid: int = SAMPLE_GRID, side: int = SAMPLE_SIDE) -> np.ndarray:
    """The sample's windows side by side: what the image's kind and look (contrast stretch, inversion) are
    measured on, read in a fraction of the image's time."""
    rows = []
    for windows in sample_windows(reader.height, reader.width, grid, side):
        row = [reader.read(window) for window in windows]
        height = min(part.shape[0] for part in row)
        rows.append(np.concatenate([part[:height] for part in row], axis=1))
    width = min(row.shape[1] for row in rows)
    return np.ascontiguousarray(np.concatenate([row[:, :width] for row in rows], axis=0))
