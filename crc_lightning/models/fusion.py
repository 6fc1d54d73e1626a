"""Late fusion of a deep model's and the radiomics model's lesion probabilities.

For each class ``c`` of the label set::

    p_c = w_c · p_deep_c + (1 − w_c) · p_radiomics_c

where ``p_deep`` is the deep model's lesion probability (the mean of its crops' probabilities,
:func:`crc_lightning.evaluation.aggregate.lesion_level`) and ``p_radiomics`` the radiomics model's
(:mod:`.radiomics`). A convex combination keeps a probability in [0, 1] and, at ``w = 1`` or
``w = 0``, gives back either model exactly, so fusion can never be *chosen* worse on the data that
chose it than the better of its two members.

**How w is chosen** (:func:`choose_weights`): on one fold's inner-validation lesions only (never its
test lesions), over the grid ``{0, 0.1, …, 1}``, by ROC AUC. By default one ``w`` is shared by all
classes and maximises the mean AUC over the classes that have positive and negative validation
lesions: an inner-validation side holds a handful of patients, so a weight per class would be
chosen on two or three positive lesions and mostly follow noise; pooling the classes' evidence
gives one steadier choice. ``per_class=True`` chooses each class's own ``w`` on its AUC. Ties — the
rule on a small side, since AUC only moves when a pair of lesions swaps rank — go to the ``w``
closest to 0.5 (an equal mix; between two equally close, the smaller ``w``), and a class (or, shared,
every class) without both outcomes on validation gets 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["FUSION_FILE", "WEIGHT_GRID", "choose_weights", "fuse", "fusion_record", "weight_scores"]

FUSION_FILE = "fusion.json"  # models/fold<f>/fusion.json: what predict needs to fuse that fold
WEIGHT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
TIE = 0.5
_EPS = 1e-12


def fuse(p_deep: np.ndarray, p_radiomics: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``w · p_deep + (1 − w) · p_radiomics`` per class (columns); arrays [n, C], ``weights`` [C]."""
    p_deep = np.asarray(p_deep, dtype=np.float64)
    p_radiomics = np.asarray(p_radiomics, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape(1, -1)
    if p_deep.shape != p_radiomics.shape or w.shape[1] != p_deep.shape[1]:
        raise ValueError(
            f"fusion: deep {p_deep.shape}, radiomics {p_radiomics.shape}, {w.shape[1]} weights"
        )
    return w * p_deep + (1.0 - w) * p_radiomics


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    if y.min(initial=1) == y.max(initial=0):  # one outcome only (or no rows): undefined
        return None
    return float(roc_auc_score(y, p))


def weight_scores(
    y: np.ndarray, p_deep: np.ndarray, p_radiomics: np.ndarray, grid: Sequence[float] = WEIGHT_GRID
) -> np.ndarray:
    """AUC of every class [len(grid), C] for each weight of ``grid`` (NaN: class undefined)."""
    y = np.asarray(y).astype(int).reshape(len(p_deep), -1)
    out = np.full((len(grid), y.shape[1]), np.nan)
    for i, w in enumerate(grid):
        fused = fuse(p_deep, p_radiomics, [w] * y.shape[1])
        for c in range(y.shape[1]):
            auc = _auc(y[:, c], fused[:, c])
            if auc is not None:
                out[i, c] = auc
    return out


def _pick(scores: np.ndarray, grid: Sequence[float]) -> float:
    """The best grid weight of one score per weight; ties → closest to 0.5, then the smaller."""
    if np.all(np.isnan(scores)):
        return TIE
    best = np.nanmax(scores)
    tied = [float(w) for w, s in zip(grid, scores, strict=True) if s >= best - _EPS]
    return min(tied, key=lambda w: (abs(w - TIE), w))


def choose_weights(
    y: np.ndarray,
    p_deep: np.ndarray,
    p_radiomics: np.ndarray,
    classes: Sequence[str],
    per_class: bool = False,
    grid: Sequence[float] = WEIGHT_GRID,
) -> dict[str, float]:
    """``{class: w}`` chosen on validation lesions (module docstring): truth ``y`` [n, C], the two
    models' lesion probabilities [n, C] of the same lesions in the same order."""
    scores = weight_scores(y, p_deep, p_radiomics, grid)
    if per_class:
        return {c: _pick(scores[:, k], grid) for k, c in enumerate(classes)}
    defined = ~np.all(np.isnan(scores), axis=0)
    shared = _pick(scores[:, defined].mean(axis=1), grid) if defined.any() else TIE
    return {c: shared for c in classes}


def fusion_record(
    weights: Mapping[str, float], scores: np.ndarray, classes: Sequence[str], **extra: Any
) -> dict[str, Any]:
    """The ``fusion.json`` of one fold: its weights, the rule, and the validation AUC per grid
    weight (what the choice was made on)."""
    return {
        "format": "crc_lightning.fusion",
        "format_version": 1,
        "rule": "p = w * p_deep_lesion + (1 - w) * p_radiomics (per class); p_deep_lesion = mean "
        "of the lesion's crop probabilities",
        "weights": {str(c): float(weights[c]) for c in classes},
        "grid": [float(w) for w in WEIGHT_GRID],
        "val_auc": {
            str(c): [None if np.isnan(v) else float(v) for v in scores[:, k]]
            for k, c in enumerate(classes)
        },
        **extra,
    }
