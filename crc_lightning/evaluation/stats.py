"""Statistics of the experiment report: corrected CIs, image-blind baselines, thresholds, calibration,
decision curves, permutation and paired tests, Holm.

Why these choices (a few dozen patients, k folds × a few repeats — the paper's setting):

* :func:`corrected_t` — Nadeau & Bengio (2003) corrected resampled t: the J values of a metric, one
  per train/test split, have variance ``(1/J + n_test/n_train)·s²`` instead of ``s²/J`` because
  the splits share most of their training patients (and, in repeated k-fold, every patient is
  tested once per repeat). In k-fold the ratio is ``1/(k−1)`` (Bouckaert & Frank 2004, the
  "corrected repeated k-fold cv test"), in a hold-out ``n_test/n_train``. The values are *per
  split* (per fold): a repeat's pooled out-of-fold metric tests every patient, so repeats of one
  cohort differ only by the training randomness and their spread says nothing about the spread
  over new patients — ``benchmarks/null_calibration.py`` shows a t over such repeats claiming to
  beat chance in up to 41 % of no-signal sweeps, the per-split corrected t in ≤ 0.9 %.
* :func:`percentile_interval` over :func:`bootstrap_weights` — the patient-clustered bootstrap
  (patients resampled with replacement, each with all its lesions and crops) for the one case
  without two splits: a single hold-out repeat.
* CIs are clipped to the metric's range (``[0, 1]`` for every metric the report tabulates).
* :func:`baselines` — the best value an image-blind rule (always-positive, always-negative,
  per-class majority, prevalence-random) reaches on the same test sets, class prevalence ``p``:
  AUC 0.5 and balanced accuracy 0.5 (every image-blind rule); sensitivity 1.0 (always-positive);
  specificity 1.0 (always-negative); F1 2p/(1+p) (always-positive, ≥ prevalence-random's p and
  always-negative's 0); macro F1 the mean of the classes' 2p/(1+p); Hamming loss the mean over
  classes of min(p, 1−p) (per-class majority); Brier p(1−p) (the constant p).
* :func:`beats` — a value beats its baseline only when the CI's far end clears it by more than
  ``tolerance`` (1e-9: float noise, e.g. 0.75 vs 0.7499999999999999) plus ``margin``.
* :func:`block_permutation_test` — the table's statistic (mean over repeats of the pooled AUC) under
  permutations of the patients' truths (the patient is the exchangeable unit).
* :func:`corrected_paired_t` — the same correction on the split-wise differences of two variants
  trained on the same splits (same seeds = same splits); :func:`wilcoxon_paired` on the repeats'
  differences only from n ≥ 6 pairs (below that its smallest two-sided p is ≥ 0.0625).
* :func:`holm` — ``statsmodels.stats.multitest.multipletests(method="holm")``.
* :func:`calibration` — logistic recalibration with ``statsmodels`` GLM (binomial): slope = b in
  logit P(y) = a + b·logit(p); calibration-in-the-large = a with b fixed at 1 (offset). statsmodels,
  not sklearn: it fits the unpenalised MLE and takes an offset, which sklearn's LogisticRegression
  does not.
* :func:`net_benefit` — decision-curve analysis (Vickers & Elkin 2006): ``TP/n − FP/n · t/(1−t)``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = [
    "MIN_WILCOXON",
    "TOLERANCE",
    "Interval",
    "PermutationResult",
    "baselines",
    "beats",
    "block_permutation_test",
    "bootstrap_weights",
    "calibration",
    "choose_threshold",
    "corrected_paired_t",
    "corrected_t",
    "holm",
    "net_benefit",
    "percentile_interval",
    "rank_auc",
    "treat_all_net_benefit",
    "wilcoxon_paired",
]

TOLERANCE = 1e-9
MIN_WILCOXON = 6  # n = 5: smallest two-sided exact p = 2/2^5 = 0.0625 > 0.05


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray(
        [float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=float
    )


# ------------------------------------------------------------------------------ intervals
@dataclass(frozen=True)
class Interval:
    center: float | None
    low: float | None
    high: float | None
    half: float | None  # half-width before clipping (None without an interval)
    n: int  # values the interval is computed from (splits, or bootstrap resamples)
    method: str  # "corrected t" | "patient bootstrap" | "none"


def _clip(x: float, bounds: tuple[float, float] | None) -> float:
    return x if bounds is None else float(min(max(x, bounds[0]), bounds[1]))


def corrected_t(
    values: Sequence[float | None],
    test_train_ratio: float,
    ci: float = 0.95,
    center: float | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> Interval:
    """Nadeau–Bengio corrected resampled t interval of the mean of per-split ``values``.

    ``half = t_{(1+ci)/2, J−1} · sqrt((1/J + ratio) · s²)``, s² with ddof 1 over the J finite
    values. ``center`` defaults to their mean (the report passes the mean of the repeats' pooled
    metrics). Ends clipped to ``bounds``; fewer than 2 values: no interval."""
    x = _finite(values)
    n = int(x.size)
    c = (float(x.mean()) if n else None) if center is None else float(center)
    if n < 2 or c is None:
        return Interval(c, None, None, None, n, "none")
    if test_train_ratio < 0:
        raise ValueError("test/train ratio must be ≥ 0")
    half = float(
        sps.t.ppf((1.0 + ci) / 2.0, n - 1) * math.sqrt((1.0 / n + test_train_ratio) * x.var(ddof=1))
    )
    return Interval(c, _clip(c - half, bounds), _clip(c + half, bounds), half, n, "corrected t")


def bootstrap_weights(n_clusters: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n_clusters]`` multinomial counts: each row one resample of the clusters
    (patients) with replacement, the same size as the original."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot)


def percentile_interval(
    samples: Sequence[float],
    center: float | None,
    ci: float = 0.95,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    min_defined: float = 0.5,
) -> Interval:
    """Percentile interval of bootstrap ``samples`` (NaN = undefined in that resample: none when
    fewer than ``min_defined`` of them are defined)."""
    x = np.asarray(samples, dtype=float)
    ok = x[np.isfinite(x)]
    if center is None or not x.size or ok.size < min_defined * x.size or ok.size < 2:
        return Interval(center, None, None, None, int(ok.size), "none")
    lo, hi = np.quantile(ok, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    half = float((hi - lo) / 2.0)
    return Interval(
        float(center), _clip(float(lo), bounds), _clip(float(hi), bounds), half, int(ok.size),
        "patient bootstrap",
    )  # fmt: skip


# ------------------------------------------------------------------------------ baselines
def baselines(prevalences: Sequence[float], focus: int) -> dict[str, float]:
    """Best image-blind value of each report metric (module docstring) from the test sets'
    class prevalences; the focus-class metrics use ``prevalences[focus]``."""
    q = np.asarray(prevalences, dtype=float)
    p = float(q[focus])
    ap_f1 = 2.0 * q / (1.0 + q)
    return {
        "auc": 0.5,
        "auc_weighted": 0.5,
        "f1": float(ap_f1[focus]),
        "f1_macro": float(ap_f1.mean()),
        "sensitivity": 1.0,
        "specificity": 1.0,
        "balanced_accuracy": 0.5,
        "hamming": float(np.minimum(q, 1.0 - q).mean()),
        "brier": p * (1.0 - p),
    }


def beats(
    low: float | None,
    high: float | None,
    baseline: float,
    higher_is_better: bool = True,
    tolerance: float = TOLERANCE,
    margin: float = 0.0,
) -> bool:
    """True when the whole CI is beyond ``baseline`` by more than ``tolerance + margin``."""
    gap = float(tolerance) + float(margin)
    if higher_is_better:
        return low is not None and low > baseline + gap
    return high is not None and high < baseline - gap


# ------------------------------------------------------------------------------ thresholds
def choose_threshold(y: Sequence[int], p: Sequence[float], rule: str = "youden") -> float | None:
    """The threshold (positive = p > t) maximising Youden's J (sens + spec − 1) or F1 on (y, p).

    Candidates: 0, 1 and the midpoints between consecutive distinct scores; ties go to the
    candidate nearest 0.5. None when y lacks positives or negatives (the caller keeps 0.5)."""
    if rule not in ("youden", "f1"):
        raise ValueError(f"threshold rule {rule!r}: choose youden or f1")
    y = np.asarray(y).astype(int)
    s = np.asarray(p, dtype=float)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return None
    u = np.unique(s)
    cand = np.unique(np.concatenate([[0.0, 1.0], (u[1:] + u[:-1]) / 2.0]))
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    tp = n1 - np.searchsorted(pos, cand, side="right")  # positives with p > t
    fp = n0 - np.searchsorted(neg, cand, side="right")
    if rule == "youden":
        value = tp / n1 + (n0 - fp) / n0 - 1.0
    else:
        fn = n1 - tp
        value = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    best = np.flatnonzero(value >= value.max() - 1e-12)
    return float(cand[best[np.argmin(np.abs(cand[best] - 0.5))]])


# ------------------------------------------------------------------------------ calibration
def calibration(y: Sequence[int], p: Sequence[float], eps: float = 1e-6) -> dict[str, Any]:
    """Calibration slope and intercept (calibration-in-the-large) by logistic recalibration.

    ``slope`` = b of ``logit P(y=1) = a + b·logit(p)``; ``intercept`` = a of
    ``logit P(y=1) = a + logit(p)`` (offset; 0 = the mean predicted risk matches the event
    rate). Probabilities are clipped to [eps, 1−eps] before the logit. None where y is constant or
    the fit separates perfectly."""
    from statsmodels.genmod import families
    from statsmodels.genmod.generalized_linear_model import GLM
    from statsmodels.tools.sm_exceptions import (
        ConvergenceWarning,
        PerfectSeparationError,
        PerfectSeparationWarning,
    )

    yy = np.asarray(y, dtype=float)
    lp = sps.logistic.ppf(np.clip(np.asarray(p, dtype=float), eps, 1.0 - eps))
    out: dict[str, Any] = {"slope": None, "intercept": None, "n": int(yy.size)}
    if yy.size < 3 or yy.min() == yy.max():
        return out
    family = families.Binomial()
    with warnings.catch_warnings(), np.errstate(over="ignore", under="ignore"):
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            fit = GLM(yy, np.column_stack([np.ones_like(lp), lp]), family=family).fit()
            out["slope"] = float(fit.params[1])
        except (PerfectSeparationError, PerfectSeparationWarning, ConvergenceWarning, ValueError):
            pass
        try:
            fit = GLM(yy, np.ones((yy.size, 1)), family=family, offset=lp).fit()
            out["intercept"] = float(fit.params[0])
        except (PerfectSeparationError, PerfectSeparationWarning, ConvergenceWarning, ValueError):
            pass
    return out


# ------------------------------------------------------------------------------ decision curves
def net_benefit(y: Sequence[int], p: Sequence[float], thresholds: Sequence[float]) -> np.ndarray:
    """Net benefit of acting when ``p ≥ t``: ``TP/n − FP/n · t/(1−t)`` for each threshold t."""
    yy = np.asarray(y).astype(bool)
    s = np.asarray(p, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    if np.any((t <= 0) | (t >= 1)):
        raise ValueError("decision thresholds must lie strictly between 0 and 1")
    act = s[None, :] >= t[:, None]
    n = yy.size
    tp = (act & yy).sum(axis=1) / n
    fp = (act & ~yy).sum(axis=1) / n
    return tp - fp * t / (1.0 - t)


def treat_all_net_benefit(prevalence: float, thresholds: Sequence[float]) -> np.ndarray:
    """Net benefit of acting for everyone: ``p − (1 − p) · t/(1−t)``."""
    t = np.asarray(thresholds, dtype=float)
    return prevalence - (1.0 - prevalence) * t / (1.0 - t)


# ------------------------------------------------------------------------------ permutation test
def rank_auc(y: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Mann–Whitney AUC for each row of 0/1 truths ``y`` [m, n] given score ranks [n] (ties averaged).

    Equals ``sklearn.metrics.roc_auc_score``; NaN for a row without positives or negatives.
    """
    y = np.atleast_2d(np.asarray(y, dtype=float))
    n1 = y.sum(axis=1)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return (y @ ranks - n1 * (n1 + 1) / 2.0) / (n1 * n0)


