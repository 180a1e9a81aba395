"""Predicted masks to nuclei: touching discs split, specks dropped, holes filled, three-class targets."""
import cv2
import numpy as np

from pipeline.labels.instances import border_targets, instances_from_foreground, instances_from_interior, split_clumps


def touching_discs():
    mask = np.zeros((80, 120), np.uint8)
    cv2.circle(mask, (40, 40), 18, 1, -1)
    cv2.circle(mask, (73, 40), 18, 1, -1)
    return mask


def test_two_touching_discs_are_split():
    labels = instances_from_foreground(touching_discs().astype(float))
    assert labels.max() == 2
    assert labels[40, 30] != labels[40, 85] and labels[40, 30] > 0 and labels[40, 85] > 0


def test_specks_dropped_and_holes_filled():
    mask = np.zeros((60, 60), np.uint8)
    cv2.circle(mask, (30, 30), 12, 1, -1)
    mask[30, 30] = 0  # a hole
    mask[2, 2] = 1  # a speck
    labels = instances_from_foreground(mask.astype(float), min_size=10)
    assert labels.max() == 1 and labels[30, 30] == 1 and labels[2, 2] == 0


def test_empty_prediction_gives_no_nuclei():
    assert instances_from_foreground(np.zeros((30, 30))).max() == 0


def test_border_targets_separate_touching_nuclei_and_rebuild_them():
    labels = np.zeros((80, 120), np.int32)
    left = np.zeros_like(labels, np.uint8)
    cv2.circle(left, (40, 40), 18, 1, -1)
    labels[left > 0] = 1
    right = np.zeros_like(left)
    cv2.circle(right, (74, 40), 18, 1, -1)
    labels[(right > 0) & (labels == 0)] = 2
    target = border_targets(labels)
    assert set(np.unique(target)) == {0, 1, 2}
    interior = (target == 1).astype(float)
    nucleus = (target > 0).astype(float)
    rebuilt = instances_from_interior(interior, nucleus)
    assert rebuilt.max() == 2


def test_region_and_seed_thresholds_act_separately():
    """A soft nucleus map: the region threshold sets each nucleus' extent, the seed threshold which cores count."""
    distance = cv2.distanceTransform(touching_discs(), cv2.DIST_L2, 5)
    nucleus = np.clip(distance / 4.0, 0, 1)  # rises over the outer 4 pixels of both discs
    interior = np.clip((distance - 4.0) / 10.0, 0, 1)  # 1 only deep inside each disc, 0 at the neck
    loose = instances_from_interior(interior, nucleus, threshold=0.3, seed_threshold=0.5)
    tight = instances_from_interior(interior, nucleus, threshold=0.8, seed_threshold=0.5)
    assert loose.max() == tight.max() == 2
    assert (tight > 0).sum() < (loose > 0).sum() and ((tight > 0) & (loose == 0)).sum() == 0
    interior[:, 57:] *= 0.6  # the right disc's core is less certain: a stricter seed threshold loses it
    assert instances_from_interior(interior, nucleus, threshold=0.3, seed_threshold=0.5).max() == 2
    assert instances_from_interior(interior, nucleus, threshold=0.3, seed_threshold=0.7).max() == 1


def test_fill_holes_matches_scipy_on_random_masks():
    from scipy import ndimage

    from pipeline.labels.instances import fill_holes

    rng = np.random.default_rng(0)
    for shape in ((1, 1), (1, 7), (40, 30), (64, 64)):
        for density in (0.3, 0.5, 0.7):
            mask = rng.random(shape) < density
            assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def clump_scene():
    """Five lone discs, a large convex ellipse, and two overlapping discs labelled as one object (a merge)."""
    truth = np.zeros((120, 200), np.int32)
    for index, (x, y) in enumerate([(20, 20), (60, 20), (100, 20), (140, 20), (180, 20)], start=1):
        cv2.circle(truth, (x, y), 10, index, -1)
    cv2.ellipse(truth, (40, 85), (22, 16), 0, 0, 360, 6, -1)
    cv2.circle(truth, (120, 85), 11, 7, -1)
    cv2.circle(truth, (139, 85), 11, 8, -1)  # overlaps disc 7: the merged object is a figure of eight
    merged = np.where(truth == 8, 7, truth)
    return truth, merged


def best_iou(labels, mask):
    return max(((labels == value) & mask).sum() / ((labels == value) | mask).sum() for value in np.unique(labels[mask]))


def test_split_clumps_cuts_a_merged_pair_and_leaves_single_nuclei_whole():
    truth, merged = clump_scene()
    for border in (None, np.zeros(truth.shape, np.float32)):
        split = split_clumps(merged, border)
        assert split.max() == 8  # the pair became two objects; nothing else was cut
        for value in range(1, 9):
            assert best_iou(split, truth == value) > 0.85, value
        assert (split > 0).sum() == (merged > 0).sum()  # the cut relabels pixels, adds and removes none


