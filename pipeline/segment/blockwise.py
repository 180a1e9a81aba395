"""Large images segmented block by block as Ray tasks (the blocks, seams and stitching: pipeline.io.blocks).

Each block is a Ray task that reads its own window (a TIFF's tiles, a Zarr store's chunks, or its part of an image
decoded once and put in the object store), segments it in one forward pass with the model's stored settings
(pipeline.segment.segmenter.Segmenter, loaded once per worker process) and returns the nuclei it answers for; the driver numbers
them in block order on a memory-mapped label image. A task lost with its node is retried elsewhere (Ray's task
retries), and since a block's result depends only on the block, the image comes out the same.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time

import cv2
import numpy as np

from pipeline.data.augment import (apply_appearance, fit_appearance, median_nucleus_area, size_normalisation_for,
                                   size_normalising_zoom)
from pipeline.data.protocol import image_kind
from pipeline.io import fileio
from pipeline.io.blocks import (ALIGN, ArrayWindows, Block, LabelCanvas, keep_core_nuclei, local_window_path, open_windows,
                             plan_blocks, sample_mosaic, shift_measurements)
from pipeline.io.images import READING_COLUMNS, normalise
from pipeline.io.sources import load_sample, pixel_size_of
from pipeline.model.registry import specialist_files
from pipeline.model.runinfo import RunInfo
from pipeline.outputs.exports import SUFFIXES, geojson_from_outlines, imagej_rois_from_outlines, nucleus_outlines
from pipeline.outputs.folder import label_candidates, relative_label_path
from pipeline.outputs.measure import measure_nuclei
from pipeline.segment.postprocess import needs_image_kind, postprocess_settings, prediction_settings
from pipeline.segment.predictor import load_forward, threads_for
from pipeline.segment.segmenter import Segmenter

# The SegmentConfig fields a block's Segmenter takes (the stored settings they override).
SEGMENTER_SETTINGS = ("threshold", "seed_threshold", "min_size", "tta", "scales", "nucleus_area", "diameter",
                      "instance_filter",
                      "split_clumps", "refine_outlines", "tile", "overlap")
_SEGMENTERS: dict = {}  # one model per worker process, reused by every block it runs


def _segmenter(model_path: str, settings: dict, threads: int):
    key = (model_path, repr(sorted(settings.items())), threads)
    if key not in _SEGMENTERS:
        _SEGMENTERS.clear()
        _SEGMENTERS[key] = Segmenter.load(model_path, threads=threads, **settings)
    return _SEGMENTERS[key]


def _windows(image, channel: str = "", levels=None, colours=None):
    return open_windows(image, channel, levels, colours) if isinstance(image, str) else ArrayWindows(image)


EMPTY_SHRINK = 4  # the empty-block test looks at a window shrunk 4 x 4 (area mean): noise averages out, nuclei stay


def _looked_grey(image: np.ndarray, appearance_name: str, fitted: dict) -> np.ndarray:
    """A window (or the sample mosaic) as the model sees it, grey and shrunk: nuclei bright on a dark background."""
    grey = cv2.cvtColor(apply_appearance(np.ascontiguousarray(image), appearance_name, fitted), cv2.COLOR_RGB2GRAY)
    height, width = max(1, grey.shape[0] // EMPTY_SHRINK), max(1, grey.shape[1] // EMPTY_SHRINK)
    return cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)


def empty_cut(sample: np.ndarray, appearance_name: str, fitted: dict | None) -> float | None:
    """The grey level a shrunk window must exceed somewhere to be segmented: halfway from the whole image's background
    (its sample's median) to its Otsu threshold. None (every block segmented) for a model without a look or a sample
    too flat to tell nuclei from background."""
    from skimage.filters import threshold_otsu

    if fitted is None:
        return None
    grey = _looked_grey(sample, appearance_name, fitted)
    background = float(np.median(grey))
    otsu = float(threshold_otsu(grey)) if grey.min() < grey.max() else background
    return background + 0.5 * (otsu - background) if otsu - background >= 8 else None


def is_empty(window: np.ndarray, appearance_name: str, fitted: dict, cut: float) -> bool:
    """Whether a block's window holds nothing brighter than its image's empty cut (no tissue, no nucleus): the
    model then has nothing to find there, and the block is skipped."""
    return not bool((_looked_grey(window, appearance_name, fitted) > cut).any())  # a window read already: RGB uint8


def block_cpus(config) -> float:
    """The CPUs each block's task reserves: --cpus-per-actor, else one (its TensorFlow two threads)."""
    return config.cpus_per_actor or 1.0


def block_tile(blocks: list[Block]) -> int:
    """The prediction tile that holds every block's window whole (its largest side, on the encoder's grid)."""
    side = max(max(block.window[1] - block.window[0], block.window[3] - block.window[2]) for block in blocks)
    return -(-side // ALIGN) * ALIGN


def segment_block(image, block: Block, model_path: str, settings: dict, threads: int, kind: str,
                  appearance: dict | None, image_id: str, measure: bool, outlines: bool,
                  reading: tuple = ("", None, None), empty_test: tuple[str, float] | None = None) -> dict:
    """One block: its window read and segmented, the nuclei it answers for (labels 1..n, window-sized), their
    measurements and outlines in window coordinates. `image`: a TIFF's or Zarr store's local path, or the decoded
    image; `reading`: (--nuclear-channel, the whole image's intensity levels and colour choice) for a path;
    `empty_test`: (the model's look, the image's empty_cut): a window with nothing above the cut is not segmented."""
    import ray

    reader = _windows(image, *reading)
    window = reader.read(block.window)
    empty = bool(empty_test) and is_empty(window, empty_test[0], appearance, empty_test[1])
    if empty:  # no model needed: a worker that only meets empty blocks never loads one
        labels = np.zeros(window.shape[:2], np.int32)
    else:
        labels = _segmenter(model_path, settings, threads).segment(window, kind=kind, appearance=appearance)
    kept = keep_core_nuclei(labels, block, reader.height, reader.width)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {"labels": kept.astype(np.uint16) if kept.max(initial=0) <= np.iinfo(np.uint16).max else kept, "node": node,
            "rows": measure_nuclei(kept, window, image_id) if measure else None,
            "outlines": nucleus_outlines(kept) if outlines else None, "empty": empty}


def segment_large_image(ref, config, model_path: str, info: RunInfo, output: str, measure: bool,
                        exports: tuple[str, ...], encoder=None) -> tuple[dict, dict | None, list[str]]:
    """Segment one large image block by block on the Ray cluster; writes its label TIFF (and exports).

    Returns (manifest row, the measurement rows or None, `encoder`'s strings of its labels, as in run_segmentation)."""
    started = time.time()
    reader, notes, blocks, pending = _start_blocks(ref, config, model_path, info, measure, exports)
    pixel_size = pixel_size_of(ref, config.pixel_size) if measure or exports else (None, "")
    label_file = label_candidates(output, ref.image_path)[".tif"]
    folder = os.path.dirname(label_file) if not fileio.is_uri(output) else tempfile.gettempdir()  # the file's own
    os.makedirs(folder, exist_ok=True)
    handle, canvas_path = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".tmp")
    os.close(handle)
    canvas = LabelCanvas(canvas_path, reader.height, reader.width)
    try:
        rows, outlines, nodes, empty = _paste_blocks(canvas, blocks, pending, pixel_size[0], ref.image_id)
        measured = _concatenate(rows) if measure and rows else None
        _write_outputs(canvas, label_file, exports, outlines, measured, pixel_size[0])
        rles = encoder(np.asarray(canvas.array)) if encoder else []
        row = {"image_id": ref.image_id, "path": ref.image_path, "height": reader.height, "width": reader.width,
               **canvas.summary(), "labels": relative_label_path(output, label_file),
               "pixel_size_um": np.nan if pixel_size[0] is None else pixel_size[0],
               "pixel_size_source": pixel_size[1], **{name: getattr(notes, name) for name in READING_COLUMNS},
               "blocks": len(blocks), "empty_blocks": empty, "status": "done", "error": ""}
    finally:
        canvas.close()
    print(f"{ref.image_id}: {reader.height}x{reader.width} in {len(blocks)} blocks on {len(nodes)} node(s) "
          f"({empty} empty, skipped), {row['nuclei']} nuclei, {time.time() - started:.1f} s", flush=True)
    return row, measured, rles


def _start_blocks(ref, config, model_path: str, info: RunInfo, measure: bool, exports: tuple[str, ...]):
    """The image's reader, its reading notes, its blocks and their submitted tasks: every block shares the whole
    image's reading, kind, look and size decision, measured once on its sample mosaic."""
    import ray

    local = local_window_path(ref)
    # A TIFF or Zarr store is read in windows by every task; any other format is decoded once and shared through
    # the object store.
    channel = config.nuclear_channel
    whole = None if local else load_sample(ref, with_masks=False, max_pixels=config.max_pixels, channel=channel)
    image = local or ray.put(whole.image)
    reader = open_windows(local, channel) if local else ArrayWindows(ray.get(image))
    notes = reader.notes if local else whole.reading
    reading = (channel, reader.levels, reader.colours) if local else ("", None, None)
    sample = sample_mosaic(reader)
    kind = image_kind(sample) if needs_image_kind(postprocess_settings(config, info), model_path, info) else ""
    appearance = fit_appearance(sample, info.appearance)
    blocks = plan_blocks(reader.height, reader.width, config.block_size)
    settings = {name: getattr(config, name) for name in SEGMENTER_SETTINGS}
    cpus = block_cpus(config)
    threads = threads_for(cpus)
    settings.update(_whole_image_size(sample, model_path, config, info, kind, appearance, settings, len(blocks), cpus))
    # Each window in one forward pass, not in tiles: the model then sees every block as it sees the whole image (a
    # tile grid of its own in each block moved 0.8% of the nuclei of a 20k x 20k mosaic), and faster.
    settings["tile"] = config.tile or block_tile(blocks)
    cut = empty_cut(sample, info.appearance, appearance)
    empty_test = (info.appearance, cut) if cut is not None else None
    task = ray.remote(segment_block).options(num_cpus=cpus, max_retries=3)
    pending = [task.remote(image, block, model_path, settings, threads, kind, appearance, ref.image_id, measure,
                           bool(set(exports) & {"geojson", "imagej-rois"}), reading, empty_test) for block in blocks]
    return reader, notes, blocks, pending


def _paste_blocks(canvas: LabelCanvas, blocks: list[Block], pending: list, pixel_size_um: float | None,
                  image_id: str) -> tuple[list[dict], dict, set, int]:
    """Each block's nuclei numbered on the canvas in block order (the same numbering whatever finishes first);
    returns their measurement rows and outlines in image coordinates, the nodes that ran them and how many blocks
    were empty (skipped)."""
    import ray

    rows, outlines, nodes, empty = [], {}, set(), 0
    for done, (block, result) in enumerate(zip(blocks, pending), start=1):
        part = ray.get(result)
        offset = canvas.paste(part["labels"], block)
        nodes.add(part["node"])
        empty += part["empty"]
        top, left = block.window[0], block.window[2]
        if part["rows"] is not None:
            rows.append(shift_measurements(part["rows"], offset, top, left, pixel_size_um))
        for label, points in (part["outlines"] or {}).items():
            outlines[label + offset] = points + np.asarray([left, top], np.float64)
        pending[done - 1] = None  # the block's result may leave the object store
        print(f"{image_id}: block {done}/{len(blocks)}, {canvas.nuclei} nuclei", file=sys.stderr, flush=True)
    return rows, outlines, nodes, empty


def measure_nucleus_area(sample: np.ndarray, model_path: str, settings: dict, threads: int, kind: str,
                         appearance: dict | None, measured_with: dict) -> float:
    """Median nucleus area (pixels) of a large image's sample mosaic, by one plain forward pass (a Ray task)."""
    segmenter = _segmenter(model_path, {**settings, "nucleus_area": 0, "diameter": 0}, threads)
    probabilities = segmenter.predictor.predict_whole(
        normalise(apply_appearance(sample, segmenter.info.appearance, appearance)), kind)
    return median_nucleus_area(probabilities, measured_with.get("threshold", 0.5), measured_with.get("seed_threshold"),
                               measured_with.get("min_size", 10))


def warm_worker(model_path: str, threads: int, kind: str) -> None:
    """Load the model and `kind`'s specialist into this worker's cache (a Ray task): its blocks then find them."""
    specialist = specialist_files(model_path, load_forward(model_path, threads)[0]).get(kind)
    if specialist:
        load_forward(specialist, threads)


def _whole_image_size(sample, model_path: str, config, info: RunInfo, kind: str, appearance: dict | None,
                      settings: dict, blocks: int, cpus: float) -> dict:
    """The size normalisation every block of an image shares (its own measurement would differ block by block): the
    stored range measured once on the image's sample mosaic, then given to the blocks as a diameter, or turned off."""
    import ray

    size = size_normalisation_for(prediction_settings(config, info)["size_normalisation"], kind)
    if not size or config.diameter:
        return {}
    threads = threads_for(cpus)
    task = ray.remote(measure_nucleus_area).options(num_cpus=cpus)
    measuring = task.remote(sample, model_path, settings, threads, kind, appearance, size)
    # the other workers that will run blocks load the model meanwhile (6 s of an 8,192 x 8,192 mosaic's 70 s); a
    # failure to load shows in the blocks
    others = min(blocks, int(ray.cluster_resources().get("CPU", 1) // cpus)) - 1
    warm = ray.remote(warm_worker).options(num_cpus=cpus)
    for _ in range(others):
        warm.remote(model_path, threads, kind)
    area = ray.get(measuring)
    within = size.get("within")
    if size_normalising_zoom(area, size["nucleus_area"], within=tuple(within) if within else None) == 1.0:
        return {"nucleus_area": 0}
    return {"diameter": 2 * math.sqrt(area / math.pi)}


def _concatenate(parts: list[dict]) -> dict:
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _write_outputs(canvas: LabelCanvas, label_file: str, exports: tuple[str, ...], outlines: dict,
                   measured: dict | None, pixel_size_um: float | None) -> None:
    """Exports first, then the label TIFF (a finished image always has its exports), each written atomically."""
    stem = label_file[:-len(".tif")]
    for name in exports:
        if name == "geojson":
            fileio.write_bytes_atomic(stem + SUFFIXES[name], geojson_from_outlines(outlines, measured))
        elif name == "imagej-rois":
            fileio.write_bytes_atomic(stem + SUFFIXES[name], imagej_rois_from_outlines(outlines))
        else:
            _write_tiff_atomic(canvas, stem + SUFFIXES[name], pixel_size_um, ome=True)
    _write_tiff_atomic(canvas, label_file, pixel_size_um, ome=False)


def _write_tiff_atomic(canvas: LabelCanvas, location: str, pixel_size_um: float | None, ome: bool) -> None:
    folder = os.path.dirname(location) if not fileio.is_uri(location) else tempfile.gettempdir()
    handle, partial = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".tmp")
    os.close(handle)
    try:
        canvas.write_tiff(partial, pixel_size_um, ome=ome)
        os.chmod(partial, 0o666 & ~fileio._current_umask())  # as write_bytes_atomic leaves files
        if fileio.is_uri(location):
            with open(partial, "rb") as stream:
                fileio.write_bytes_atomic(location, stream.read())
        else:
            os.replace(partial, location)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
