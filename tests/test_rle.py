"""Kaggle run-length encoding: column-major, 1-based, round trips."""
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from submission import rle


def test_known_vector_is_column_major_and_one_based():
    mask = np.zeros((3, 3), bool)
    mask[0, 0] = mask[1, 0] = True  # pixels 1, 2 (first column, top to bottom)
    mask[2, 2] = True  # pixel 9
    assert rle.encode(mask) == "1 2 9 1"


def test_run_across_columns():
    mask = np.zeros((2, 2), bool)
    mask[1, 0] = mask[0, 1] = True  # pixels 2 and 3 are consecutive in column-major order
    assert rle.encode(mask) == "2 2"


def test_empty_mask_is_empty_string():
    assert rle.encode(np.zeros((4, 4), bool)) == ""
    assert not rle.decode("", 4, 4).any()


@settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 20), st.integers(1, 20))))
def test_round_trip(mask):
    assert (rle.decode(rle.encode(mask), *mask.shape) == mask).all()


@settings(max_examples=100, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 15), st.integers(1, 15)), elements=st.integers(0, 4)))
def test_label_encoding_matches_per_mask_encoding(labels):
    expected = [rle.encode(labels == label) for label in np.unique(labels) if label > 0]
    assert rle.encode_labels(labels) == expected
