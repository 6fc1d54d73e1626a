"""Median balancing (paper Sec. IV.C): exact median per assigned class, under- and over-sampling."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from crc_lightning.data.balance import NO_CLASS, assign_groups, median_balance, median_target


def _single_label(counts: list[int]) -> np.ndarray:
    y = np.zeros((sum(counts), len(counts)), dtype=np.int64)
    y[np.arange(len(y)), np.repeat(np.arange(len(counts)), counts)] = 1
    return y


def _rarest_oracle(y: np.ndarray) -> list[int]:
    """Plain-loop reference: each row's positive class with the fewest positives (lowest index on ties)."""
    counts = y.sum(axis=0)
    out = []
    for row in y:
        pos = [c for c in range(y.shape[1]) if row[c]]
        out.append(min(pos, key=lambda c: (counts[c], c)) if pos else NO_CLASS)
    return out


def test_hand_example_10_4_6_gives_6_each():
    y = _single_label([10, 4, 6])
    idx = median_balance(y, np.random.default_rng(0))
    assert len(idx) == 18
    np.testing.assert_array_equal(y[idx].sum(axis=0), [6, 6, 6])
    cls = np.argmax(y, axis=1)
    # class 0 (10 images) is sub-sampled: 6 distinct originals, no repeats
    c0 = idx[cls[idx] == 0]
    assert len(np.unique(c0)) == 6
    # class 1 (4 images) is over-sampled: all 4 originals kept, 2 repeats
    c1 = idx[cls[idx] == 1]
    assert set(c1) == set(np.flatnonzero(cls == 1)) and len(c1) == 6
    # class 2 (6 images) is left as is
    np.testing.assert_array_equal(np.sort(idx[cls[idx] == 2]), np.flatnonzero(cls == 2))


def test_multilabel_assigned_counts_equal_median_exactly():
    rng = np.random.default_rng(3)
    y = (rng.random((300, 5)) < [0.35, 0.05, 0.04, 0.15, 0.4]).astype(np.int64)
    target = statistics.median(y.sum(axis=0).tolist())
    assert median_target(y) == int(np.floor(target + 0.5))
    groups = np.asarray(_rarest_oracle(y))
    np.testing.assert_array_equal(assign_groups(y), groups)
    for seed in range(5):
        idx = median_balance(y, np.random.default_rng(seed))
        for g in np.unique(groups):
            assert np.sum(groups[idx] == g) == median_target(y), g
        assert np.all(np.diff(idx) >= 0), "sorted indices"


def test_rarest_positive_class_wins():
    # class counts: 0 → 3, 1 → 1, 2 → 2; row 0 is positive for 0 and 1 → group 1
    y = np.array([[1, 1, 0], [1, 0, 1], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(assign_groups(y), [1, 2, 0, 2])


def test_even_number_of_classes_rounds_half_up_and_empty_class_is_ignored():
    assert median_target(_single_label([3, 4])) == 4  # median 3.5
    assert median_target(_single_label([10, 0, 4, 6])) == 6  # the empty class is not counted
    y = _single_label([10, 0, 4, 6])
    idx = median_balance(y, np.random.default_rng(1))
    np.testing.assert_array_equal(y[idx].sum(axis=0), [6, 0, 6, 6])


def test_rows_without_positive_class_form_their_own_group():
    y = np.vstack([_single_label([5, 3, 9]), np.zeros((2, 3), dtype=np.int64)])
    idx = median_balance(y, np.random.default_rng(0))
    none = np.flatnonzero(y.sum(axis=1) == 0)
    assert np.isin(idx, none).sum() == 5  # 2 rows over-sampled to the median 5
    np.testing.assert_array_equal(y[idx].sum(axis=0), [5, 5, 5])


def test_deterministic_given_rng_and_varies_with_seed():
    y = _single_label([20, 5, 9, 13])
    a = median_balance(y, np.random.default_rng(42))
    b = median_balance(y, np.random.default_rng(42))
    np.testing.assert_array_equal(a, b)
    c = median_balance(y, np.random.default_rng(43))
    assert not np.array_equal(a, c)


def test_degenerate_and_bad_inputs():
    assert len(median_balance(np.zeros((0, 3)), np.random.default_rng(0))) == 0
    np.testing.assert_array_equal(
        median_balance(np.zeros((4, 3)), np.random.default_rng(0)), np.arange(4)
    )
    with pytest.raises(ValueError, match="0/1"):
        median_balance(np.array([[2, 0]]), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        median_balance(np.array([1, 0]), np.random.default_rng(0))
