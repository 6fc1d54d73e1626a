"""crc_lightning.evaluation.stats against independent oracles (scipy, sklearn, brute force)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from crc_lightning.evaluation.stats import (
    always_positive_f1,
    baselines,
    clears,
    mean_ci,
    paired_tests,
    permutation_auc_test,
    rank_auc,
)

# 4 patients, 1–2 lesions each (lesion rows: patient, probability)
LESIONS = [("a", 0.9), ("a", 0.7), ("b", 0.4), ("c", 0.8), ("d", 0.2), ("d", 0.55)]
TRUTH = {"a": 1, "b": 0, "c": 1, "d": 0}


def brute_force_p(lesions, truth) -> tuple[float, float]:
    """Share of all N! patient permutations whose AUC ≥ the observed one (sklearn AUC)."""
    pids = [p for p, _ in lesions]
    prob = [q for _, q in lesions]
    patients = sorted(truth)
    obs = roc_auc_score([truth[p] for p in pids], prob)
    hits = total = 0
    for perm in itertools.permutations(patients):
        relabel = dict(zip(patients, [truth[q] for q in perm], strict=True))
        auc = roc_auc_score([relabel[p] for p in pids], prob)
        hits += auc >= obs - 1e-12
        total += 1
    return obs, hits / total


def test_mean_ci_matches_t_formula():
    x = [0.5, 0.7, 0.6, 0.65]
    mean, half, n = mean_ci(x, 0.95)
    assert n == 4
    assert mean == pytest.approx(np.mean(x))
    assert half == pytest.approx(sps.t.ppf(0.975, 3) * np.std(x, ddof=1) / math.sqrt(4))
    assert mean_ci([0.3]) == (0.3, None, 1)
    assert mean_ci([None, 0.2, 0.4])[2] == 2  # undefined values (no positives) are left out
    assert mean_ci([]) == (None, None, 0)


def test_baselines_and_clears():
    p = 0.3
    b = baselines(p, [0.3, 0.5, 0.2])
    assert b["f1"] == pytest.approx(2 * 0.3 / 1.3) == pytest.approx(always_positive_f1(p))
    assert (b["sensitivity"], b["specificity"], b["auc"]) == pytest.approx((0.3, 0.7, 0.5))
    assert b["hamming"] == pytest.approx(np.mean([2 * 0.3 * 0.7, 2 * 0.5 * 0.5, 2 * 0.2 * 0.8]))
    assert clears(0.8, 0.1, 0.6) and not clears(0.8, 0.25, 0.6) and not clears(0.8, None, 0.1)
    assert clears(0.1, 0.05, 0.3, higher_is_better=False)
    assert not clears(0.28, 0.05, 0.3, higher_is_better=False)


def test_rank_auc_equals_sklearn():
    rng = np.random.default_rng(1)
    prob = rng.random(30).round(1)  # ties on purpose
    y = (rng.random((5, 30)) < 0.4).astype(int)
    got = rank_auc(y, sps.rankdata(prob))
    want = [roc_auc_score(row, prob) for row in y]
    np.testing.assert_allclose(got, want)


def test_permutation_exact_equals_brute_force():
    obs, p = brute_force_p(LESIONS, TRUTH)
    res = permutation_auc_test([a for a, _ in LESIONS], [b for _, b in LESIONS], TRUTH, 2000)
    assert res.exact and res.n_permutations == math.comb(4, 2)
    assert res.auc == pytest.approx(obs)
    assert res.p_value == pytest.approx(p)
    assert (res.n_patients, res.n_lesions) == (4, 6)


def test_permutation_other_truth_and_pooled_rows():
    # a patient appearing twice (two seeds) keeps one truth; 1 positive of 4 → C(4,1) = 4
    lesions = [*LESIONS, ("b", 0.95)]
    truth = {"a": 0, "b": 1, "c": 0, "d": 0}
    obs, p = brute_force_p(lesions, truth)
    res = permutation_auc_test([a for a, _ in lesions], [b for _, b in lesions], truth)
    assert res.p_value == pytest.approx(p) and res.auc == pytest.approx(obs)


def test_permutation_monte_carlo():
    rng = np.random.default_rng(0)
    pids = [f"p{i}" for i in range(30) for _ in range(2)]
    truth = {f"p{i}": int(i % 3 == 0) for i in range(30)}
    prob = np.array([0.3 + 0.4 * truth[p] + 0.3 * rng.random() for p in pids])
    res = permutation_auc_test(pids, prob, truth, permutations=500, seed=3)
    assert not res.exact and res.n_permutations == 500
    assert res.p_value == pytest.approx(1 / 501)  # strongly separated: no permutation reaches it
    again = permutation_auc_test(pids, prob, truth, permutations=500, seed=3)
    assert again.p_value == res.p_value
    noise = permutation_auc_test(pids, rng.random(60), truth, permutations=500, seed=3)
    assert 0.002 < noise.p_value <= 1.0
    # b counted like (b+1)/(m+1): p is a multiple of 1/501
    assert (noise.p_value * 501) == pytest.approx(round(noise.p_value * 501))


def test_permutation_undefined_and_errors():
    res = permutation_auc_test(["a", "b"], [0.1, 0.2], {"a": 1, "b": 1})
    assert res.p_value is None and res.auc is None
    with pytest.raises(ValueError, match="without truth"):
        permutation_auc_test(["a", "z"], [0.1, 0.2], {"a": 1, "b": 0})


def test_paired_tests_equal_scipy():
    a = [0.61, 0.55, 0.70, 0.64, 0.58]
    b = [0.52, 0.50, 0.66, 0.60, 0.49]
    got = paired_tests(a, b)
    t = sps.ttest_rel(a, b)
    w = sps.wilcoxon(a, b)
    assert got["t"] == pytest.approx(t.statistic) and got["p_ttest"] == pytest.approx(t.pvalue)
    assert got["w"] == pytest.approx(w.statistic) and got["p_wilcoxon"] == pytest.approx(w.pvalue)
    assert got["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    small = paired_tests(a[:3], b[:3])
    assert small["p_wilcoxon"] is None
    assert small["p_ttest"] == pytest.approx(sps.ttest_rel(a[:3], b[:3]).pvalue)
