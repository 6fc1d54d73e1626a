"""From per-crop predictions to lesion and patient predictions, and the metrics of all three levels.

The model sees 2D slices, but the clinical unit is the lesion (and, for therapy, the patient):

* lesion level: mean of its rows' probabilities, keyed by ``(patient_id, lesion)``; its truth is the
  lesion's labels (identical on every row of a lesion — checked, since a mismatch means a broken
  index). A variant that predicts per lesion (radiomics, fusion) writes one row per lesion, which
  this leaves as it is;
* patient level: a patient carries a gene class when *any* of its lesions does (truth = OR), and is
  wild-type (``OTHER``, the class with no gene) only when *every* lesion is. The patient's score
  follows the same logic (``how``):

  - ``max`` (default): a gene's score is the largest lesion probability — the patient is as
    suspicious as its most suspicious lesion; OTHER's is the smallest (every lesion must be OTHER);
  - ``noisy_or``: 1 − Π(1 − p) over lesions for a gene (the chance that at least one lesion carries
    it, were lesions independent), Π p for OTHER;
  - ``mean``: the mean of the lesion probabilities for every class (the former rule; it lets many
    calm lesions hide one mutated lesion).

  Lesions, not slices, are the unit, so a lesion with many slices does not outweigh a small one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.evaluation.metrics import level_metrics

__all__ = [
    "AGGREGATIONS",
    "LEVELS",
    "NEGATIVE_CLASS",
    "evaluate_levels",
    "lesion_level",
    "level_tables",
    "patient_level",
    "prob_columns",
]

LEVELS = ("image", "lesion", "patient")
LESION_KEY = ["patient_id", "lesion"]
AGGREGATIONS = ("max", "noisy_or", "mean")
NEGATIVE_CLASS = "OTHER"  # the class without a gene (conf/labels): true when no gene is
FOLD = "fold"  # out-of-fold rows: a patient's rows of one fold form its lesions/patient row


def prob_columns(classes: Sequence[str]) -> list[str]:
    return [f"p_{c}" for c in classes]


def _check_columns(df: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}")


def _keys(df: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """Group keys, led by ``fold`` when the rows have one (validation rows hold a patient once
    per fold whose validation side it is on)."""
    return [FOLD, *keys] if FOLD in df.columns else list(keys)


def lesion_level(pred: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per lesion (and fold): ``[fold,] patient_id, lesion, n_slices, <CLASS>..., p_...``."""
    classes, probs = list(classes), prob_columns(classes)
    _check_columns(pred, [*LESION_KEY, *classes, *probs], "predictions")
    groups = pred.groupby(_keys(pred, LESION_KEY), sort=True)
    truth = groups[classes].min()
    inconsistent = truth.ne(groups[classes].max()).any(axis=1)
    if inconsistent.any():
        bad = inconsistent[inconsistent].index[0]
        raise ValueError(f"lesion {bad} has slices with different labels")
    out = truth.join(groups[probs].mean())
    out.insert(0, "n_slices", groups.size())
    return out.reset_index()


def patient_level(
    lesions: pd.DataFrame,
    classes: Sequence[str],
    how: str = "max",
    negative_class: str | None = NEGATIVE_CLASS,
) -> pd.DataFrame:
    """One row per patient (and fold) from lesion rows: ``[fold,] patient_id, n_lesions, <CLASS>…,
    p_<CLASS>…``.

    Truth: a gene class = OR over lesions; ``negative_class`` (OTHER, when in ``classes``) = AND.
    Score: ``how`` (module docstring); the negative class gets the dual rule.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"patient aggregation {how!r}: choose one of {list(AGGREGATIONS)}")
    classes, probs = list(classes), prob_columns(classes)
    _check_columns(lesions, ["patient_id", *classes, *probs], "lesion predictions")
    keys = _keys(lesions, ["patient_id"])
    groups = lesions.groupby(keys, sort=True)
    neg = negative_class if negative_class in classes else None
    truth = groups[classes].max()
    if neg is not None:
        truth[neg] = groups[neg].min()
    if how == "mean":
        score = groups[probs].mean()
    else:
        gene = [f"p_{c}" for c in classes if c != neg]
        if how == "max":
            score = groups[gene].max()
            if neg is not None:
                score[f"p_{neg}"] = groups[f"p_{neg}"].min()
        else:  # noisy-OR: 1 − Π(1 − p); OTHER: Π p
            score = 1.0 - lesions[gene].rsub(1.0).groupby([lesions[k] for k in keys]).prod()
            if neg is not None:
                score[f"p_{neg}"] = groups[f"p_{neg}"].prod()
        score = score[probs]
    out = truth.join(score)
    out.insert(0, "n_lesions", groups.size())
    return out.reset_index()


def level_tables(
    pred: pd.DataFrame, classes: Sequence[str], patient_aggregation: str = "max"
) -> dict[str, pd.DataFrame]:
    """``{"image": rows as given, "lesion": ..., "patient": ...}`` prediction tables."""
    lesions = lesion_level(pred, classes)
    return {
        "image": pred,
        "lesion": lesions,
        "patient": patient_level(lesions, classes, patient_aggregation),
    }


def evaluate_levels(
    pred: pd.DataFrame,
    classes: Sequence[str],
    threshold: float = 0.5,
    patient_aggregation: str = "max",
) -> dict[str, Any]:
    """``{"image": ..., "lesion": ..., "patient": ...}`` metrics of a per-crop predictions table.

    ``patient_aggregation``: ``max`` (default) | ``noisy_or`` | ``mean`` (module docstring)."""
    classes, probs = list(classes), prob_columns(classes)
    tables = level_tables(pred, classes, patient_aggregation)
    return {
        level: level_metrics(
            df[classes].to_numpy(), df[probs].to_numpy(dtype=np.float64), classes, threshold
        )
        for level, df in tables.items()
    }
