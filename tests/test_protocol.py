"""The evaluation protocol's splits: disjoint, complete, stratified by kind, seeded, independent of order."""
import random

import pytest

from pipeline.data.protocol import FRACTIONS, SPLITS, protocol_splits, split_counts


def listing(counts: dict[str, int]) -> dict[str, str]:
    return {f"{kind}-{index:04d}": kind for kind, count in counts.items() for index in range(count)}


def test_splits_are_disjoint_complete_and_stratified_by_kind():
    kinds = listing({"fluorescence": 491, "stained": 94, "bright-field": 15})  # the shared zip's proportions
    splits = protocol_splits(kinds)
    assert set().union(*map(set, splits.values())) == set(kinds)
    assert sum(len(ids) for ids in splits.values()) == len(kinds)
    for kind in ("fluorescence", "stained", "bright-field"):
        total = sum(own == kind for own in kinds.values())
        for name in SPLITS:
            share = sum(kinds[i] == kind for i in splits[name]) / total
            assert share == pytest.approx(FRACTIONS[name], abs=0.05), (kind, name)
    assert {len(splits[name]) for name in SPLITS} == {390, 90, 120}


def test_rare_kinds_appear_in_tune_and_test():
    splits = protocol_splits(listing({"fluorescence": 50, "bright-field": 3}))
    for name in ("tune", "test"):
        assert any(image_id.startswith("bright-field") for image_id in splits[name])
    assert split_counts(3) == {"train": 1, "tune": 1, "test": 1}
    assert split_counts(1) == {"train": 1, "tune": 0, "test": 0}


def test_seeded_and_independent_of_listing_order():
    kinds = listing({"fluorescence": 100, "stained": 20})
    shuffled = list(kinds.items())
    random.Random(1).shuffle(shuffled)
    assert protocol_splits(dict(shuffled)) == protocol_splits(kinds)
    assert protocol_splits(kinds, seed=1)["test"] != protocol_splits(kinds)["test"]


def test_real_zip_split_by_image_statistics(real_zip):
    from pipeline.data.datasets import protocol_refs, training_refs

    splits = protocol_refs(training_refs(real_zip, 0, 0))
    assert {name: len(refs) for name, refs in splits.items()} == {"train": 390, "tune": 90, "test": 120}
