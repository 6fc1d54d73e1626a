"""The radiomics model: tuned on training patients only, learns, saves and loads without pickle."""

from __future__ import annotations

import json
import os
import pickle
import stat

import numpy as np
import pandas as pd
import pytest
from sklearn.impute import SimpleImputer
from sklearn.metrics import roc_auc_score

from crc_lightning.io.files import sha256_file
from crc_lightning.models.checkpoint import CheckpointError
from crc_lightning.models.radiomics import (
    MODEL_FILE,
    MODEL_META_FILE,
    RadiomicsModel,
    RadiomicsModelConfig,
    fit,
    inner_splits,
    prediction_frame,
)
from crc_lightning.preprocessing.radiomics import RadiomicsParams

CLASSES = ("RAS", "PIK3CA_BRAF", "OTHER")
SMALL = {"k_features": [2, 5], "C": [0.1, 1.0], "inner_folds": 3}
TINY = {"k_features": [3], "C": [1.0], "inner_folds": 3, "forest_trees": 15}


def _cohort(n_patients: int = 40, seed: int = 0):
    """Lesions (1–3 per patient) whose class follows two of 12 features; a unique ``marker``
    feature tags each row so a spy can tell which rows a fit saw."""
    rng = np.random.default_rng(seed)
    pids, cls = [], []
    for p in range(n_patients):
        k = int(rng.integers(1, 4))
        pids += [f"P{p:03d}"] * k
        cls += [p % 3] * k  # one class per patient (a patient's lesions share the mutation)
    n = len(pids)
    X = rng.normal(size=(n, 12))
    cls = np.array(cls)
    X[:, 0] += 1.5 * (cls == 0)
    X[:, 1] += 1.5 * (cls == 1)
    features = pd.DataFrame(X, columns=[f"f{i}" for i in range(12)])
    features["marker"] = np.arange(n, dtype=np.float64) + 0.5
    labels = np.eye(3, dtype=int)[cls]
    return features, labels, np.array(pids)


def test_never_sees_a_test_patient(monkeypatch):
    features, labels, pids = _cohort()
    patients = np.unique(pids)
    test_patients = set(np.random.default_rng(1).choice(patients, 10, replace=False))
    train = ~np.isin(pids, list(test_patients))
    seen: list[set[float]] = []  # marker values of every matrix any pipeline fitted or scored
    real_fit, real_transform = SimpleImputer.fit, SimpleImputer.transform

    def spy_fit(self, X, y=None):
        seen.append(set(np.asarray(X)[:, -1]))
        return real_fit(self, X, y)

    def spy_transform(self, X):
        seen.append(set(np.asarray(X)[:, -1]))
        return real_transform(self, X)

    monkeypatch.setattr(SimpleImputer, "fit", spy_fit)
    monkeypatch.setattr(SimpleImputer, "transform", spy_transform)
    model = fit(features[train], labels[train], pids[train], CLASSES, SMALL, seed=0)

    train_markers = set(features.loc[train, "marker"])
    test_markers = set(features.loc[~train, "marker"])
    assert seen and all(s <= train_markers for s in seen)
    assert not set().union(*seen) & test_markers
    train_pids = pids[train]
    for c, splits in enumerate(model.inner_splits):
        assert len(splits) == 3, CLASSES[c]
        covered = []
        for tr, va in splits:
            # positions into the rows fit() was given: the training patients only …
            assert tr.max() < train.sum() and va.max() < train.sum()
            # … grouped by patient: no patient on both sides
            assert not set(train_pids[tr]) & set(train_pids[va])
            assert (
                set(train_pids[va]) <= set(train_pids) and not set(train_pids[va]) & test_patients
            )
            covered += list(va)
            # the grid search fitted on exactly these inner-training rows
            assert set(features.loc[train, "marker"].to_numpy()[tr]) in seen
        assert sorted(covered) == list(range(train.sum()))  # every training row validated once
    assert model.n_train == train.sum() and model.n_train_patients == len(patients) - 10


def test_inner_splits_are_grouped_and_stratified():
    y = np.array([1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0])
    groups = ["a", "a", "b", "c", "c", "d", "e", "f", "g", "h", "i", "j"]
    splits = inner_splits(y, groups, 5, seed=0)
    assert len(splits) == 3  # capped: only 3 patients (a, d, g) have the class
    for tr, va in splits:
        assert not {groups[i] for i in tr} & {groups[i] for i in va}
        assert y[va].any() and not y[va].all()
    assert inner_splits(np.array([1, 1, 0, 0]), ["a", "a", "b", "c"], 5, 0) == []


def test_learns_the_signal_and_falls_back_to_the_prior():
    features, labels, pids = _cohort(60)
    test = np.isin(pids, np.unique(pids)[:18])
    labels = labels.copy()
    labels[:, 2] = 0  # no patient has OTHER: nothing to learn, a constant
    model = fit(features[~test], labels[~test], pids[~test], CLASSES, SMALL, seed=3)
    proba = model.predict_proba(features[test])
    assert proba.shape == (test.sum(), 3)
    for c in (0, 1):
        assert roc_auc_score(labels[test, c], proba[:, c]) > 0.8, CLASSES[c]
        assert model.selection[c]["estimator"] == "logistic"
        assert model.selection[c]["inner_auc"] > 0.7
        assert f"f{c}" in model.selection[c]["selected_features"]
    assert model.selection[2]["estimator"] == "prior" and np.all(proba[:, 2] == 0.0)
    # columns are found by name, in any order
    shuffled = features[test][list(reversed(features.columns))]
    np.testing.assert_array_equal(model.predict_proba(shuffled), proba)
    with pytest.raises(ValueError, match="missing"):
        model.predict_proba(features[test].drop(columns=["f3"]))


