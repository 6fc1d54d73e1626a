"""Late fusion: the convex mix, and w chosen by validation AUC over the grid (ties → 0.5),
checked against sklearn's AUC on hand-built lesion probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from crc_lightning.models.fusion import WEIGHT_GRID, choose_weights, fuse, weight_scores

Y = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0], [0, 1]])
GOOD = np.where(Y == 1, 0.8, 0.2) + np.linspace(0, 0.05, 6)[:, None]  # ranks every lesion right
BAD = 1.0 - GOOD  # ranks every lesion wrong


def test_fuse_is_the_convex_mix_per_class() -> None:
    got = fuse(GOOD, BAD, [0.3, 1.0])
    np.testing.assert_allclose(got[:, 0], 0.3 * GOOD[:, 0] + 0.7 * BAD[:, 0])
    np.testing.assert_allclose(got[:, 1], GOOD[:, 1])
    with pytest.raises(ValueError, match="weights"):
        fuse(GOOD, BAD, [0.5])


def test_the_better_member_gets_the_weight() -> None:
    # BAD = 1 − GOOD: w·GOOD + (1 − w)·BAD ranks like GOOD for every w > 0.5 (AUC 1), like BAD
    # below; the plateau's weight closest to 0.5 is 0.6 (deep) or 0.4 (radiomics)
    assert choose_weights(Y, GOOD, BAD, ["A", "B"]) == {"A": 0.6, "B": 0.6}
    assert choose_weights(Y, BAD, GOOD, ["A", "B"]) == {"A": 0.4, "B": 0.4}
    # a member that is only noise: the informative one gets all the weight it can
    noise = np.random.default_rng(1).uniform(size=Y.shape)
    w = choose_weights(Y, GOOD, noise, ["A", "B"])["A"]
    assert w > 0.5 and weight_scores(Y, GOOD, noise)[WEIGHT_GRID.index(w)].mean() == 1.0
    # per class: class A trusts deep, class B radiomics
    deep = np.column_stack([GOOD[:, 0], BAD[:, 1]])
    rad = np.column_stack([BAD[:, 0], GOOD[:, 1]])
    assert choose_weights(Y, deep, rad, ["A", "B"], per_class=True) == {"A": 0.6, "B": 0.4}


def test_scores_are_sklearn_aucs_and_ties_go_to_one_half() -> None:
    rng = np.random.default_rng(0)
    deep, rad = rng.uniform(size=Y.shape), rng.uniform(size=Y.shape)
    scores = weight_scores(Y, deep, rad)
    for i, w in enumerate(WEIGHT_GRID):
        for c in range(2):
            assert scores[i, c] == pytest.approx(
                roc_auc_score(Y[:, c], w * deep[:, c] + (1 - w) * rad[:, c])
            )
    # identical members: every w ties → 0.5
    assert choose_weights(Y, GOOD, GOOD, ["A", "B"]) == {"A": 0.5, "B": 0.5}
    # a class with one outcome on validation has no AUC: 0.5 per class; shared uses the others
    y = Y.copy()
    y[:, 1] = 1
    assert choose_weights(y, GOOD, BAD, ["A", "B"], per_class=True) == {"A": 0.6, "B": 0.5}
    assert choose_weights(y, GOOD, BAD, ["A", "B"]) == {"A": 0.6, "B": 0.6}
    assert choose_weights(np.ones_like(Y), GOOD, BAD, ["A", "B"]) == {"A": 0.5, "B": 0.5}


def test_a_plateau_of_best_weights_picks_the_one_closest_to_one_half() -> None:
    # deep ranks perfectly; radiomics is constant, so every w > 0 ranks perfectly too
    rad = np.full_like(GOOD, 0.5)
    assert choose_weights(Y, GOOD, rad, ["A", "B"]) == {"A": 0.5, "B": 0.5}
    # an exact tie on both sides of 0.5 (0.4 and 0.6 best, 0.5 not): the smaller one
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.5, 0.9, 0.4, 0.3, 0.2, 0.1])
    from crc_lightning.models.fusion import _pick

    assert _pick(scores, WEIGHT_GRID) == 0.4
