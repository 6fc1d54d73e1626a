"""Patient-grouped stratified splits: disjointness, coverage, stratification, seeds, small cohorts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import GroupShuffleSplit, KFold

from crc_lightning.data.splits import (
    STRATIFY_CLASSES,
    Split,
    gene_matrix,
    holdout_split,
    kfold_splits,
    patient_labels,
    plan_folds,
    split_for,
)
from crc_lightning.io.errors import InputError

SEEDS = range(200)
CLASSES = ["RAS", "PIK3CA_BRAF", "OTHER"]


def _cohort(n_patients: int = 50, seed: int = 0) -> pd.DataFrame:
    """One row per lesion, 1–3 lesions per patient, multi-label (RAS and PIK3CA_BRAF co-occur)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for _ in range(rng.integers(1, 4)):
            kras, nras, braf, pik3ca = rng.random(4) < [0.4, 0.1, 0.08, 0.2]
            rows.append(
                {
                    "patient_id": f"P{p:03d}",
                    "RAS": int(kras | nras),
                    "PIK3CA_BRAF": int(braf | pik3ca),
                    "OTHER": int(not (kras | nras | braf | pik3ca)),
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return _cohort()


@pytest.fixture(scope="module")
def patients(cohort) -> tuple[np.ndarray, np.ndarray]:
    return patient_labels(cohort)


def _check_partition(s: Split, all_ids: np.ndarray) -> None:
    train, val, test = (set(s.train), set(s.val), set(s.test))
    assert train and val and test, "every side must hold a patient"
    assert not train & val and not train & test and not val & test, "a patient on two sides"
    assert train | val | test == set(all_ids)
    assert len(s.train) + len(s.val) + len(s.test) == len(all_ids)


def _prevalence(y: np.ndarray, ids: np.ndarray, side: np.ndarray) -> np.ndarray:
    return y[np.isin(ids, side)].mean(axis=0)


def _floor(prev: np.ndarray, n: int) -> np.ndarray:
    """Smallest |k/n − p| reachable by any n-patient set: stratification cannot beat this."""
    return np.abs(np.round(prev * n) / n - prev)


def test_patient_labels_or_over_lesions():
    df = pd.DataFrame({"patient_id": ["b", "a", "b", "a"], "X": [1, 0, 0, 0], "Y": [0, 0, 1, 1]})
    ids, y = patient_labels(df)
    assert list(ids) == ["a", "b"]
    np.testing.assert_array_equal(y, [[False, True], [True, True]])


def test_holdout_partitions_patients_over_200_seeds(cohort, patients):
    ids, _ = patients
    for seed in SEEDS:
        s = holdout_split(cohort, seed, test_size=0.1, val_size=0.1)
        _check_partition(s, ids)
        assert (len(s.train), len(s.val), len(s.test)) == (40, 5, 5)


def test_kfold_every_patient_tested_once_per_repeat_over_200_seeds(cohort, patients):
    ids, _ = patients
    for seed in SEEDS:
        folds = kfold_splits(cohort, n_splits=10, n_repeats=1, seed=seed, val_size=0.1)
        assert len(folds) == 10
        for s in folds:
            _check_partition(s, ids)
            assert len(s.val) == 5
        tested = np.concatenate([s.test for s in folds])
        assert sorted(tested) == sorted(ids), "each patient in exactly one test fold"


def test_holdout_preserves_label_prevalence(cohort, patients):
    """Tolerance: with 5 test patients a prevalence moves in steps of 0.2, so no split can be closer
    than ``_floor`` (0.02–0.08 here). Iterative stratification must land within 0.05 of that floor
    on average over 200 seeds, and at most half the deviation of an unstratified patient-grouped
    split (sklearn GroupShuffleSplit, ≈ 0.17 here) — i.e. it must actually stratify. Measured:
    excess over the floor ≈ 0.02 vs ≈ 0.09–0.16 for the unstratified split."""
    ids, y = patients
    prev = y.mean(axis=0)
    strat, rand = [], []
    for seed in SEEDS:
        s = holdout_split(cohort, seed)
        strat.append(np.abs(_prevalence(y, ids, s.test) - prev))
        _, te = next(GroupShuffleSplit(1, test_size=5, random_state=seed).split(ids, groups=ids))
        rand.append(np.abs(y[te].mean(axis=0) - prev))
    strat_mean, rand_mean = np.mean(strat, axis=0), np.mean(rand, axis=0)
    assert np.all(strat_mean <= _floor(prev, 5) + 0.05), (strat_mean, _floor(prev, 5))
    floor = _floor(prev, 5)
    assert np.all(strat_mean - floor <= 0.5 * (rand_mean - floor)), (strat_mean, rand_mean)


def test_kfold_preserves_label_prevalence(cohort, patients):
    """Same tolerance per fold (floor of that fold's size + 0.05; excess ≤ half of shuffled KFold's
    excess). Measured on 60 seeds × 10 folds: excess ≈ 0.01–0.03 vs ≈ 0.09–0.14 unstratified."""
    ids, y = patients
    prev = y.mean(axis=0)
    strat, floors, rand = [], [], []
    for seed in range(60):
        for s in kfold_splits(cohort, n_splits=10, seed=seed):
            strat.append(np.abs(_prevalence(y, ids, s.test) - prev))
            floors.append(_floor(prev, len(s.test)))
        for _, te in KFold(10, shuffle=True, random_state=seed).split(ids):
            rand.append(np.abs(y[te].mean(axis=0) - prev))
    strat_mean, rand_mean = np.mean(strat, axis=0), np.mean(rand, axis=0)
    floor = np.mean(floors, axis=0)
    assert np.all(strat_mean <= floor + 0.05), (strat_mean, floor)
    assert np.all(strat_mean - floor <= 0.5 * (rand_mean - floor)), (strat_mean, rand_mean)


def test_same_seed_same_split_and_seeds_differ(cohort):
    a, b = holdout_split(cohort, 7), holdout_split(cohort, 7)
    for side in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, side), getattr(b, side))
    tests = {tuple(holdout_split(cohort, s).test) for s in range(20)}
    assert len(tests) > 10


