"""Statistics for the experiment report: seed CIs, chance baselines, permutation and paired tests.

Why these choices (a few dozen patients, 5 seeds — the paper's setting):

* :func:`mean_ci` — mean ± Student-t half-width ``t_{(1+ci)/2, n-1} · s / √n`` over seeds (``s`` with
  ``ddof=1``). With one seed there is no spread estimate: the half-width is ``None`` ("n/a"), never 0.
* :func:`baselines` — what a classifier that ignores the image scores, from the prevalence ``p`` of
  the test truth: always-positive F1 = 2p/(1+p); a prevalence-random classifier (predicts positive
  with probability p, independently of the image) has expected sensitivity p, specificity 1−p,
  precision p hence F1 p, and per-class Hamming loss 2p(1−p); any image-blind score has AUC 0.5.
* :func:`clears` — a mean is only "better than chance" when its whole CI is on the right side of
  its baseline; no CI (n = 1) never clears.
* :func:`permutation_auc_test` — patient-level permutation test of a pooled lesion-level AUC
  (details in its docstring).
* :func:`paired_tests` — variants compared seed by seed (same seed = same split):
  ``scipy.stats.ttest_rel``, plus ``scipy.stats.wilcoxon`` when n ≥ 5.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = [
    "PermutationResult",
    "always_positive_f1",
    "baselines",
    "clears",
    "mean_ci",
    "paired_tests",
    "permutation_auc_test",
    "rank_auc",
]


def mean_ci(
    values: Sequence[float | None], ci: float = 0.95
) -> tuple[float | None, float | None, int]:
    """``(mean, half_width, n)`` over the defined values; half-width ``None`` when n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(float(v))], dtype=float)
    n = int(x.size)
    if n == 0:
        return None, None, 0
    mean = float(x.mean())
    if n < 2:
        return mean, None, n
    half = float(sps.t.ppf((1.0 + ci) / 2.0, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def always_positive_f1(p: float) -> float:
    """F1 of predicting every sample positive: precision p, recall 1 → 2p/(1+p)."""
    return 2.0 * p / (1.0 + p)


def baselines(p: float, class_prevalences: Sequence[float] | None = None) -> dict[str, float]:
    """Image-blind reference values for a class of prevalence ``p`` (see module docstring).

    ``hamming`` is the prevalence-random classifier's expected Hamming loss averaged over
    ``class_prevalences`` (all classes of the label set); ``f1`` is the better of the two blind
    F1s (always-positive, since 2p/(1+p) ≥ p).
    """
    prev = [p] if class_prevalences is None else list(class_prevalences)
    return {
        "auc": 0.5,
        "f1_always_positive": always_positive_f1(p),
        "f1_random": p,
        "f1": max(always_positive_f1(p), p),
        "sensitivity": p,
        "specificity": 1.0 - p,
        "hamming": float(np.mean([2.0 * q * (1.0 - q) for q in prev])),
    }


def clears(
    mean: float | None, half: float | None, baseline: float, higher_is_better: bool = True
) -> bool:
    """True when the CI ``mean ± half`` lies strictly beyond ``baseline`` on the good side."""
    if mean is None or half is None:
        return False
    return mean - half > baseline if higher_is_better else mean + half < baseline


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
    auc: float | None  # observed statistic
    p_value: float | None
    n_permutations: int  # distinct assignments enumerated (exact) or random draws (Monte Carlo)
    exact: bool
    n_patients: int
    n_lesions: int


def _assignments_count(n: int, k: int) -> int:
    return math.comb(n, k)


def permutation_auc_test(
    lesion_patient: Sequence[Any],
    lesion_prob: Sequence[float],
    patient_truth: dict[Any, int],
    permutations: int = 2000,
    seed: int = 0,
) -> PermutationResult:
    """Patient-level permutation test of the AUC of lesion probabilities against patient truth.

    Null hypothesis: the lesion probabilities are independent of the patients' mutation status.
    Exchangeable unit = the patient (lesions of one patient are correlated, so permuting lesions
    would make p too small). Procedure:

    1. each patient has one 0/1 truth for the focus class (``patient_truth``: OR over its lesions,
       the patient-level truth of ``aggregate.patient_level``);
    2. statistic T = AUC of the lesion probabilities where every lesion carries its patient's truth
       (equals the lesion-level AUC when each lesion has its patient's status);
    3. the patients' truths are permuted among the patients; each lesion takes its patient's
       permuted truth; T is recomputed;
    4. with k positive patients among N, only C(N, k) assignments are distinct and each is equally
       likely under the null: if C(N, k) ≤ ``permutations`` all are enumerated and
       p = #{T_π ≥ T_obs} / C(N, k) (exact; the identity is one of them); otherwise ``permutations``
       random permutations give p = (b + 1) / (m + 1), b = #{T_π ≥ T_obs} (Monte Carlo, valid).

    One-sided (AUC larger than chance). ``lesion_patient`` may repeat a patient (several lesions, or
    the same patient in the test sets of several seeds: pooled rows keep the patient's one truth).
    """
    pid = [str(p) for p in lesion_patient]
    truth = {str(k): int(v) for k, v in patient_truth.items()}
    patients = sorted(truth)
    missing = sorted(set(pid) - set(patients))
    if missing:
        raise ValueError(f"lesions of patients without truth: {missing[:5]}")
    prob = np.asarray(lesion_prob, dtype=float)
    if prob.shape != (len(pid),):
        raise ValueError("one probability per lesion row expected")
    pos_of = {p: i for i, p in enumerate(patients)}
    lesion_to_patient = np.asarray([pos_of[p] for p in pid], dtype=np.int64)
    t = np.asarray([truth[p] for p in patients], dtype=np.int64)
    n, k = len(patients), int(t.sum())
    if k in (0, n):
        return PermutationResult(None, None, 0, True, n, len(pid))
    ranks = sps.rankdata(prob)
    observed = float(rank_auc(t[lesion_to_patient][None, :], ranks)[0])
    tol = 1e-12
    total = _assignments_count(n, k)
    if total <= permutations:
        perm_t = np.zeros((total, n), dtype=np.int64)
        for row, pos in enumerate(itertools.combinations(range(n), k)):
            perm_t[row, list(pos)] = 1
        aucs = rank_auc(perm_t[:, lesion_to_patient], ranks)
        b = int(np.sum(aucs >= observed - tol))
        return PermutationResult(observed, b / total, total, True, n, len(pid))
    rng = np.random.default_rng(seed)
    b, m, chunk = 0, int(permutations), 500
    done = 0
    while done < m:
        size = min(chunk, m - done)
        perm_t = np.stack([rng.permutation(t) for _ in range(size)])
        aucs = rank_auc(perm_t[:, lesion_to_patient], ranks)
        b += int(np.sum(aucs >= observed - tol))
        done += size
    return PermutationResult(observed, (b + 1) / (m + 1), m, False, n, len(pid))


# ------------------------------------------------------------------------------ paired tests
def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | None]:
    """Paired comparison of two variants over the same seeds (``a[i]``, ``b[i]`` share seed i).

    ``ttest_rel`` (two-sided) always when n ≥ 2; ``wilcoxon`` (two-sided) only when n ≥ 5, because
    with fewer pairs its smallest attainable p exceeds 0.05. NaN results (all differences zero)
    become ``None``.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError("paired samples must have the same length")
    n = int(x.size)
    out: dict[str, float | int | None] = {
        "n": n,
        "mean_diff": float(np.mean(x - y)) if n else None,
        "t": None,
        "p_ttest": None,
        "w": None,
        "p_wilcoxon": None,
    }

    def _f(v: Any) -> float | None:
        v = float(v)
        return v if math.isfinite(v) else None

    if n >= 2:
        res = sps.ttest_rel(x, y)
        out["t"], out["p_ttest"] = _f(res.statistic), _f(res.pvalue)
    if n >= 5 and np.any(x != y):
        res = sps.wilcoxon(x, y)
        out["w"], out["p_wilcoxon"] = _f(res.statistic), _f(res.pvalue)
    return out
