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
  positives is 0, sklearn's ``zero_division=0``); ``hamming`` = fraction of wrong labels.
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

__all__ = ["THRESHOLD", "class_auroc", "level_metrics"]

THRESHOLD = 0.5


def _as_tensors(y_true: Any, y_prob: Any) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.as_tensor(np.asarray(y_true), dtype=torch.long)
    prob = torch.as_tensor(np.asarray(y_prob), dtype=torch.float64)
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


def level_metrics(
    y_true: Any, y_prob: Any, classes: Sequence[str], threshold: float = THRESHOLD
) -> dict[str, Any]:
    """``{"auc", "f1_macro", "hamming", "n", "per_class": {class: {...}}}`` for one level."""
    target, prob = _as_tensors(y_true, y_prob)
    n, c = target.shape
    if c != len(classes):
        raise ValueError(f"{c} label columns but {len(classes)} class names")
    if n == 0:
        raise ValueError("no samples to evaluate")
    kw = dict(num_labels=c, threshold=float(threshold))
    # stat scores per class: [C, 5] = tp, fp, tn, fn, support
    stats = multilabel_stat_scores(prob, target, average="none", **kw)
    f1 = multilabel_f1_score(prob, target, average="none", zero_division=0, **kw)
    hamming = multilabel_hamming_distance(prob, target, average="micro", **kw)
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