def test_split_for_selects_mode_fold_and_repeat(cohort):
    h = split_for({"mode": "holdout", "test_size": 0.1, "val_size": 0.1}, cohort, seed=3)
    np.testing.assert_array_equal(h.test, holdout_split(cohort, 3).test)

    rep = kfold_splits(cohort, n_splits=5, n_repeats=3, seed=10)
    assert not np.array_equal(rep[0].test, rep[5].test), "repeats are different partitions"
    for r in range(3):
        for f in (0, 4):
            s = split_for(
                {"mode": "kfold", "n_splits": 5, "fold": f, "repeat": r, "val_size": 0.1},
                cohort,
                seed=10,
            )
            assert (s.mode, s.fold, s.repeat) == ("kfold", f, r)
            np.testing.assert_array_equal(s.test, rep[r * 5 + f].test)
            np.testing.assert_array_equal(s.val, rep[r * 5 + f].val)
            # seed offsets the repeat: (seed 10, repeat r) is (seed 10 + r, repeat 0)
            t = split_for({"mode": "kfold", "n_splits": 5, "fold": f}, cohort, seed=10 + r)
            np.testing.assert_array_equal(s.test, t.test)

    with pytest.raises(ValueError, match="fold"):
        split_for({"mode": "kfold", "n_splits": 5, "fold": 5}, cohort, seed=0)
    with pytest.raises(ValueError, match="mode"):
        split_for({"mode": "loo"}, cohort, seed=0)
    # mode cv: one fold of the same partition (the datamodule's fallback)
    cv = split_for({"mode": "cv", "n_splits": 5, "fold": 2}, cohort, seed=10)
    np.testing.assert_array_equal(cv.test, rep[2].test)


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_small_cohorts_keep_every_side_nonempty(n):
    df = _cohort(n, seed=n)
    ids, _ = patient_labels(df)
    for seed in range(30):
        s = holdout_split(df, seed, test_size=0.1, val_size=0.1)
        _check_partition(s, ids)
        assert len(s.test) == 1 and len(s.val) == 1  # 10 % of ≤ 8 rounds to 0 → at least 1
    if n >= 4:
        for seed in range(10):
            folds = kfold_splits(df, n_splits=3, seed=seed)
            for s in folds:
                _check_partition(s, ids)
            assert sorted(np.concatenate([s.test for s in folds])) == sorted(ids)


def test_too_small_or_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 3 patients"):
        holdout_split(_cohort(2), 0)
    with pytest.raises(ValueError, match="at least 11 patients"):
        kfold_splits(_cohort(10), n_splits=10)
    with pytest.raises(ValueError, match="test_size"):
        holdout_split(_cohort(20), 0, test_size=1.5)
    with pytest.raises(ValueError, match="patient_id"):
        holdout_split(pd.DataFrame({"X": [1, 0, 1]}), 0)
    bad = _cohort(10).astype({"RAS": "Int8"})
    bad.loc[0, "RAS"] = pd.NA
    with pytest.raises(ValueError, match="missing labels"):
        holdout_split(bad, 0)


def test_single_class_and_all_negative_labels_still_split():
    df = _cohort(20)[["patient_id", "RAS"]]
    ids, _ = patient_labels(df)
    _check_partition(holdout_split(df, 1), ids)
    df0 = df.assign(RAS=0)
    _check_partition(holdout_split(df0, 1), ids)
    for s in kfold_splits(df0, n_splits=4, seed=1):
        _check_partition(s, ids)