def test_split_clumps_follows_the_models_border_and_spares_convex_or_ordinary_objects():
    truth, merged = clump_scene()
    border = np.zeros(truth.shape, np.float32)
    border[:, 124:126] = 1.0  # the model sees the boundary 5 pixels left of the neck (x = 129.5)
    split = split_clumps(merged, border)
    left, right = split[85, 115], split[85, 140]
    assert left != right
    pair = merged == 7
    columns = np.arange(merged.shape[1])[None, :]
    assert (split[pair & (columns < 124)] == left).all() and (split[pair & (columns > 126)] == right).all()
    assert (split_clumps(merged)[pair & (columns == 127)] == left).all()  # without the border map: at the neck
    assert split_clumps(merged, border, max_solidity=0.8).max() == 7  # the pair is not that concave: left whole
    assert split_clumps(merged, border, min_area_ratio=3.0).max() == 7  # nor three times the median
    assert split_clumps(np.zeros((20, 20), np.int32)).max() == 0


def test_convex_areas_and_renumbering_are_scikit_images_exactly():
    """The filter's and clump splitting's convex hulls (pipeline.labels.instances.convex_areas, all objects at
    once) and the renumbering (pipeline.labels.instances.sequential) stand in for scikit-image's for speed: the same
    numbers on random shapes of every size, holes, thin lines, single pixels and labels in several pieces included."""
    from scipy import ndimage
    from skimage.measure import regionprops_table
    from skimage.segmentation import relabel_sequential

    from pipeline.labels.instances import convex_areas, sequential

    rng = np.random.default_rng(0)
    for turn in range(400):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.uniform(0.05, 0.95)
        labels = ndimage.label(mask)[0]
        if turn % 2:  # objects of several pieces, numbers with gaps
            labels = np.where(labels > 0, labels % 5 * 3 + 1, 0)
        if labels.max() == 0:
            continue
        table = regionprops_table(labels, properties=("label", "area", "area_convex"))
        assert list(convex_areas(labels)) == list(np.asarray(table["area_convex"])[np.argsort(table["label"])])
        scattered = np.where(labels > 0, labels * 7 + 3, 0).astype(np.int32)
        assert np.array_equal(sequential(scattered), relabel_sequential(scattered)[0])


def test_instance_features_are_scikit_images_measurements():
    """The filter's features, computed by label in one pass, equal regionprops' (area, solidity, eccentricity,
    intensity mean, min and max, the box touching the edge) on random objects, some in several pieces."""
    from scipy import ndimage
    from skimage.measure import regionprops

    from pipeline.labels.instance_filter import FEATURES, instance_features

    rng = np.random.default_rng(1)
    for turn in range(60):
        shape = (int(rng.integers(8, 60)), int(rng.integers(8, 60)))
        labels = ndimage.label(rng.random(shape) < 0.5)[0]
        if turn % 2:
            labels = np.where(labels > 0, labels % 4 + 1, 0)
        probabilities = rng.dirichlet([1, 1, 1], size=shape).astype(np.float32)
        features = instance_features(labels, probabilities)
        regions = regionprops(labels, intensity_image=np.stack([1 - probabilities[..., 0], probabilities[..., 1]], -1))
        column = {name: features[:, FEATURES.index(name)] for name in FEATURES}
        assert np.allclose(np.exp(column["log_area"]), [region.area for region in regions])
        assert np.allclose(column["solidity"], [region.solidity for region in regions])
        assert np.allclose(column["eccentricity"], [region.eccentricity for region in regions], atol=1e-6)
        assert np.allclose(column["mean_nucleus"], [region.intensity_mean[0] for region in regions], atol=1e-6)
        assert np.array_equal(column["min_nucleus"], [region.intensity_min[0] for region in regions])
        assert np.array_equal(column["max_interior"], [region.intensity_max[1] for region in regions])
        touches = [float(region.bbox[0] == 0 or region.bbox[1] == 0 or region.bbox[2] == shape[0] or
                         region.bbox[3] == shape[1]) for region in regions]
        assert np.array_equal(column["touches_edge"], touches)


def test_holes_are_filled_in_each_nucleus_only():
    """A nucleus' own holes are filled (a ring becomes a disc, one inside another's hole included); background that
    several nuclei enclose together stays background."""
    from pipeline.labels.instances import _finish

    yy, xx = np.mgrid[:60, :90]
    ring = (np.hypot(yy - 30, xx - 25) < 18) & (np.hypot(yy - 30, xx - 25) > 9)
    inner = np.hypot(yy - 30, xx - 25) < 4  # a nucleus inside the ring's hole
    square = (np.abs(yy - 30) < 14) & (np.abs(xx - 68) < 14)
    enclosed = (np.abs(yy - 30) < 5) & (np.abs(xx - 68) < 5)
    left, right = square & ~enclosed & (xx < 68), square & ~enclosed & (xx >= 68)  # two halves around a gap
    labels = np.zeros((60, 90), np.int32)
    for index, part in enumerate((ring, inner, left, right), start=1):
        labels[part] = index
    filled = _finish(labels, 1)
    assert (filled[np.hypot(yy - 30, xx - 25) < 18] > 0).all()  # the ring's hole filled around the inner nucleus
    assert len(np.unique(filled[inner])) == 1 and filled[30, 25] != filled[30, 12]
    assert (filled[enclosed] == 0).all()  # enclosed by two nuclei together: not a hole of either
