"""Metrics and lesion/patient aggregation against scikit-learn and hand-made pandas groupbys."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    f1_score,
    hamming_loss,
    multilabel_confusion_matrix,
    roc_auc_score,
)

from crc_lightning.evaluation.aggregate import evaluate_levels, lesion_level, patient_level
from crc_lightning.evaluation.metrics import level_metrics

CLASSES = ["A", "B", "NOPOS", "C", "ALLPOS"]


def _random_case(seed: int, n: int = 80) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(CLASSES))) < [0.3, 0.5, 0.0, 0.15, 1.0]).astype(int)
    p = rng.random((n, len(CLASSES)))
    p[:, 0] = np.clip(p[:, 0] * 0.6 + y[:, 0] * 0.4, 0, 1)  # some real signal in class A
    p[:5, 1] = 0.25  # ties
    return y, p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_level_metrics_equal_sklearn(seed: int) -> None:
    y, p = _random_case(seed)
    pred = (p > 0.5).astype(int)
    m = level_metrics(y, p, CLASSES)

    f1 = f1_score(y, pred, average=None, zero_division=0)
    cm = multilabel_confusion_matrix(y, pred)  # [C, 2, 2] = [[tn, fp], [fn, tp]]
    for i, c in enumerate(CLASSES):
        pc = m["per_class"][c]
        assert pc["f1"] == pytest.approx(f1[i], abs=1e-6)
        (tn, fp), (fn, tp) = cm[i]
        assert pc["support"] == y[:, i].sum()
        assert pc["prevalence"] == pytest.approx(y[:, i].mean())
        if tp + fn:
            assert pc["sensitivity"] == pytest.approx(tp / (tp + fn))
        else:
            assert pc["sensitivity"] is None
        if tn + fp:
            assert pc["specificity"] == pytest.approx(tn / (tn + fp))
        else:
            assert pc["specificity"] is None
        if 0 < y[:, i].sum() < len(y):
            assert pc["auc"] == pytest.approx(roc_auc_score(y[:, i], p[:, i]), abs=1e-6)
        else:
            assert pc["auc"] is None

    keep = [i for i in range(len(CLASSES)) if 0 < y[:, i].sum() < len(y)]
    assert keep == [0, 1, 3]
    assert m["auc"] == pytest.approx(roc_auc_score(y[:, keep], p[:, keep], average="weighted"))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["hamming"] == pytest.approx(hamming_loss(y, pred))
    assert m["n"] == len(y)


def test_auc_none_when_no_class_is_scorable() -> None:
    y = np.array([[1, 0], [1, 0], [1, 0]])
    m = level_metrics(y, np.full((3, 2), 0.7), ["X", "Y"])
    assert m["auc"] is None
    assert m["per_class"]["X"]["specificity"] is None
    assert m["per_class"]["Y"]["sensitivity"] is None


def test_level_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        level_metrics(np.zeros((3, 2)), np.full((3, 2), 2.0), ["X", "Y"])
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        level_metrics(np.zeros((3, 2)), np.zeros((3, 3)), ["X", "Y"])
    with pytest.raises(ValueError, match="class names"):
        level_metrics(np.zeros((3, 2)), np.zeros((3, 2)), ["X"])


def _predictions(seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Per-crop predictions: 6 patients, 1–3 lesions each, 1–5 slices per lesion."""
    rng = np.random.default_rng(seed)
    classes = ["RAS", "PIK3CA_BRAF", "OTHER"]
    rows = []
    for p in range(6):
        for lesion in range(1, int(rng.integers(2, 5))):
            truth = rng.integers(0, 2, size=3)
            for s in range(int(rng.integers(1, 6))):
                rows.append(
                    {
                        "patient_id": f"P{p}",
                        "lesion": lesion,
                        "crop_id": f"P{p}/{lesion}/{s}",
                        "slice": s,
                        **dict(zip(classes, truth.tolist())),
                        **{f"p_{c}": float(rng.random()) for c in classes},
                    }
                )
    return pd.DataFrame(rows), classes


def test_aggregation_equals_hand_groupby() -> None:
    pred, classes = _predictions()
    probs = [f"p_{c}" for c in classes]
    lesions = lesion_level(pred, classes)
    patients = patient_level(lesions, classes)

    # by hand: lesion = mean of its slices; patient = mean of its lesions, truth = OR
    for (pid, lesion), g in pred.groupby(["patient_id", "lesion"]):
        row = lesions[(lesions.patient_id == pid) & (lesions.lesion == lesion)].iloc[0]
        for c, pc in zip(classes, probs):
            assert row[pc] == pytest.approx(sum(g[pc]) / len(g))
            assert row[c] == g[c].iloc[0]
        assert row["n_slices"] == len(g)
    for pid, g in lesions.groupby("patient_id"):
        row = patients[patients.patient_id == pid].iloc[0]
        crops = pred[pred.patient_id == pid]
        for c, pc in zip(classes, probs):
            assert row[pc] == pytest.approx(g[pc].mean())
            assert row[c] == int(crops[c].max())
    assert len(patients) == pred["patient_id"].nunique()
    # a patient's probability is the mean over lesions, not over slices
    uneven = lesions.groupby("patient_id")["n_slices"].nunique().gt(1)
    assert uneven.any()

    levels = evaluate_levels(pred, classes)
    assert list(levels) == ["image", "lesion", "patient"]
    assert levels["lesion"]["n"] == len(lesions)
    want = level_metrics(patients[classes].to_numpy(), patients[probs].to_numpy(), classes)
    assert levels["patient"] == want


def test_inconsistent_lesion_labels_are_an_error() -> None:
    pred, classes = _predictions()
    sizes = pred.groupby(["patient_id", "lesion"]).size()
    pid, lesion = sizes[sizes > 1].index[0]
    row = pred.index[(pred.patient_id == pid) & (pred.lesion == lesion)][0]
    pred.loc[row, classes[0]] = 1 - pred.loc[row, classes[0]]
    with pytest.raises(ValueError, match="different labels"):
        lesion_level(pred, classes)
    with pytest.raises(ValueError, match="lacks columns"):
        lesion_level(pred.drop(columns=["p_OTHER"]), classes)
