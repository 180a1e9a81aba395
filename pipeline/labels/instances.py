"""Predicted probabilities to nucleus instances: threshold, fill holes, split touching nuclei, drop specks.

Two modes: from a foreground probability (distance-transform watershed splits touching nuclei), or,
for three-class models, interior seeds grown by marker watershed into the nucleus region.
The result is an int32 label image (0 background, 1..N nuclei): no pixel belongs to two nuclei.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

DEFAULT_MIN_SIZE = 10  # pixels; smaller predicted objects are noise
DEFAULT_THRESHOLD = 0.5  # probability above which a pixel is nucleus (and, for 3 classes, seeds one)


def sequential(labels: np.ndarray) -> np.ndarray:
    """`labels` renumbered 1..N in their order, 0 staying background: scikit-image's relabel_sequential's labels, by
    one bincount and a lookup (about twice as fast; it runs several times per image)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel())
    present = counts > 0
    present[0] = False
    lookup = np.zeros(len(counts), labels.dtype)
    lookup[present] = np.arange(1, int(np.count_nonzero(present)) + 1)
    return lookup[labels]


def fill_holes(binary: np.ndarray) -> np.ndarray:
    """scipy's binary_fill_holes (background 4-connected to the edge stays), by one OpenCV flood fill: ~20x faster."""
    binary = np.asarray(binary, bool)
    outside = np.pad(binary.astype(np.uint8), 1)  # a frame of background joins every edge pixel
    cv2.floodFill(outside, np.zeros((outside.shape[0] + 2, outside.shape[1] + 2), np.uint8), (0, 0), 1, flags=4)
    return binary | (outside[1:-1, 1:-1] == 0)