def test_forest_is_tuned_alongside_the_logistic_regression():
    features, labels, pids = _cohort(30)
    cfg = {**TINY, "estimators": ["logistic", "forest"]}
    model = fit(features, labels, pids, CLASSES, cfg, seed=0)
    assert {s["estimator"] for s in model.selection} <= {"logistic", "forest"}
    assert all(0 <= p <= 1 for p in model.predict_proba(features).ravel())


def _no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)


@pytest.mark.parametrize("estimators", [["logistic"], ["forest"]])
def test_saved_model_round_trips_exactly_without_pickle(tmp_path, monkeypatch, estimators):
    features, labels, pids = _cohort(30)
    cfg = {**TINY, "estimators": estimators}
    model = fit(features, labels, pids, CLASSES, cfg, seed=5)
    umask = os.umask(0o022)
    try:
        model.save(tmp_path / "m")
    finally:
        os.umask(umask)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {MODEL_FILE, MODEL_META_FILE}
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()} == {0o644}
    with open(tmp_path / "m" / MODEL_FILE, "rb") as f:
        assert f.read(2) == b"PK"  # a zip (JSON + .npy), not a pickle stream
    _no_pickle(monkeypatch)
    loaded = RadiomicsModel.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict_proba(features), model.predict_proba(features))
    assert loaded.classes == CLASSES and loaded.feature_names == model.feature_names
    assert loaded.selection == json.loads(json.dumps(model.selection))
    assert loaded.config == RadiomicsModelConfig.from_config(cfg) and loaded.seed == 5


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.target}",))


def test_malicious_files_are_refused(tmp_path):
    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    features, labels, pids = _cohort(20)
    model = fit(features, labels, pids, CLASSES, TINY, seed=0)
    folder = model.save(tmp_path / "m")
    meta_path = folder / MODEL_META_FILE

    def rehash() -> None:  # a forger who also rewrites the JSON
        meta = json.loads(meta_path.read_text())
        meta["skops_sha256"] = sha256_file(folder / MODEL_FILE)
        meta_path.write_text(json.dumps(meta))

    # 1. a skops file holding a function that runs a command
    sio.dump(
        [FunctionTransformer(func=os.system, kw_args={"command": "true"})] * 3, folder / MODEL_FILE
    )
    rehash()
    with pytest.raises(CheckpointError, match=r"not trusted.*system"):
        RadiomicsModel.load(folder)
    # 2. a pickle with a __reduce__ payload under the skops name: never unpickled
    _Payload.target = tmp_path / "pwned"
    (folder / MODEL_FILE).write_bytes(pickle.dumps(_Payload()))
    rehash()
    with pytest.raises(CheckpointError, match="not a skops file"):
        RadiomicsModel.load(folder)
    assert not _Payload.target.exists()
    # 3. a file that is not the one its JSON describes
    model.save(folder)
    (folder / MODEL_FILE).write_bytes((folder / MODEL_FILE).read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="sha256"):
        RadiomicsModel.load(folder)
    with pytest.raises(CheckpointError, match="not a readable"):
        RadiomicsModel.load(tmp_path / "nowhere")


def test_prediction_frame_has_the_job_folder_columns():
    lesions = pd.DataFrame({"patient_id": ["P1", "P1", "P2"], "lesion": [1, 2, 1]})
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    proba = np.array([[0.9, 0.1, 0.2], [0.8, 0.3, 0.1], [0.2, 0.1, 0.7]])
    frame = prediction_frame(lesions, labels, proba, CLASSES, fold=2)
    assert list(frame.columns) == [
        "patient_id",
        "lesion",
        "crop_id",
        "slice",
        "fold",
        *CLASSES,
        *(f"p_{c}" for c in CLASSES),
    ]
    assert frame["crop_id"].isna().all() and frame["slice"].isna().all()
    assert (frame["fold"] == 2).all() and frame["p_OTHER"].tolist() == [0.2, 0.1, 0.7]
    csv = frame.to_csv(index=False).splitlines()
    assert csv[1] == "P1,1,,,2,1,0,0,0.9,0.1,0.2"


def test_config_from_yaml_block():
    from omegaconf import OmegaConf

    from crc_lightning.apps._hydra import CONF_DIR

    block = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/radiomics/default.yaml"))
    cfg = RadiomicsModelConfig.from_config(block["model"])
    assert RadiomicsParams.from_config(block["features"]) == RadiomicsParams()  # same defaults
    assert cfg.estimators == ("logistic",) and cfg.C == (0.01, 0.1, 1.0, 10.0)
    with pytest.raises(ValueError, match=r"unknown radiomics\.model"):
        RadiomicsModelConfig.from_config({"alpha": 1})
    with pytest.raises(ValueError, match="estimators"):
        RadiomicsModelConfig.from_config({"estimators": ["svm"]})