def test_summary_has_metrics_json_keys(cohort):
    summary = holdout_split(cohort, 0).summary()
    assert summary["mode"] == "holdout"
    assert (summary["n_train_patients"], summary["n_val_patients"], summary["n_test_patients"]) == (
        40,
        5,
        5,
    )
    side = holdout_split(cohort, 0).side_of(["P000", "nobody"])
    assert side[1] == "" and side[0] in {"train", "val", "test"}


# ----------------------------------------------------------------------------- a job's folds
GENE_COLS = ["KRAS", "NRAS", "BRAF", "PIK3CA"]


def _crop_rows(n_patients: int = 50, seed: int = 0) -> pd.DataFrame:
    """Crop rows as the store index has them: patient_id + the four gene columns (1–3 lesions of
    2–4 slices per patient; a patient's lesions share nothing, so patient truth is an OR)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for _lesion in range(rng.integers(1, 4)):
            genes = (rng.random(4) < [0.4, 0.1, 0.08, 0.2]).astype(int)
            rows += [{"patient_id": f"P{p:03d}", **dict(zip(GENE_COLS, genes))}] * rng.integers(
                2, 5
            )
    return pd.DataFrame(rows)


def test_gene_matrix_is_the_five_gene_classes():
    rows = pd.DataFrame({"patient_id": [1, 2, 3], "KRAS": [1, 0, 0], "NRAS": [0, 0, 1],
                         "BRAF": [0, 0, 1], "PIK3CA": [0, 0, 0]})  # fmt: skip
    m = gene_matrix(rows)
    assert list(m.columns) == ["patient_id", *STRATIFY_CLASSES]
    assert list(m["patient_id"]) == ["1", "2", "3"]
    np.testing.assert_array_equal(m[list(STRATIFY_CLASSES)], [[1, 0, 0, 0, 0], [0, 0, 0, 0, 1],
                                                               [0, 1, 1, 0, 0]])  # fmt: skip
    with pytest.raises(ValueError, match="missing gene labels"):
        gene_matrix(rows.astype({"KRAS": "Int8"}).assign(KRAS=pd.array([1, None, 0], "Int8")))


def test_cv_plan_tests_every_patient_once_per_repeat():
    """Five repeats (seeds 0..4): in each, every patient in exactly one test fold, no patient on two
    sides of a fold, validation carved from the fold's training patients."""
    strat = gene_matrix(_crop_rows())
    ids = np.array(sorted(strat["patient_id"].unique()))
    tests_by_seed = []
    for seed in range(5):
        plan = plan_folds({"mode": "cv", "n_splits": 5, "val_size": 0.1}, strat, seed)
        assert (plan.protocol, plan.n_splits, plan.trained) == ("cv", 5, (0, 1, 2, 3, 4))
        tested = np.concatenate([s.test for _, s in plan.folds])
        assert sorted(tested) == list(ids)  # once each, every patient
        for _, s in plan.folds:
            _check_partition(s, ids)
            assert len(s.val) == 5
        assert plan.test_patients() == list(ids)
        tests_by_seed.append([tuple(s.test) for s in plan.partition])
    assert len({tuple(t) for t in tests_by_seed}) == 5, "repeats are different partitions"


def test_kfold_job_is_one_fold_of_the_cv_partition_and_holdout_unchanged():
    strat = gene_matrix(_crop_rows())
    cv = plan_folds({"mode": "cv", "n_splits": 5}, strat, seed=3)
    for f in range(5):
        k = plan_folds({"mode": "kfold", "n_splits": 5, "fold": f}, strat, seed=3)
        assert k.trained == (f,) and k.partition_hash() == cv.partition_hash()
        np.testing.assert_array_equal(k.folds[0][1].test, cv.partition[f].test)
        np.testing.assert_array_equal(k.folds[0][1].val, cv.partition[f].val)
    h = plan_folds({"mode": "holdout", "test_size": 0.1, "val_size": 0.1}, strat, seed=3)
    # the paper's protocol: exactly holdout_split on the same (five-gene) patients
    ref = holdout_split(strat, 3, 0.1, 0.1)
    assert h.trained == (0,) and h.n_splits == 1
    for side in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(h.partition[0], side), getattr(ref, side))
    assert h.summary()["n_test_patients"] == len(ref.test) and h.summary()["fold"] == 0


