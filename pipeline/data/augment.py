"""Pure numpy/OpenCV functions for native-resolution work: appearance, training crops, tiled prediction.

- `standardise_appearance` lets one model serve fluorescence, bright-field and stained images: grey,
  inverted when the background is light or the image is stained tissue, contrast stretched per image.
- `random_crops` cuts augmented training crops (scale jitter, flips, 90-degree rotations, brightness and
  contrast) from a full-resolution image and its instance labels.
- `predict_full_image` runs a fully convolutional model on a whole image padded to a multiple of 32,
  in overlapping blended tiles when it is large, averaged over flips (test-time augmentation).
No Ray or TensorFlow here: the model comes in as a function from a float32 NHWC batch to probabilities.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import cv2
import numpy as np

from pipeline.data.protocol import is_stained
from pipeline.labels.instances import instances_from_probabilities

APPEARANCES = ("rgb", "standardised", "colour")


def _stretch_lookup(grey: np.ndarray, stained: bool = False) -> tuple[np.ndarray | None, bool]:
    """(contrast-stretch lookup table or None for a flat image, whether to invert) from a grey image.

    The median pixel is background in most nucleus images, so a light median means bright-field or stained
    tissue (dark nuclei): inverting makes all three kinds look like fluorescence. Stained tissue is always
    inverted: where nuclei or red tissue cover half the image its median is dark too (3 of DSB2018's 94
    stained training images), and left as is the model outlines the background instead of the nuclei.
    """
    histogram = np.bincount(grey.ravel(), minlength=256)
    invert = stained or bool(np.searchsorted(np.cumsum(histogram) / max(1, grey.size), 0.5) > 127)
    cumulative = np.cumsum(histogram[::-1] if invert else histogram) / max(1, grey.size)
    low, high = int(np.searchsorted(cumulative, 0.01)), int(np.searchsorted(cumulative, 0.998))
    if high - low < 8:  # flat image: nothing to stretch
        return None, invert
    return np.clip((np.arange(256, dtype=np.float32) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8), invert


def fit_appearance(image: np.ndarray, appearance: str) -> dict | None:
    """The per-image part of `appearance` (whether to invert, the contrast stretch) measured on `image`, so that
    every block of a large image gets the same look (pipeline.io.blocks); None for 'rgb', which has none."""
    if appearance == "rgb":
        return None
    if appearance not in APPEARANCES:
        raise ValueError(f"unknown appearance {appearance!r}; choose one of {APPEARANCES}")
    image = np.ascontiguousarray(image)
    lookup, invert = _stretch_lookup(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY),
                                     stained=is_stained(image))
    return {"lookup": lookup, "invert": invert}


def standardise_appearance(image: np.ndarray, keep_colour: bool = False, fitted: dict | None = None) -> np.ndarray:
    """RGB uint8 -> RGB uint8 with nuclei bright on dark: grey (or colour kept), inverted if light or stained,
    stretched.

    Grey makes fluorescence, bright-field and stained images look alike; `keep_colour` applies the same
    inversion and stretch to each channel instead, so a model can still tell purple (haematoxylin) nuclei
    from red (eosin) tissue, which grey levels cannot: both come out equally bright once inverted.
    Grey images give the same result either way. `fitted` (fit_appearance) gives the inversion and stretch
    measured on the whole image instead of on this one.
    """
    image = np.ascontiguousarray(image)
    fitted = fitted or fit_appearance(image, "colour")
    values = image if keep_colour else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if fitted["invert"]:
        values = 255 - values
    if fitted["lookup"] is not None:
        values = fitted["lookup"][values]
    return np.ascontiguousarray(values) if keep_colour else cv2.cvtColor(values, cv2.COLOR_GRAY2RGB)


def apply_appearance(image: np.ndarray, appearance: str, fitted: dict | None = None) -> np.ndarray:
    """The model-side look of an RGB uint8 image: 'rgb' (as is), 'standardised' (grey) or 'colour'; `fitted`: the
    whole image's inversion and stretch (fit_appearance) for a block of it."""
    if appearance == "rgb":
        return image
    if appearance in ("standardised", "colour"):
        return standardise_appearance(image, keep_colour=appearance == "colour", fitted=fitted)
    raise ValueError(f"unknown appearance {appearance!r}; choose one of {APPEARANCES}")


def _orient(array: np.ndarray, flip: int, turns: int) -> np.ndarray:
    if flip:
        array = array[:, ::-1]
    return np.rot90(array, turns) if turns else array


