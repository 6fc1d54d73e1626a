"""From per-crop predictions to lesion and patient predictions, and the metrics of all three levels.

The model sees 2D slices, but the clinical unit is the lesion (and, for therapy, the patient):

* lesion level: mean of its slices' probabilities, keyed by ``(patient_id, lesion)``; its truth is the
  lesion's labels (identical on every slice of a lesion — checked, since a mismatch means a broken
  index);
* patient level: mean of the patient's *lesion* probabilities (so a lesion with many slices does
  not outweigh a small one); truth = OR over the patient's lesions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from crc_lightning.evaluation.metrics import level_metrics

__all__ = ["LEVELS", "evaluate_levels", "lesion_level", "patient_level", "prob_columns"]

LEVELS = ("image", "lesion", "patient")
LESION_KEY = ["patient_id", "lesion"]


def prob_columns(classes: Sequence[str]) -> list[str]:
    return [f"p_{c}" for c in classes]


def _check_columns(df: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}")


def lesion_level(pred: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per lesion: ``patient_id, lesion, n_slices, <CLASS>..., p_<CLASS>...``."""
    classes, probs = list(classes), prob_columns(classes)
    _check_columns(pred, [*LESION_KEY, *classes, *probs], "predictions")
    groups = pred.groupby(LESION_KEY, sort=True)
    inconsistent = groups[classes].nunique().gt(1).any(axis=1)
    if inconsistent.any():
        bad = inconsistent[inconsistent].index[0]
        raise ValueError(f"lesion {bad} has slices with different labels")
    out = groups[classes].first().join(groups[probs].mean())
    out.insert(0, "n_slices", groups.size())
    return out.reset_index()


def patient_level(lesions: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per patient from lesion rows: ``patient_id, n_lesions, <CLASS>... (OR), p_... (mean)``."""
    classes, probs = list(classes), prob_columns(classes)
    _check_columns(lesions, ["patient_id", *classes, *probs], "lesion predictions")
    groups = lesions.groupby("patient_id", sort=True)
    out = groups[classes].max().join(groups[probs].mean())
    out.insert(0, "n_lesions", groups.size())
    return out.reset_index()


def evaluate_levels(
    pred: pd.DataFrame, classes: Sequence[str], threshold: float = 0.5
) -> dict[str, Any]:
    """``{"image": ..., "lesion": ..., "patient": ...}`` metrics of a per-crop predictions table."""
    classes, probs = list(classes), prob_columns(classes)
    lesions = lesion_level(pred, classes)
    patients = patient_level(lesions, classes)
    return {
        level: level_metrics(df[classes].to_numpy(), df[probs].to_numpy(), classes, threshold)
        for level, df in zip(LEVELS, (pred, lesions, patients))
    }