def test_five_gene_stratification_makes_label_sets_test_the_same_patients():
    """Oracle: the plan only ever sees the gene matrix, so the three-class and five-class encodings
    of the same rows give the same folds; stratifying on the label set's own classes (what the
    splits did before) does not — the property is not trivially true."""
    rows = _crop_rows()
    three = pd.DataFrame({"patient_id": rows["patient_id"],
                          "RAS": rows["KRAS"] | rows["NRAS"],
                          "PIK3CA_BRAF": rows["PIK3CA"] | rows["BRAF"]})  # fmt: skip
    three["OTHER"] = 1 - (three["RAS"] | three["PIK3CA_BRAF"])
    cfg = {"mode": "cv", "n_splits": 5}
    by_genes = [tuple(s.test) for s in plan_folds(cfg, gene_matrix(rows), 0).partition]
    by_three = [
        [tuple(s.test) for s in plan_folds(cfg, three, seed).partition] for seed in range(5)
    ]
    by_genes_all = [
        [tuple(s.test) for s in plan_folds(cfg, gene_matrix(rows), seed).partition]
        for seed in range(5)
    ]
    assert by_genes_all[0] == by_genes
    assert any(a != b for a, b in zip(by_genes_all, by_three)), "label-set stratification differs"


def test_cv_folds_are_stratified_like_iterstrat_and_better_than_unstratified():
    """Per-fold |prevalence − cohort prevalence| of the five gene classes: at most iterstrat's own
    ``MultilabelStratifiedKFold`` (the oracle; the plan keeps the best of 8 of its partitions), and
    its excess over the floor no fold of that size can beat (``_floor``) at most half of sklearn's
    unstratified ``KFold``'s (40 seeds × 5 folds of 10 patients)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    strat = gene_matrix(_crop_rows())
    ids, y = patient_labels(strat)
    prev = y.mean(axis=0)
    ours, theirs, rand, floors = [], [], [], []
    for seed in range(40):
        for _, s in plan_folds({"mode": "cv", "n_splits": 5}, strat, seed).folds:
            ours.append(np.abs(_prevalence(y, ids, s.test) - prev))
            floors.append(_floor(prev, len(s.test)))
        mskf = MultilabelStratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
        for _, te in mskf.split(np.zeros((len(ids), 1)), y.astype(int)):
            theirs.append(np.abs(y[te].mean(axis=0) - prev))
        for _, te in KFold(5, shuffle=True, random_state=seed).split(ids):
            rand.append(np.abs(y[te].mean(axis=0) - prev))
    ours_m, theirs_m, rand_m, floor = (np.mean(a, axis=0) for a in (ours, theirs, rand, floors))
    print("mean |fold - cohort| prevalence (ours, iterstrat, KFold, floor):",
          *(a.round(3) for a in (ours_m, theirs_m, rand_m, floor)))  # fmt: skip
    assert np.all(ours_m <= theirs_m + 1e-9), (ours_m, theirs_m)
    assert np.all(ours_m - floor <= 0.5 * (rand_m - floor)), (ours_m, rand_m, floor)


def test_splits_file_round_trip_and_validation(tmp_path):
    import json

    strat = gene_matrix(_crop_rows(20))
    plan = plan_folds({"mode": "cv", "n_splits": 4, "val_size": 0.15}, strat, seed=2)
    doc = plan.document()
    assert doc["protocol"] == "cv" and doc["n_splits"] == 4 and doc["seed"] == 2
    assert doc["stratified_on"] == list(STRATIFY_CLASSES)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(doc))
    again = plan_folds({"mode": "cv", "file": str(path)}, strat, seed=2)
    assert again.partition_hash() == plan.partition_hash()
    assert again.summary()["source"] == "file" and again.protocol == "cv"
    one = plan_folds({"mode": "kfold", "fold": 3, "file": str(path)}, strat, seed=2)
    assert one.trained == (3,) and one.protocol == "kfold"
    np.testing.assert_array_equal(one.folds[0][1].test, plan.partition[3].test)

    def bad(edit, match):
        d = json.loads(json.dumps(doc))
        edit(d)
        path.write_text(json.dumps(d))
        with pytest.raises(InputError, match=match) as e:
            plan_folds({"mode": "cv", "file": str(path)}, strat, seed=2)
        assert str(path) in str(e.value)

    bad(lambda d: d["folds"][1]["train"].append("NOBODY"), "not labelled patients of this")
    bad(lambda d: d["folds"][0]["train"].pop(), "on no side")
    bad(lambda d: d["folds"][0]["val"].append(d["folds"][0]["test"][0]), "listed twice")
    bad(lambda d: d["folds"][2]["val"].clear(), "val missing or empty")

    # two folds testing the same patient: each one is valid alone, together no partition
    def swap(d):
        a, b = d["folds"][0], d["folds"][1]
        twice = b["test"][-1]  # stays in b's test and joins a's: tested by two folds
        a["test"].append(twice)
        a["train"].remove(twice) if twice in a["train"] else a["val"].remove(twice)

    bad(swap, "not a partition")
    path.write_text("{not json")
    with pytest.raises(InputError, match="not a splits file"):
        plan_folds({"mode": "cv", "file": str(path)}, strat, seed=2)
    with pytest.raises(InputError, match="no such splits file"):
        plan_folds({"mode": "cv", "file": str(tmp_path / "none.json")}, strat, seed=2)