def random_crops(image: np.ndarray, labels: np.ndarray, size: int, count: int, rng: np.random.Generator,
                 augment: bool = True, scale_range: tuple[float, float] = (0.7, 1.4),
                 zoom: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` (image, labels) crops of size x size from a full-resolution image and its instance labels.

    With `augment`: each crop has its own scale (zoom by a factor from `scale_range`), a random flip and
    90-degree rotation, and brightness/contrast jitter. `zoom` scales every crop of the image (size
    normalisation). Images smaller than a crop are padded (reflected image, background labels).
    """
    crops = []
    height, width = labels.shape
    for _ in range(count):
        scale = zoom * (float(np.exp(rng.uniform(*np.log(scale_range)))) if augment else 1.0)
        window = max(8, int(round(size / scale)))
        top = int(rng.integers(0, max(1, height - window + 1)))
        left = int(rng.integers(0, max(1, width - window + 1)))
        piece = image[top:top + window, left:left + window]
        piece_labels = labels[top:top + window, left:left + window]
        pad_y, pad_x = window - piece.shape[0], window - piece.shape[1]
        if pad_y or pad_x:
            piece = cv2.copyMakeBorder(piece, 0, pad_y, 0, pad_x, cv2.BORDER_REFLECT_101 if min(piece.shape[:2]) > 1
                                       else cv2.BORDER_REPLICATE)
            piece_labels = np.pad(piece_labels, ((0, pad_y), (0, pad_x)))
        if window != size:
            piece = cv2.resize(piece, (size, size), interpolation=cv2.INTER_AREA if window > size else cv2.INTER_LINEAR)
            piece_labels = cv2.resize(piece_labels.astype(np.int32).astype(np.float32), (size, size),
                                      interpolation=cv2.INTER_NEAREST).astype(labels.dtype)
        if augment:
            flip, turns = int(rng.integers(0, 2)), int(rng.integers(0, 4))
            piece, piece_labels = _orient(piece, flip, turns), _orient(piece_labels, flip, turns)
            contrast, brightness = rng.uniform(0.75, 1.25), rng.uniform(-25, 25)
            piece = np.clip(piece.astype(np.float32) * contrast + brightness, 0, 255).astype(np.uint8)
        crops.append((np.ascontiguousarray(piece), np.ascontiguousarray(piece_labels)))
    return crops


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length` with at least `overlap` shared pixels."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def _ramp(tile: int, overlap: int) -> np.ndarray:
    """1-D tile weights: 1 in the middle, ramping down over the overlap, so tile seams blend smoothly."""
    ramp = np.ones(tile, np.float32)
    if overlap > 0:
        edge = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
        ramp[:overlap], ramp[-overlap:] = edge, edge[::-1]
    return ramp


def flip_average(batch: np.ndarray, forward: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Test-time augmentation: the mean prediction of an NHWC batch as is, flipped left-right, up-down and both."""
    total = None
    for axes in ((), (2,), (1,), (1, 2)):
        view = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
        out = forward(view)
        out = np.flip(out, axes) if axes else out
        total = out.astype(np.float32) if total is None else total + out
    return total / 4.0


def predict_full_image(image: np.ndarray, forward: Callable[[np.ndarray], np.ndarray], tile: int = 1024,
                       overlap: int = 64, flips: bool = False, multiple: int = 32) -> np.ndarray:
    """HxWxC probabilities for a whole float32 HxWx3 image from a fully convolutional model.

    The image is padded (reflected) to a multiple of `multiple`; images larger than `tile` go through
    overlapping tiles blended by a ramped window, so memory is bounded by the tile size. With `flips`,
    predictions of the image flipped left-right, up-down and both are averaged (test-time augmentation).
    """
    height, width = image.shape[:2]
    tile = max(multiple, tile - tile % multiple)
    overlap = min(overlap, tile // 2)
    padded_h = max(multiple, -(-height // multiple) * multiple)
    padded_w = max(multiple, -(-width // multiple) * multiple)
    padded = cv2.copyMakeBorder(np.ascontiguousarray(image), 0, padded_h - height, 0, padded_w - width,
                                cv2.BORDER_REFLECT_101 if min(height, width) > 1 else cv2.BORDER_REPLICATE)
    tile_h, tile_w = min(tile, padded_h), min(tile, padded_w)

    def predict_view(view: np.ndarray) -> np.ndarray:
        return (flip_average(view[None], forward) if flips else forward(view[None]))[0]

    if (tile_h, tile_w) == (padded_h, padded_w):  # one tile: its probabilities as they are (the blend's weights are 1)
        return predict_view(padded).astype(np.float32, copy=False)[:height, :width]
    total, weights = None, None
    window = np.outer(_ramp(tile_h, overlap if padded_h > tile_h else 0),
                      _ramp(tile_w, overlap if padded_w > tile_w else 0))[..., None]
    for top in tile_starts(padded_h, tile_h, overlap):
        for left in tile_starts(padded_w, tile_w, overlap):
            probabilities = predict_view(padded[top:top + tile_h, left:left + tile_w]).astype(np.float32)
            if total is None:
                total = np.zeros((padded_h, padded_w, probabilities.shape[-1]), np.float32)
                weights = np.zeros((padded_h, padded_w, 1), np.float32)
            total[top:top + tile_h, left:left + tile_w] += probabilities * window
            weights[top:top + tile_h, left:left + tile_w] += window
    return (total / np.maximum(weights, 1e-6))[:height, :width]


ZOOM_LIMITS = (0.5, 2.0)  # size normalisation zooms no further: beyond, too few pixels or too much work


def median_nucleus_area(probabilities: np.ndarray, threshold: float = 0.5, seed_threshold: float | None = None,
                        min_size: int = 10) -> float:
    """Median area in pixels of the nuclei a probability map splits into with these settings (0 when none)."""
    return true_median_area(instances_from_probabilities(np.asarray(probabilities, np.float32), threshold=threshold,
                                                         min_size=min_size, seed_threshold=seed_threshold))


def size_normalising_zoom(median_area: float, nucleus_area: float,
                          limits: tuple[float, float] = ZOOM_LIMITS, within: tuple[float, float] | None = None) -> float:
    """The zoom that brings an image's median nucleus to `nucleus_area` pixels, within `limits`.

    DSB2018's images differ tenfold in nucleus size; several top teams rescaled each image so its nuclei
    had about the size the model knows best. 1.0 when there is nothing to measure or no target, or when the
    median is `within` (low, high) pixels: the sizes the model was trained on, which it segments as they are.
    """
    if median_area <= 0 or nucleus_area <= 0:
        return 1.0
    if within and within[0] <= median_area <= within[1]:
        return 1.0
    return float(np.clip(np.sqrt(nucleus_area / median_area), *limits))


def size_normalisation_for(size_normalisation: dict | None, kind: str) -> dict | None:
    """An image of `kind`'s size normalisation: the stored one with its kind's own target and range (`by_kind`: the
    sizes of that kind's training images, which its specialist knows) where it has them."""
    if not size_normalisation:
        return size_normalisation
    own = dict(size_normalisation)
    own.update((own.pop("by_kind", None) or {}).get(kind, {}))
    return own


def true_median_area(labels: np.ndarray) -> float:
    """Median area in pixels of the nuclei of an instance label image (0 when it has none)."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    areas = areas[areas > 0]
    return float(np.median(areas)) if len(areas) else 0.0


class AtZoom(NamedTuple):
    """predict_scales' result with `keep_zoom`: probabilities at the zoomed size, the zoom, and the size measurement's
    nuclei ((threshold, seed_threshold, min_size), labels) where they are these very probabilities' (zoom 1, one
    plain pass), so that post-processing with the same settings does not find them a second time."""

    probabilities: np.ndarray
    zoom: float
    measured: tuple | None = None


def predict_scales(image: np.ndarray, forward: Callable[[np.ndarray], np.ndarray], scales: tuple[float, ...] = (1.0,),
                   tile: int = 1024, overlap: int = 64, flips: bool = False,
                   size_normalisation: dict | None = None, keep_zoom: bool = False):
    """Multi-scale test-time augmentation: the mean of `predict_full_image` over the image resized by each scale.

    Each scale's probabilities are resized back to the image's size before averaging (2nd and 3rd place of
    DSB2018 averaged scales); (1.0,) is plain whole-image prediction. With `size_normalisation`
    ({nucleus_area, threshold, seed_threshold, min_size, within}), a first plain pass measures the image's median
    nucleus with those settings and every scale is multiplied by the zoom that brings it to `nucleus_area` (none
    when it is `within` [low, high] pixels); its `diameter` (pixels) gives the image's nucleus size instead, without
    the first pass.
    `keep_zoom`: return an AtZoom (probabilities at the zoomed size, zoom, the measurement's nuclei), for
    post-processing at the size the model knows.
    """
    height, width = image.shape[:2]
    first, zoom, first_nuclei = None, 1.0, None
    if size_normalisation and size_normalisation.get("nucleus_area", 0) > 0:
        diameter = float(size_normalisation.get("diameter") or 0.0)
        if diameter > 0:
            measured, within = np.pi * diameter ** 2 / 4, None
        else:
            first = predict_full_image(image, forward, tile, overlap, False)
            seed_threshold = size_normalisation.get("seed_threshold")
            key = (float(size_normalisation.get("threshold", 0.5)),
                   None if seed_threshold is None else float(seed_threshold), int(size_normalisation.get("min_size", 10)))
            first_nuclei = (key, instances_from_probabilities(np.asarray(first, np.float32), threshold=key[0],
                                                              min_size=key[2], seed_threshold=key[1]))
            measured = true_median_area(first_nuclei[1])
            within = size_normalisation.get("within")
        zoom = size_normalising_zoom(measured, size_normalisation["nucleus_area"],
                                     within=tuple(within) if within else None)
    out_h, out_w = (max(1, round(height * zoom)), max(1, round(width * zoom))) if keep_zoom else (height, width)
    total = None
    for scale in scales:
        factor = scale * zoom
        view = image if factor == 1.0 else cv2.resize(
            image, (max(1, round(width * factor)), max(1, round(height * factor))),
            interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        reuse = first is not None and factor == 1.0 and not flips
        probabilities = first if reuse else predict_full_image(view, forward, tile, overlap, flips)
        if probabilities.shape[:2] != (out_h, out_w):
            probabilities = cv2.resize(probabilities, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
            probabilities = probabilities.reshape(out_h, out_w, -1)
        total = probabilities if total is None else total + probabilities
    if not keep_zoom:
        return total / len(scales)
    own = first is not None and scales == (1.0,) and zoom == 1.0 and not flips  # `total` is the first pass itself
    return AtZoom(total / len(scales), zoom, first_nuclei if own else None)