def _finish(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects under min_size pixels, fill each object's holes, number them 1..N."""
    if labels.max() == 0:
        return labels.astype(np.int32)
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels = np.where(small[labels], 0, labels)
    holes = fill_holes(labels > 0) & (labels == 0)  # background enclosed by nuclei: every nucleus' own holes among it
    if not holes.any():  # the usual case: nothing to fill
        return sequential(labels).astype(np.int32, copy=False)
    filled = labels.copy()
    boxes = ndimage.find_objects(labels)
    for index in _boxes_holding(holes, boxes):
        region = boxes[index - 1]
        own = labels[region] == index
        filled[region][fill_holes(own) & (labels[region] == 0)] = index
    return sequential(filled).astype(np.int32, copy=False)


def _boxes_holding(pixels: np.ndarray, boxes: list) -> np.ndarray:
    """The labels (1-based) of the boxes (ndimage.find_objects') that hold at least one of the `pixels` (a mask), by
    one summed-area table over the pixels' own bounding box: only those objects may have holes of their own to fill."""
    (rows, cols), = ndimage.find_objects(pixels.astype(np.uint8))
    table = np.pad(pixels[rows, cols].astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    extents = np.array([(index, box[0].start, box[0].stop, box[1].start, box[1].stop)
                        for index, box in enumerate(boxes, start=1) if box is not None], np.int64).reshape(-1, 5)
    index, top, bottom, left, right = extents.T
    top, bottom = (np.clip(side - rows.start, 0, rows.stop - rows.start) for side in (top, bottom))
    left, right = (np.clip(side - cols.start, 0, cols.stop - cols.start) for side in (left, right))
    held = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
    return index[held > 0]


def split_touching(binary: np.ndarray, min_distance: int = 4) -> np.ndarray:
    """Label a binary mask, splitting touching round objects at the necks of their distance transform."""
    binary = np.ascontiguousarray(binary, dtype=np.uint8)
    components, count = ndimage.label(binary)
    if count == 0:
        return components.astype(np.int32)
    distance = cv2.distanceTransform(binary, cv2.DIST_L2, 5)
    smoothed = cv2.GaussianBlur(distance, (0, 0), 1.0)
    # One search over the whole image (with labels=, scikit-image loops over every component in Python);
    # a component whose peak a neighbour's suppressed still gets a marker of its own below.
    peaks = peak_local_max(smoothed, min_distance=min_distance, threshold_abs=1.5, exclude_border=False)
    peaks = peaks[binary[tuple(peaks.T)] > 0] if len(peaks) else peaks
    markers = np.zeros_like(components)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    markers = ndimage.label(ndimage.binary_dilation(markers > 0, iterations=1))[0] * (binary > 0)
    # Components that got no peak (small or thin ones) keep one marker of their own.
    unmarked = np.setdiff1d(np.arange(1, count + 1), np.unique(components[markers > 0]))
    if unmarked.size:
        offset = markers.max()
        lookup = np.zeros(count + 1, np.int32)
        lookup[unmarked] = offset + np.arange(1, unmarked.size + 1)
        extra = lookup[components]
        markers = np.where(extra > 0, extra, markers)
    return watershed(-smoothed, markers, mask=binary > 0).astype(np.int32)


def instances_from_foreground(foreground: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                              min_size: int = DEFAULT_MIN_SIZE, split: bool = True) -> np.ndarray:
    """Nuclei from a foreground probability map (or a binary mask) of a two-class model."""
    binary = fill_holes(np.asarray(foreground) > threshold)  # before splitting: a hole is no neck
    labels = split_touching(binary) if split else ndimage.label(binary)[0]
    return _finish(labels, min_size)


def instances_from_interior(interior: np.ndarray, nucleus: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                            min_size: int = DEFAULT_MIN_SIZE, seed_threshold: float | None = None) -> np.ndarray:
    """Nuclei of a three-class model: interior seeds grown by watershed into the nucleus region.

    `interior` is P(interior); `nucleus` is P(interior) + P(border), i.e. 1 - P(background). The region
    is `nucleus > threshold`, the seeds `interior > seed_threshold` (default: the same threshold).
    """
    region = np.asarray(nucleus) > threshold
    seed_threshold = threshold if seed_threshold is None else seed_threshold
    seeds = ndimage.label(np.asarray(interior) > seed_threshold)[0]
    if seeds.max():
        seed_sizes = np.bincount(seeds.ravel())
        tiny = seed_sizes < max(2, min_size // 4)
        tiny[0] = False
        seeds = np.where(tiny[seeds], 0, seeds)
    regions, count = ndimage.label(region)
    unseeded = np.setdiff1d(np.arange(1, count + 1), np.unique(regions[seeds > 0]))
    if unseeded.size:
        lookup = np.zeros(count + 1, np.int32)
        lookup[unseeded] = seeds.max() + np.arange(1, unseeded.size + 1)
        extra = lookup[regions]
        seeds = np.where(extra > 0, extra, seeds)
    labels = watershed(-np.asarray(interior, np.float32), seeds, mask=region | (seeds > 0))
    return _finish(labels.astype(np.int32), min_size)


def instances_from_probabilities(probabilities: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                                 min_size: int = DEFAULT_MIN_SIZE, seed_threshold: float | None = None) -> np.ndarray:
    """Nuclei from an HxWxC softmax map: C=2 (background, nucleus) or C=3 (background, interior, border)."""
    if probabilities.shape[-1] == 2:
        return instances_from_foreground(probabilities[..., 1], threshold, min_size)
    if probabilities.shape[-1] == 3:
        return instances_from_interior(probabilities[..., 1], 1.0 - probabilities[..., 0], threshold, min_size,
                                       seed_threshold)
    raise ValueError(f"expected 2 or 3 classes, got {probabilities.shape[-1]}")


def convex_areas(labels: np.ndarray, pixels: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Pixels of each object's convex hull (objects in label order) as scikit-image's regionprops counts them
    (convex_hull_image: the hull of each pixel's four edge midpoints, then every pixel centre inside it or on its
    edge), exactly, for all objects at once: the hull of each row's end pixels (OpenCV, in doubled integer
    coordinates), then each row's span of pixel centres inside it by integer arithmetic. `pixels`: np.nonzero(labels),
    when already known."""
    rows, cols = np.nonzero(labels) if pixels is None else pixels
    owner = labels[rows, cols]
    order = np.argsort(owner, kind="stable")  # by object, each object's pixels still in row-major order
    owner, rows, cols = owner[order], rows[order].astype(np.int64), cols[order].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, (owner[1:] != owner[:-1]) | (rows[1:] != rows[:-1])])  # runs: object, row
    ends = np.r_[starts[1:], len(rows)] - 1
    run_owner, row, left, right = owner[starts], 2 * rows[starts], 2 * cols[starts], 2 * cols[ends]
    firsts = np.flatnonzero(np.r_[True, run_owner[1:] != run_owner[:-1]])  # each object's first run
    lasts = np.r_[firsts[1:], len(run_owner)]
    points = np.stack([np.stack([left - 1, right + 1, left, left, right, right], 1),  # x = 2 column, y = 2 row
                       np.stack([row, row, row - 1, row + 1, row - 1, row + 1], 1)], 2).astype(np.int32)
    hulls = [cv2.convexHull(points[first:last].reshape(-1, 2))[:, 0, :] for first, last in zip(firsts, lasts)]
    sizes = np.array([len(hull) for hull in hulls])
    vertex = np.concatenate(hulls).astype(np.int64)
    following = np.arange(len(vertex)) + 1  # each vertex's next one around its own hull
    following[np.cumsum(sizes) - 1] -= sizes
    x0, y0, x1, y1 = vertex[:, 0], vertex[:, 1], vertex[following, 0], vertex[following, 1]
    edge_object = np.repeat(np.arange(len(hulls)), sizes)
    slanted = y0 != y1  # a row of pixel centres never lies on a horizontal edge: only the others cross it
    x0, y0, x1, y1, edge_object = x0[slanted], y0[slanted], x1[slanted], y1[slanted], edge_object[slanted]
    edges = np.bincount(edge_object, minlength=len(hulls))
    edge_start = np.r_[0, np.cumsum(edges)[:-1]]
    top, bottom = row[firsts] // 2, row[lasts - 1] // 2  # rows of each object's box
    box_left = np.minimum.reduceat(left, firsts) // 2
    box_right = np.maximum.reduceat(right, firsts) // 2
    heights = bottom - top + 1
    # one pair per (object, row of its box, slanted edge of its hull), ordered so, each (object, row) a block
    pairs = heights * edges
    pair_object = np.repeat(np.arange(len(hulls)), pairs)
    within = np.arange(int(pairs.sum())) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    per_row = edges[pair_object]
    edge = edge_start[pair_object] + within % per_row
    y = 2 * (top[pair_object] + within // per_row)
    ex0, ey0, ex1, ey1 = x0[edge], y0[edge], x1[edge], y1[edge]
    crosses = (np.minimum(ey0, ey1) <= y) & (y <= np.maximum(ey0, ey1))
    den = np.abs(ey1 - ey0)
    num = (ex0 * (ey1 - ey0) + (y - ey0) * (ex1 - ex0)) * np.sign(ey1 - ey0)  # the edge meets row y at x = num / den
    big = np.iinfo(np.int64).max
    block = np.r_[0, np.cumsum(np.repeat(edges, heights))[:-1]]  # each (object, row)'s first pair
    low = np.minimum.reduceat(np.where(crosses, -(-num // (2 * den)), big), block)  # first column whose centre is in
    high = np.maximum.reduceat(np.where(crosses, num // (2 * den), -big), block)
    row_object = np.repeat(np.arange(len(hulls)), heights)
    low, high = np.maximum(low, box_left[row_object]), np.minimum(high, box_right[row_object])
    return np.add.reduceat(np.maximum(high - low + 1, 0), np.r_[0, np.cumsum(heights)[:-1]])


CLUMP_SPLIT_KEYS = ("min_area_ratio", "max_solidity", "spacing")
DEFAULT_CLUMP_SPLIT = {"min_area_ratio": 1.5, "max_solidity": 0.95, "spacing": 1.2}  # jobs/tune.py chooses per model


def split_clumps(labels: np.ndarray, border: np.ndarray | None = None, min_area_ratio: float = 1.5,
                 max_solidity: float = 0.95, spacing: float = 1.2) -> np.ndarray:
    """Cut the objects that look like merged nuclei: larger than `min_area_ratio` times the image's median
    object and less convex than `max_solidity`, each split at the peaks of its distance transform that lie at
    least `spacing` median radii apart, the cuts along the ridges of `border` (P(border), when given) less depth.

    The clump splitting of digital pathology (a distance-transform watershed, as in Naylor et al. 2017 and
    Roszkowiak et al. 2020), kept to objects that are both large and non-convex: in densely packed stained
    tissue two touching nuclei often share one seed, and a split of every object would break single ones.
    """
    result = np.asarray(labels).astype(np.int32, copy=True)
    counts = np.bincount(result.ravel())
    areas = counts[1:][counts[1:] > 0]
    if areas.size == 0:
        return result
    median = float(np.median(areas))
    radius = np.sqrt(median / np.pi)
    next_label = int(result.max()) + 1
    large = counts >= min_area_ratio * median  # only these may be clumps: no hull for the rest
    large[0] = False
    if not large.any():
        return sequential(result).astype(np.int32, copy=False)
    candidates = np.where(large[result], result, 0)
    present = np.flatnonzero(large)  # label order, as regionprops'
    solidity = counts[present] / convex_areas(candidates)  # regionprops' solidity, sooner
    boxes = ndimage.find_objects(candidates)
    for label in present[solidity < max_solidity]:
        box = boxes[label - 1]
        image = candidates[box] == label
        top, left, bottom, right = box[0].start, box[1].start, box[0].stop, box[1].stop
        mask = np.pad(image, 1)
        depth = ndimage.distance_transform_edt(mask)
        peaks = peak_local_max(depth, min_distance=max(2, int(spacing * radius)), labels=mask.astype(np.int32),
                               exclude_border=False)
        if len(peaks) < 2:
            continue
        markers = np.zeros(mask.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        if border is None:
            landscape = -depth
        else:
            ridges = np.pad(np.asarray(border, np.float32)[top:bottom, left:right], 1)
            landscape = cv2.GaussianBlur(ridges, (0, 0), 0.7) - 0.5 * np.minimum(depth / radius, 1.0)
        parts = watershed(landscape, markers, mask=mask)[1:-1, 1:-1]
        window = result[top:bottom, left:right]
        for part in range(2, len(peaks) + 1):
            window[(parts == part) & image] = next_label
            next_label += 1
    return sequential(result).astype(np.int32, copy=False)


def border_targets(labels: np.ndarray, width: int = 2) -> np.ndarray:
    """Three-class target from instance labels: 0 background, 1 interior, 2 border (and touching gaps)."""
    labels = np.asarray(labels)
    kernel = np.ones((3, 3), np.uint8)
    as_float = labels.astype(np.float32)
    grown = cv2.dilate(as_float, kernel, iterations=width)
    shrunk = -cv2.dilate(-as_float, kernel, iterations=width)  # erosion that keeps the max label
    edge = (grown != shrunk) & ((labels > 0) | (cv2.dilate((labels > 0).astype(np.uint8), kernel) > 0))
    target = np.where(labels > 0, 1, 0).astype(np.uint8)
    target[edge & (labels > 0)] = 2
    # The background between two touching nuclei is border too, so they stay apart.
    touching_gap = (labels == 0) & (grown != shrunk) & (cv2.erode(as_float, kernel) == 0) & \
        (_distinct_neighbours(labels) > 1)
    target[touching_gap] = 2
    return target


def _distinct_neighbours(labels: np.ndarray) -> np.ndarray:
    """How many different nucleus labels touch each pixel's 3x3 neighbourhood (0, 1 or 2 = more)."""
    as_float = labels.astype(np.float32)
    kernel = np.ones((3, 3), np.uint8)
    high = cv2.dilate(as_float, kernel)
    masked = np.where(labels > 0, as_float, np.float32(1e9))
    low = -cv2.dilate(-masked, kernel)
    low = np.where(low >= 1e9, 0, low)
    return np.where(high == 0, 0, np.where(low == high, 1, 2))
