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
from crc_lightning.evaluation.metrics import level_metrics, scores

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
    patients = patient_level(lesions, classes)  # default: max

    # by hand: lesion = mean of its slices; patient: gene = max over lesions (truth OR),
    # OTHER = min (truth: every lesion OTHER)
    for (pid, lesion), g in pred.groupby(["patient_id", "lesion"]):
        row = lesions[(lesions.patient_id == pid) & (lesions.lesion == lesion)].iloc[0]
        for c, pc in zip(classes, probs):
            assert row[pc] == pytest.approx(sum(g[pc]) / len(g))
            assert row[c] == g[c].iloc[0]
        assert row["n_slices"] == len(g)
    for pid, g in lesions.groupby("patient_id"):
        row = patients[patients.patient_id == pid].iloc[0]
        crops = pred[pred.patient_id == pid]
        for c in ("RAS", "PIK3CA_BRAF"):
            assert row[f"p_{c}"] == pytest.approx(max(g[f"p_{c}"]))
            assert row[c] == int(crops[c].max())
        assert row["p_OTHER"] == pytest.approx(min(g["p_OTHER"]))
        assert row["OTHER"] == int(all(g["OTHER"] == 1))
    assert len(patients) == pred["patient_id"].nunique()

    levels = evaluate_levels(pred, classes)
    assert list(levels) == ["image", "lesion", "patient"]
    assert levels["lesion"]["n"] == len(lesions)
    want = level_metrics(patients[classes].to_numpy(), patients[probs].to_numpy(), classes)
    assert levels["patient"] == want
    mean = evaluate_levels(pred, classes, patient_aggregation="mean")["patient"]
    by_mean = lesions.groupby("patient_id")[probs].mean()
    assert mean["auc"] == pytest.approx(
        level_metrics(patients[classes].to_numpy(), by_mean.to_numpy(), classes)["auc"]
    )


def _mixed_patient() -> pd.DataFrame:
    """Patient M: lesion 1 RAS-mutant (p_RAS 0.8, p_OTHER 0.1), lesion 2 wild-type (0.3, 0.6)."""
    rows = [
        ("M", 1, 1, 0, 0, 0.8, 0.2, 0.1),
        ("M", 2, 0, 0, 1, 0.3, 0.1, 0.6),
        ("W", 1, 0, 0, 1, 0.2, 0.3, 0.7),
    ]
    cols = ["patient_id", "lesion", "RAS", "PIK3CA_BRAF", "OTHER", "p_RAS", "p_PIK3CA_BRAF",
            "p_OTHER"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


@pytest.mark.parametrize(
    ("how", "p_ras", "p_other"),
    [
        ("max", 0.8, 0.1),  # most suspicious lesion; OTHER only as wild-type as the least
        ("noisy_or", 1 - (1 - 0.8) * (1 - 0.3), 0.1 * 0.6),
        ("mean", (0.8 + 0.3) / 2, (0.1 + 0.6) / 2),
    ],
)
def test_patient_truth_and_score_of_a_mixed_patient(how, p_ras, p_other) -> None:
    classes = ["RAS", "PIK3CA_BRAF", "OTHER"]
    pt = patient_level(_mixed_patient(), classes, how=how).set_index("patient_id")
    m = pt.loc["M"]
    # truth: RAS because one lesion is; NOT OTHER, since not every lesion is wild-type
    assert (m["RAS"], m["PIK3CA_BRAF"], m["OTHER"]) == (1, 0, 0)
    assert m["p_RAS"] == pytest.approx(p_ras) and m["p_OTHER"] == pytest.approx(p_other)
    assert pt.loc["W", "OTHER"] == 1 and m["n_lesions"] == 2
    with pytest.raises(ValueError, match="aggregation"):
        patient_level(_mixed_patient(), classes, how="median")


def test_per_class_thresholds_equal_sklearn() -> None:
    y, p = _random_case(4)
    thr = [0.3, 0.5, 0.5, 0.7, 0.2]
    m = level_metrics(y, p, CLASSES, threshold=thr)
    pred = (p > np.asarray(thr)).astype(int)
    f1 = f1_score(y, pred, average=None, zero_division=0)
    for i, c in enumerate(CLASSES):
        assert m["per_class"][c]["f1"] == pytest.approx(f1[i], abs=1e-6)
    assert m["hamming"] == pytest.approx(hamming_loss(y, pred))
    cm = multilabel_confusion_matrix(y, pred)
    (tn, fp), (fn, tp) = cm[0]
    sc = scores(y, p, thr)
    assert sc["balanced_accuracy"][0, 0] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)
    assert sc["brier"][0, 0] == pytest.approx(np.mean((p[:, 0] - y[:, 0]) ** 2))


@pytest.mark.parametrize("seed", [0, 3])
def test_batched_scores_equal_sklearn_and_level_metrics(seed: int) -> None:
    y, p = _random_case(seed, n=60)
    thr = np.where(np.arange(len(CLASSES)) % 2, 0.4, 0.55)
    one = scores(y, p, thr)
    lm = level_metrics(y, p, CLASSES, thr)
    for i, c in enumerate(CLASSES):
        pc = lm["per_class"][c]
        ba = (
            None
            if None in (pc["sensitivity"], pc["specificity"])
            else ((pc["sensitivity"] + pc["specificity"]) / 2)
        )
        for k, want in (*((k, pc[k]) for k in ("f1", "sensitivity", "specificity", "auc")),
                        ("balanced_accuracy", ba)):  # fmt: skip
            got = one[k][0, i]
            assert (want is None and np.isnan(got)) or got == pytest.approx(want, abs=1e-6), (c, k)
    assert one["auc_weighted"][0] == pytest.approx(lm["auc"], abs=1e-6)
    assert one["f1_macro"][0] == pytest.approx(lm["f1_macro"], abs=1e-6)
    assert one["hamming"][0] == pytest.approx(lm["hamming"], abs=1e-6)
    # weighted resamples: clusters of rows (patients) with multinomial counts = sklearn's
    # sample_weight on the same rows
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 15, len(y))
    w = rng.multinomial(15, np.full(15, 1 / 15), size=4)
    many = scores(y, p, thr, cluster, w)
    pred = (p > thr).astype(int)
    for b in range(4):
        sw = w[b][cluster].astype(float)
        for i in (0, 1, 3):
            if 0 < (sw * y[:, i]).sum() < sw.sum():
                assert many["auc"][b, i] == pytest.approx(
                    roc_auc_score(y[:, i], p[:, i], sample_weight=sw)
                )
            assert many["f1"][b, i] == pytest.approx(
                f1_score(y[:, i], pred[:, i], sample_weight=sw, zero_division=0)
            )
        assert many["hamming"][b] == pytest.approx(hamming_loss(y, pred, sample_weight=sw))


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
