"""crc_lightning.evaluation.stats against independent oracles (hand values, scipy, sklearn,
statsmodels, brute force)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import optimize, special
from scipy import stats as sps
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from statsmodels.stats.multitest import multipletests

from crc_lightning.evaluation.stats import (
    MIN_WILCOXON,
    baselines,
    beats,
    block_permutation_test,
    bootstrap_weights,
    calibration,
    choose_threshold,
    corrected_paired_t,
    corrected_t,
    holm,
    net_benefit,
    percentile_interval,
    rank_auc,
    treat_all_net_benefit,
    wilcoxon_paired,
)

# 4 patients, 1–2 lesions each (lesion rows: patient, probability)
LESIONS = [("a", 0.9), ("a", 0.7), ("b", 0.4), ("c", 0.8), ("d", 0.2), ("d", 0.55)]
TRUTH = {"a": 1, "b": 0, "c": 1, "d": 0}


# ------------------------------------------------------------------------------ intervals
def test_corrected_t_equals_hand_formula():
    x = [0.61, 0.55, 0.70, 0.64, 0.58, 0.66, 0.59, 0.62, 0.57, 0.68]  # 2 repeats × 5 folds
    ratio = 1 / 4  # k = 5 → n_test/n_train = 1/(k−1)
    iv = corrected_t(x, ratio, 0.95)
    mean = sum(x) / 10
    s2 = sum((v - mean) ** 2 for v in x) / 9
    half = 2.2621571627409915 * math.sqrt((1 / 10 + 1 / 4) * s2)  # t_{0.975, 9}
    assert iv.half == pytest.approx(half, rel=1e-9)
    assert (iv.low, iv.high) == pytest.approx((mean - half, mean + half))
    assert iv.method == "corrected t" and iv.n == 10
    # the uncorrected t interval is the special case ratio = 0, = scipy's
    plain = corrected_t(x, 0.0, 0.95)
    lo, hi = sps.t.interval(0.95, 9, loc=mean, scale=sps.sem(x))
    assert (plain.low, plain.high) == pytest.approx((lo, hi))
    # centred elsewhere (the report's mean of pooled repeats), same half-width
    assert corrected_t(x, ratio, center=0.6).low == pytest.approx(0.6 - half)


def test_corrected_t_clips_and_needs_two_values():
    iv = corrected_t([0.98, 1.0, 0.9], 0.25)
    assert iv.high == 1.0 and iv.half > 1.0 - iv.center  # clipped to the metric's range
    assert iv.low >= 0.0
    none = corrected_t([0.7], 0.25)
    assert none.low is None and none.center == 0.7 and none.method == "none"
    assert corrected_t([None, 0.6, float("nan"), 0.7], 0.1).n == 2


def test_bootstrap_weights_and_percentile():
    w = bootstrap_weights(7, 500, seed=3)
    assert w.shape == (500, 7) and (w.sum(axis=1) == 7).all()
    assert np.array_equal(w, bootstrap_weights(7, 500, seed=3))
    assert abs(w.mean() - 1.0) < 0.05
    samples = np.linspace(0, 1, 1001)
    iv = percentile_interval(samples, 0.5, 0.95)
    assert (iv.low, iv.high) == pytest.approx(np.quantile(samples, [0.025, 0.975]))
    assert percentile_interval(np.full(10, np.nan), 0.5).low is None


# ------------------------------------------------------------------------------ baselines
def test_baselines_are_the_best_image_blind_rules():
    q = [0.3, 0.6, 0.1]
    b = baselines(q, 0)
    assert b["sensitivity"] == 1.0  # always-positive
    assert b["specificity"] == 1.0  # always-negative
    assert b["auc"] == b["balanced_accuracy"] == 0.5
    assert b["f1"] == pytest.approx(2 * 0.3 / 1.3)
    assert b["f1_macro"] == pytest.approx(np.mean([2 * v / (1 + v) for v in q]))
    assert b["hamming"] == pytest.approx(np.mean([0.3, 0.4, 0.1]))  # per-class majority
    assert b["brier"] == pytest.approx(0.3 * 0.7)
    # oracle: enumerate the image-blind rules on a test set of prevalence 3/10
    y = np.array([1] * 3 + [0] * 7)
    rules = {"pos": np.ones(10), "neg": np.zeros(10)}
    f1 = {k: 2 * (r * y).sum() / (r.sum() + y.sum()) for k, r in rules.items()}
    assert max(f1.values()) == pytest.approx(baselines([0.3], 0)["f1"])
    ham = {k: np.mean(r != y) for k, r in rules.items()}
    assert min(ham.values()) == pytest.approx(baselines([0.3], 0)["hamming"])
    briers = [np.mean((c - y) ** 2) for c in np.linspace(0, 1, 101)]
    assert min(briers) == pytest.approx(baselines([0.3], 0)["brier"])


def test_float_tie_does_not_beat_the_baseline():
    p = 3 / 5
    f1_always_positive = 2 * 3 / (2 * 3 + 2)  # tp 3, fp 2, fn 0 → 0.75
    base = baselines([p], 0)["f1"]
    assert base == 0.7499999999999999 and f1_always_positive == 0.75  # the paper's trap
    assert f1_always_positive > base  # a strict `>` would call this a win
    assert not beats(f1_always_positive, f1_always_positive, base)
    assert beats(0.80, 0.9, base) and not beats(0.80, 0.9, base, margin=0.06)
    assert beats(0.1, 0.2, 0.3, higher_is_better=False)
    assert not beats(0.1, 0.3 - 1e-12, 0.3, higher_is_better=False)
    assert not beats(None, None, 0.5)


# ------------------------------------------------------------------------------ thresholds
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_youden_threshold_equals_roc_curve_maximum(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(40) < 0.4).astype(int)
    p = np.clip(rng.random(40) * 0.7 + 0.3 * y, 0, 1).round(2)
    t = choose_threshold(y, p, "youden")
    fpr, tpr, _ = roc_curve(y, p)
    best_j = np.max(tpr - fpr)
    pred = p > t
    j = pred[y == 1].mean() - pred[y == 0].mean()
    assert j == pytest.approx(best_j)
    f1_t = choose_threshold(y, p, "f1")
    from sklearn.metrics import f1_score

    grid = max(f1_score(y, p > c, zero_division=0) for c in np.unique(np.r_[0, p]))
    assert f1_score(y, p > f1_t) == pytest.approx(grid)
    assert choose_threshold([1, 1], [0.2, 0.4]) is None


# ------------------------------------------------------------------------------ calibration
def test_calibration_slope_and_intercept_match_independent_fits():
    rng = np.random.default_rng(4)
    p = rng.uniform(0.05, 0.95, 300)
    y = (rng.random(300) < special.expit(0.3 + 0.6 * special.logit(p))).astype(int)
    cal = calibration(y, p)
    lp = special.logit(p)
    x = np.c_[np.ones_like(lp), lp]  # score equations of the unpenalised logistic MLE
    ab = optimize.root(lambda b: x.T @ (y - special.expit(x @ b)), [0.0, 1.0], tol=1e-12).x
    assert cal["slope"] == pytest.approx(ab[1], rel=1e-6)
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(lp[:, None], y)
    assert cal["slope"] == pytest.approx(lr.coef_[0, 0], rel=1e-3)
    a = optimize.brentq(lambda a: np.sum(y - special.expit(a + lp)), -5, 5)  # score equation
    assert cal["intercept"] == pytest.approx(a, abs=1e-6)
    assert calibration([1, 1, 1], [0.2, 0.3, 0.4])["slope"] is None
    sep = calibration([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])  # perfectly separated → no slope
    assert sep["slope"] is None


# ------------------------------------------------------------------------------ decision curves
def test_net_benefit_hand_values():
    y = [1, 1, 0, 0, 0]
    p = [0.9, 0.4, 0.6, 0.2, 0.1]
    # t = 0.5: act for 0.9 (TP) and 0.6 (FP) → 1/5 − 1/5 · 1 = 0
    # t = 0.3: act for 0.9, 0.4 (TP), 0.6 (FP) → 2/5 − 1/5 · 3/7
    # t = 0.95: nobody → 0
    got = net_benefit(y, p, [0.5, 0.3, 0.95])
    assert got == pytest.approx([0.0, 2 / 5 - (1 / 5) * (3 / 7), 0.0])
    assert treat_all_net_benefit(0.4, [0.2, 0.5]) == pytest.approx([0.4 - 0.6 * 0.25, -0.2])
    with pytest.raises(ValueError, match="strictly between"):
        net_benefit(y, p, [0.0])


# ------------------------------------------------------------------------------ permutation test
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


def _as_blocks(lesions, truth):
    patients = sorted(truth)
    code = {p: i for i, p in enumerate(patients)}
    return (
        [[code[p] for p, _ in lesions]],
        [[0] * len(lesions)],
        [[q for _, q in lesions]],
        [[truth[p]] for p in patients],
    )


def test_rank_auc_equals_sklearn():
    rng = np.random.default_rng(1)
    prob = rng.random(30).round(1)  # ties on purpose
    y = (rng.random((5, 30)) < 0.4).astype(int)
    got = rank_auc(y, sps.rankdata(prob))
    want = [roc_auc_score(row, prob) for row in y]
    np.testing.assert_allclose(got, want)


def test_permutation_exact_equals_brute_force():
    obs, p = brute_force_p(LESIONS, TRUTH)
    res = block_permutation_test(*_as_blocks(LESIONS, TRUTH), permutations=2000)
    assert res.exact and res.n_permutations == math.comb(4, 2)
    assert res.statistic == pytest.approx(obs) and res.p_value == pytest.approx(p)
    assert (res.n_patients, res.n_rows) == (4, 6)


def test_permutation_mean_over_repeats_equals_brute_force():
    """Two repeats testing the same patients: T = mean of the two AUCs, one π for both."""
    rng = np.random.default_rng(5)
    truth = {"a": 1, "b": 0, "c": 1, "d": 0, "e": 0}
    patients = sorted(truth)
    scores = [rng.random(5), rng.random(5)]

    def stat(t):
        return np.mean([roc_auc_score([t[p] for p in patients], s) for s in scores])

    obs = stat(truth)
    hits = [
        stat(dict(zip(patients, [truth[q] for q in perm], strict=True))) >= obs - 1e-12
        for perm in itertools.permutations(patients)
    ]
    res = block_permutation_test(
        [list(range(5))] * 2, [[0] * 5] * 2, scores, [[truth[p]] for p in patients]
    )
    assert res.statistic == pytest.approx(obs) and res.p_value == pytest.approx(np.mean(hits))


def test_lesion_level_permutation_moves_whole_patients_within_strata():
    """Lesion truths differ inside patient 0; only patients with equally many lesions swap."""
    blocks = [[1, 0], [0, 0], [1, 1], [0]]  # patients 0–2 have 2 lesions, patient 3 has 1
    rows = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]
    scores = [0.9, 0.3, 0.4, 0.2, 0.8, 0.7, 0.6]
    pat, pos = [r[0] for r in rows], [r[1] for r in rows]

    def stat(perm):  # perm: patient → patient whose block it receives
        y = [blocks[perm[i]][k] for i, k in rows]
        return roc_auc_score(y, scores)

    obs = stat([0, 1, 2, 3])
    perms = [[*p, 3] for p in itertools.permutations(range(3))]  # patient 3 cannot move
    want = np.mean([stat(p) >= obs - 1e-12 for p in perms])
    res = block_permutation_test([pat], [pos], [scores], blocks, permutations=20000, seed=1)
    assert res.n_fixed == 1 and not res.exact
    assert res.statistic == pytest.approx(obs)
    assert res.p_value == pytest.approx(want, abs=0.01)  # Monte Carlo over the 6 permutations


def test_permutation_monte_carlo():
    rng = np.random.default_rng(0)
    n = 30
    truth = [[int(i % 3 == 0)] for i in range(n)]
    pat = [i for i in range(n) for _ in range(2)]
    prob = np.array([0.3 + 0.4 * truth[p][0] + 0.3 * rng.random() for p in pat])
    args = ([pat], [[0] * len(pat)], [prob], [[t[0]] for t in truth])
    # rows of one patient repeat its single truth: give each row position 0 of the block
    res = block_permutation_test(*args, permutations=500, seed=3)
    assert not res.exact and res.n_permutations == 500
    assert res.p_value == pytest.approx(1 / 501)
    assert block_permutation_test(*args, permutations=500, seed=3).p_value == res.p_value
    noise = block_permutation_test(
        [pat], [[0] * len(pat)], [rng.random(60)], args[3], permutations=500, seed=3
    )
    assert 0.002 < noise.p_value <= 1.0
    assert noise.p_value * 501 == pytest.approx(round(noise.p_value * 501))


def test_permutation_undefined_and_errors():
    res = block_permutation_test([[0, 1]], [[0, 0]], [[0.1, 0.2]], [[1], [1]])
    assert res.p_value is None and res.statistic is None
    with pytest.raises(ValueError, match="outside"):
        block_permutation_test([[0, 5]], [[0, 0]], [[0.1, 0.2]], [[1], [0]])


# ------------------------------------------------------------------------------ paired, Holm
def test_corrected_paired_t_hand_value():
    d = [0.05, 0.02, 0.08, -0.01, 0.04, 0.06, 0.03, 0.00, 0.07, 0.05]
    ratio = 1 / 4
    got = corrected_paired_t(d, ratio)
    m = np.mean(d)
    t = m / math.sqrt((1 / 10 + ratio) * np.var(d, ddof=1))
    assert got["t"] == pytest.approx(t) and got["n_splits"] == 10
    assert got["p"] == pytest.approx(2 * sps.t.sf(abs(t), 9))
    # ratio 0 is scipy's one-sample t on the differences
    plain = corrected_paired_t(d, 0.0)
    assert plain["p"] == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue)
    assert corrected_paired_t([0.1, 0.1], 0.2)["p"] is None  # no spread
    assert corrected_paired_t([0.1], 0.2)["p"] is None


def test_wilcoxon_only_from_six_pairs():
    assert MIN_WILCOXON == 6
    # n = 5, every difference positive: the smallest attainable two-sided p
    five = sps.wilcoxon([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert five.pvalue == pytest.approx(0.0625) and five.pvalue > 0.05
    assert wilcoxon_paired([1, 2, 3, 4, 5], [0] * 5)["p"] is None
    a, b = [0.61, 0.55, 0.70, 0.64, 0.58, 0.66], [0.52, 0.50, 0.66, 0.60, 0.49, 0.60]
    got = wilcoxon_paired(a, b)
    assert got["p"] == pytest.approx(sps.wilcoxon(a, b).pvalue) and got["p"] < 0.05


def test_holm_equals_hand_values_and_statsmodels():
    p = [0.01, 0.04, 0.03, 0.005]
    # hand: sorted 0.005, 0.01, 0.03, 0.04 × (4, 3, 2, 1) = 0.02, 0.03, 0.06, 0.04 → cummax
    want = {3: 0.02, 0: 0.03, 2: 0.06, 1: 0.06}
    got = holm(p)
    assert got == pytest.approx([want[i] for i in range(4)])
    assert got == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert holm([0.01, None, 0.04]) == pytest.approx([0.02, None, 0.04])
