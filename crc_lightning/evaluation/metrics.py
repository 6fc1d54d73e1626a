"""Multi-label metrics of one level (image, lesion or patient), in the shape of metrics.json.

Computed with torchmetrics' functional API so training-time and test-time numbers share one
implementation. Conventions (CONTRACTS.md "Run results"), chosen to match scikit-learn:

* a class is predicted positive when its probability is ``> threshold`` (torchmetrics' rule, 0.5);
* ``auc`` = one-vs-rest AUROC averaged with weights = support (number of positives), like
  ``roc_auc_score(y, p, average="weighted")`` on the indicator matrix. A class without a positive
  or without a negative has no AUC (``None``) and is left out of the mean — sklearn would raise on
  such a column, so the weighted mean equals sklearn's on the remaining columns;
* sensitivity is undefined (``None``) for a class without positives, specificity for a class
  without negatives: a small test fold often lacks a rare mutation, and 0.0 would read as a result;
* ``f1_macro`` = unweighted mean of per-class F1 (an F1 with no positives and no predicted
  positives is 0, sklearn's ``zero_division=0``); ``hamming`` = fraction of wrong labels;
* :func:`scores` (the report's) adds ``balanced_accuracy`` = (sensitivity + specificity) / 2 and
  ``brier`` = mean squared difference between probability and 0/1 truth.

:func:`level_metrics` (torchmetrics) writes ``metrics.json``. The report evaluates thousands of
resamples (folds × repeats × bootstrap × permutations), where a torchmetrics or sklearn call per
resample costs ~10 ms on a laptop core; :func:`scores` computes the same numbers for a whole batch
of patient-cluster weightings at once with numpy (rank-based AUC; for weighted resamples the
exact weighted Mann–Whitney sum), and the tests hold both to scikit-learn (``sample_weight``
included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    multilabel_f1_score,
    multilabel_hamming_distance,
    multilabel_stat_scores,
)

__all__ = ["THRESHOLD", "class_auroc", "level_metrics", "scores", "thresholds_vector"]

THRESHOLD = 0.5


def _as_tensors(y_true: Any, y_prob: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # own copies: pandas 3 hands out read-only views, which torch warns about on every call
    target = torch.tensor(np.array(y_true, dtype=np.int64))
    prob = torch.tensor(np.array(y_prob, dtype=np.float64))
    if target.ndim != 2 or target.shape != prob.shape:
        raise ValueError(
            f"y_true and y_prob must both be [n, C]; got {tuple(target.shape)} and {tuple(prob.shape)}"
        )
    if prob.numel() and (prob.min() < 0 or prob.max() > 1):
        raise ValueError("y_prob must hold probabilities in [0, 1] (apply sigmoid first)")
    return target, prob


def _num(x: torch.Tensor | float) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def class_auroc(y_true: Any, y_prob: Any) -> list[float | None]:
    """Per-class one-vs-rest AUROC; ``None`` where the class lacks positives or negatives."""
    target, prob = _as_tensors(y_true, y_prob)
    out: list[float | None] = []
    for c in range(target.shape[1]):
        pos = int(target[:, c].sum())
        if pos == 0 or pos == target.shape[0]:
            out.append(None)
        else:
            out.append(_num(binary_auroc(prob[:, c], target[:, c])))
    return out


def weighted_auc(aucs: Sequence[float | None], support: Sequence[int]) -> float | None:
    """Support-weighted mean of the defined AUCs (sklearn ``average="weighted"``)."""
    pairs = [(a, s) for a, s in zip(aucs, support, strict=True) if a is not None]
    total = sum(s for _, s in pairs)
    if not pairs or total == 0:
        return None
    return float(sum(a * s for a, s in pairs) / total)


def thresholds_vector(threshold: float | Sequence[float], n_classes: int) -> np.ndarray:
    """One threshold per class from a scalar or a per-class sequence."""
    t = np.broadcast_to(np.asarray(threshold, dtype=float), (n_classes,)).copy()
    if t.shape != (n_classes,):
        raise ValueError(f"{t.size} thresholds for {n_classes} classes")
    return t


def level_metrics(
    y_true: Any,
    y_prob: Any,
    classes: Sequence[str],
    threshold: float | Sequence[float] = THRESHOLD,
) -> dict[str, Any]:
    """``{"auc", "f1_macro", "hamming", "n", "per_class": {class: {...}}}`` for one level.

    ``threshold``: one value, or one per class (a class is positive when its probability is
    strictly above its threshold)."""
    target, prob = _as_tensors(y_true, y_prob)
    n, c = target.shape
    if c != len(classes):
        raise ValueError(f"{c} label columns but {len(classes)} class names")
    if n == 0:
        raise ValueError("no samples to evaluate")
    thr = torch.as_tensor(thresholds_vector(threshold, c), dtype=torch.float64)
    hard = (prob > thr).long()  # integer predictions: torchmetrics applies no threshold of its own
    kw = dict(num_labels=c)
    # stat scores per class: [C, 5] = tp, fp, tn, fn, support
    stats = multilabel_stat_scores(hard, target, average="none", **kw)
    f1 = multilabel_f1_score(hard, target, average="none", zero_division=0, **kw)
    hamming = multilabel_hamming_distance(hard, target, average="micro", **kw)
    aucs = class_auroc(target, prob)
    per_class: dict[str, dict[str, Any]] = {}
    supports: list[int] = []
    for i, name in enumerate(classes):
        tp, fp, tn, fn, sup = (int(v) for v in stats[i].tolist())
        supports.append(sup)
        per_class[str(name)] = {
            "f1": _num(f1[i]),
            "auc": aucs[i],
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "support": sup,
            "prevalence": sup / n,
        }
    return {
        "auc": weighted_auc(aucs, supports),
        "f1_macro": float(np.mean([v["f1"] for v in per_class.values()])),
        "hamming": _num(hamming),
        "n": int(n),
        "per_class": per_class,
    }


# ------------------------------------------------------------------------------ batched (report)
def _pair_matrix(y: np.ndarray, p: np.ndarray, cluster: np.ndarray, n_clusters: int) -> np.ndarray:
    """``M[i, j]`` = Σ over positive rows a of cluster i and negative rows b of cluster j of
    ``1[p_a > p_b] + ½·1[p_a = p_b]`` — the Mann–Whitney pair count split by cluster pair."""
    pos, neg = y == 1, y == 0
    sp, cp = p[pos], cluster[pos]
    below = np.zeros((sp.size, n_clusters))
    for j in np.unique(cluster[neg]):
        nj = np.sort(p[neg & (cluster == j)])
        lo = np.searchsorted(nj, sp, side="left")
        hi = np.searchsorted(nj, sp, side="right")
        below[:, j] = lo + 0.5 * (hi - lo)
    m = np.zeros((n_clusters, n_clusters))
    np.add.at(m, cp, below)
    return m


def _rank_auc_1d(y: np.ndarray, p: np.ndarray) -> float:
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((rankdata(p)[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def scores(
    y_true: Any,
    y_prob: Any,
    threshold: float | Sequence[float] = THRESHOLD,
    cluster: Any = None,
    weights: Any = None,
) -> dict[str, np.ndarray]:
    """The report's metrics for ``B`` weightings of the rows at once (numpy; NaN = undefined).

    ``y_true``/``y_prob`` [n, C]; ``threshold`` a scalar, one per class [C] or one per row and
    class [n, C] (out-of-fold rows keep the threshold of their own fold); ``cluster`` [n] integer codes 0..P−1 (the patient of each row;
    default: every row its own cluster); ``weights`` [B, P] non-negative cluster weights, e.g. the
    multinomial counts of a patient bootstrap (default: one row of ones = the plain metrics).
    A row's weight is its cluster's. Returns arrays ``[B, C]`` for ``auc, f1, sensitivity,
    specificity, balanced_accuracy, brier, support, prevalence`` and ``[B]`` for ``auc_weighted``
    (support-weighted mean of the defined class AUCs), ``f1_macro``, ``hamming``.

    Same conventions as :func:`level_metrics` (positive = probability > threshold, F1 with
    zero_division 0, AUC ties count ½). Weighted AUC = Σ_{a pos, b neg} w_a w_b H(p_a − p_b) /
    (Σ_pos w · Σ_neg w), the AUC of the resample in which row a appears w_a times.
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(y_prob, dtype=float)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"y_true and y_prob must both be [n, C]; got {y.shape} and {p.shape}")
    n, c = y.shape
    if n == 0:
        raise ValueError("no samples to evaluate")
    thr = np.broadcast_to(np.asarray(threshold, dtype=float), (n, c))  # scalar, [C] or [n, C]
    if cluster is None:
        codes, n_clusters = np.arange(n), n
    else:
        codes = np.asarray(cluster, dtype=np.int64)
        n_clusters = int(codes.max()) + 1
    plain = weights is None
    w = np.ones((1, n_clusters)) if plain else np.atleast_2d(np.asarray(weights, dtype=float))
    if w.shape[1] != n_clusters:
        raise ValueError(f"weights have {w.shape[1]} clusters, rows name {n_clusters}")
    rw = w[:, codes]  # [B, n]
    total = rw.sum(axis=1)  # [B]
    pred = p > thr
    pos = y == 1
    tp = rw @ (pos & pred)
    fp = rw @ (~pos & pred)
    fn = rw @ (pos & ~pred)
    tn = rw @ (~pos & ~pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        brier = (rw @ (p - y) ** 2) / total[:, None]
        support = tp + fn
        auc = np.full((w.shape[0], c), np.nan)
        for k in range(c):
            if plain:
                auc[0, k] = _rank_auc_1d(y[:, k], p[:, k])
                continue
            m = _pair_matrix(y[:, k], p[:, k], codes, n_clusters)
            wp = w @ np.bincount(codes[pos[:, k]], minlength=n_clusters)
            wn = w @ np.bincount(codes[~pos[:, k]], minlength=n_clusters)
            num = np.einsum("bi,ij,bj->b", w, m, w)
            auc[:, k] = np.where((wp > 0) & (wn > 0), num / (wp * wn), np.nan)
        defined = np.isfinite(auc)
        sup_def = np.where(defined, support, 0.0)
        auc_weighted = np.where(
            sup_def.sum(axis=1) > 0,
            np.nansum(np.where(defined, auc, 0.0) * sup_def, axis=1) / sup_def.sum(axis=1),
            np.nan,
        )
    return {
        "auc": auc,
        "f1": f1,
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2.0,
        "brier": brier,
        "support": support,
        "prevalence": support / total[:, None],
        "auc_weighted": auc_weighted,
        "f1_macro": f1.mean(axis=1),
        "hamming": (fp + fn).sum(axis=1) / (c * total),
    }