@dataclass(frozen=True)
class PermutationResult:
    statistic: float | None  # observed: mean over repeats of the AUC
    p_value: float | None
    n_permutations: int  # distinct assignments enumerated (exact) or random draws (Monte Carlo)
    exact: bool
    n_patients: int
    n_rows: int  # rows of all repeats together
    n_fixed: int  # patients whose block size no other patient shares (they cannot move)


def _mean_auc(truth_rows: list[np.ndarray], ranks: list[np.ndarray]) -> np.ndarray:
    aucs = np.stack([rank_auc(t, r) for t, r in zip(truth_rows, ranks, strict=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: stays NaN
        return np.nanmean(aucs, axis=0)


def block_permutation_test(
    patient: Sequence[Sequence[int]],
    position: Sequence[Sequence[int]],
    score: Sequence[Sequence[float]],
    blocks: Sequence[Sequence[int]],
    permutations: int = 2000,
    seed: int = 0,
) -> PermutationResult:
    """One-sided permutation test of T = mean over repeats of AUC(truth, score) > chance.

    ``blocks[i]`` = the 0/1 truths of patient i's rows at this level (one value at patient level,
    one per lesion at lesion level, in a fixed order); repeat r has rows ``(patient[r][j],
    position[r][j])`` with scores ``score[r][j]`` and truth ``blocks[patient][position]``.

    Null: scores independent of truth, patients exchangeable. A permutation π gives patient i the
    truth block of patient π(i); only patients with equally long blocks are exchanged (a block is
    a patient's whole truth, so lesions of one patient move together). The same π applies in
    every repeat (a truth is the patient's, whichever repeat tests it). When every block has one
    row and C(N, k) ≤ ``permutations`` the C(N, k) distinct assignments are enumerated (exact
    p = share with T ≥ T_obs, the identity included); otherwise ``permutations`` random π give
    p = (b + 1)/(m + 1).
    """
    sizes = np.asarray([len(b) for b in blocks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    flat = np.concatenate([np.asarray(b, dtype=np.int64) for b in blocks])
    pats = [np.asarray(x, dtype=np.int64) for x in patient]
    poss = [np.asarray(x, dtype=np.int64) for x in position]
    ranks = [sps.rankdata(np.asarray(s, dtype=float)) for s in score]
    n_pat, n_rows = len(blocks), int(sum(p.size for p in pats))
    for p_, q_ in zip(pats, poss, strict=True):
        if p_.size and (p_.max() >= n_pat or np.any(q_ >= sizes[p_])):
            raise ValueError("a row names a patient or position outside the truth blocks")
    strata = [np.flatnonzero(sizes == s) for s in np.unique(sizes)]
    n_fixed = int(sum(len(m) == 1 for m in strata))
    observed_rows = [flat[offsets[p_] + q_][None, :] for p_, q_ in zip(pats, poss, strict=True)]
    observed = float(_mean_auc(observed_rows, ranks)[0])
    if not math.isfinite(observed):
        return PermutationResult(None, None, 0, True, n_pat, n_rows, n_fixed)
    tol = 1e-12
    k = int(flat.sum())
    if np.all(sizes == 1) and math.comb(n_pat, k) <= permutations:
        total = math.comb(n_pat, k)
        assign = np.zeros((total, n_pat), dtype=np.int64)
        for row, pos in enumerate(itertools.combinations(range(n_pat), k)):
            assign[row, list(pos)] = 1
        stat = _mean_auc([assign[:, p_] for p_ in pats], ranks)
        b = int(np.sum(stat >= observed - tol))
        return PermutationResult(observed, b / total, total, True, n_pat, n_rows, n_fixed)
    rng = np.random.default_rng(seed)
    b, done, m = 0, 0, int(permutations)
    while done < m:
        size = min(500, m - done)
        pi = np.tile(np.arange(n_pat), (size, 1))
        for members in strata:
            if len(members) > 1:
                pi[:, members] = members[np.argsort(rng.random((size, len(members))), axis=1)]
        rows = [flat[offsets[pi[:, p_]] + q_[None, :]] for p_, q_ in zip(pats, poss, strict=True)]
        b += int(np.sum(_mean_auc(rows, ranks) >= observed - tol))
        done += size
    return PermutationResult(observed, (b + 1) / (m + 1), m, False, n_pat, n_rows, n_fixed)


# ------------------------------------------------------------------------------ paired tests
def corrected_paired_t(
    differences: Sequence[float | None], test_train_ratio: float
) -> dict[str, float | int | None]:
    """Nadeau–Bengio corrected resampled paired t-test (two-sided) on per-split differences.

    ``t = mean(d) / sqrt((1/J + ratio) · s²_d)``, df = J − 1. None without spread or with J < 2."""
    d = _finite(differences)
    n = int(d.size)
    out: dict[str, float | int | None] = {
        "n_splits": n,
        "mean_diff": float(d.mean()) if n else None,
        "t": None,
        "p": None,
    }
    if n < 2:
        return out
    var = (1.0 / n + test_train_ratio) * d.var(ddof=1)
    if var <= 0:
        return out
    t = float(d.mean() / math.sqrt(var))
    out["t"], out["p"] = t, float(2.0 * sps.t.sf(abs(t), n - 1))
    return out


def wilcoxon_paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | None]:
    """``scipy.stats.wilcoxon`` (two-sided) on paired values, only from ``MIN_WILCOXON`` pairs."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError("paired samples must have the same length")
    out: dict[str, float | int | None] = {"n": int(x.size), "w": None, "p": None}
    if x.size >= MIN_WILCOXON and np.any(x != y):
        res = sps.wilcoxon(x, y)
        out["w"], out["p"] = float(res.statistic), float(res.pvalue)
    return out


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (statsmodels); None entries stay None and are not counted."""
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, p in enumerate(p_values) if p is not None and math.isfinite(float(p))]
    out: list[float | None] = [None] * len(p_values)
    if idx:
        adj = multipletests([float(p_values[i]) for i in idx], method="holm")[1]
        for i, a in zip(idx, adj, strict=True):
            out[i] = float(a)
    return out
