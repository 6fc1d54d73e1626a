"""Median balancing (paper Sec. IV.C): exact median per assigned class, under- and over-sampling."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from crc_lightning.data.balance import (
    NO_CLASS,
    assign_groups,
    lesion_weights,
    median_balance,
    median_target,
)


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


# --------------------------------------------------------------------------- lesion-level sampling
# Hand-built: class counts [6, 2, 4] → median 4. Group 0 = rows of lesions a (4 slices), b (1);
# group 1 = c, d (1 each); group 2 = e (3 slices) and f, whose BRAF+OTHER row is assigned to
# OTHER (4 positives) rather than KRAS (6).
_Y = np.array([[1, 0, 0]] * 5 + [[0, 1, 0]] * 2 + [[0, 0, 1]] * 3 + [[1, 0, 1]])
_LESIONS = np.array(list("aaaab") + list("cd") + list("eee") + ["f"])
# expected draws per epoch, by hand: each group's budget 4 split equally over its 2 lesions
_PER_LESION_BALANCED = {"a": 2.0, "b": 2.0, "c": 2.0, "d": 2.0, "e": 2.0, "f": 2.0}


def _per_lesion(weights: np.ndarray) -> dict[str, float]:
    return {k: float(weights[_LESIONS == k].sum()) for k in np.unique(_LESIONS)}


def test_lesion_weights_give_every_lesion_of_a_group_its_equal_share_by_hand():
    w = lesion_weights(_Y, _LESIONS, balance=True)
    assert _per_lesion(w) == pytest.approx(_PER_LESION_BALANCED)
    # a lesion's share is split evenly over its slices: a's 4 slices get 0.5 each, e's 3 get 2/3
    np.testing.assert_allclose(w[:4], 0.5)
    np.testing.assert_allclose(w[7:10], 2.0 / 3.0)
    # the epoch keeps the balanced set's length and each group its median budget
    assert w.sum() == pytest.approx(len(median_balance(_Y, np.random.default_rng(0))))
    for g in np.unique(assign_groups(_Y)):
        assert w[assign_groups(_Y) == g].sum() == pytest.approx(median_target(_Y))


def test_lesion_weights_without_balancing_make_every_lesion_equal():
    w = lesion_weights(_Y, _LESIONS, balance=False)
    n, n_lesions = len(_Y), len(np.unique(_LESIONS))
    assert w.sum() == pytest.approx(n)
    assert _per_lesion(w) == pytest.approx(dict.fromkeys("abcdef", n / n_lesions))


def test_weighted_sampler_draws_each_lesion_as_often_as_the_weights_say():
    """Empirical oracle: many epochs of torch's WeightedRandomSampler with these weights."""
    w = lesion_weights(_Y, _LESIONS, balance=True)
    epochs, per_epoch = 4000, round(float(w.sum()))
    sampler = WeightedRandomSampler(torch.as_tensor(w), per_epoch * epochs, replacement=True,
                                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    drawn = _LESIONS[np.fromiter(iter(sampler), dtype=np.int64)]
    for lesion, expected in _PER_LESION_BALANCED.items():
        # 2 expected draws an epoch: a binomial over 48 000 draws, sd ≈ 0.018 an epoch
        assert np.mean(drawn == lesion) * per_epoch == pytest.approx(expected, abs=0.08)
    # lesion a (4 slices) is drawn as often as b (1 slice), not 4× as image-level draws would
    assert np.sum(drawn == "a") == pytest.approx(np.sum(drawn == "b"), rel=0.05)


def test_lesion_weights_bad_and_degenerate_inputs():
    with pytest.raises(ValueError, match="one id per row"):
        lesion_weights(_Y, _LESIONS[:-1])
    assert lesion_weights(np.zeros((0, 3)), np.array([])).shape == (0,)
    # no positive anywhere: nothing to balance on, every lesion equal over the n rows
    w = lesion_weights(np.zeros((3, 2), dtype=int), np.array(["x", "x", "y"]))
    np.testing.assert_allclose(w, [0.75, 0.75, 1.5])
