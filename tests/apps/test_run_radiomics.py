"""``run variant=radiomics`` and ``variant=fusion`` on a tiny synthetic cohort (real preprocessing
and real PyRadiomics features): the job-folder contract, the radiomics model never fitted on a
val or test patient, the same folds as a deep job of the seed, the report's rows, resume, and the
fusion weight and fused probabilities recomputed by hand from each member's own outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from sklearn.metrics import roc_auc_score

from crc_lightning.apps.run import run
from crc_lightning.models import radiomics as radiomics_mod
from crc_lightning.models.radiomics import RadiomicsModel
from tests.helpers.config import CONF_DIR
from tests.helpers.stores import synthetic_store

N_PATIENTS = 16
CLASSES = ["RAS", "PIK3CA_BRAF", "OTHER"]
COLUMNS = ["patient_id", "lesion", "crop_id", "slice", "fold", *CLASSES,
           *(f"p_{c}" for c in CLASSES)]  # fmt: skip
TINY = ("model.backbone.weights=none", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "datamodule.batch_size=4", "+trainer.num_sanity_val_steps=0")  # fmt: skip
# a small model grid keeps the inner CV at a second per fold
FAST_MODEL = ("radiomics.model.k_features=[5]", "radiomics.model.C=[0.1,1.0]",
              "radiomics.model.inner_folds=3")  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return synthetic_store(tmp_path_factory.mktemp("data") / "crops" / "synthetic", N_PATIENTS)


def make_cfg(store: Path, out: Path, *overrides: str):
    base = [
        f"data.store={store}",
        f"data.root={store.parent / 'raw'}",  # where synthetic_store generated the cohort
        f"data.synthetic.n_patients={N_PATIENTS}",
        "data.synthetic.dicom_fraction=0.0",
        f"paths.root_dir={out.parent}",
        f"paths.output_dir={out}",
        "labels=three",
        "res=32",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "radiomics.progress=false",
        "logger=none",
        "print_metrics=false",
        "split.n_splits=2",
        "split.val_size=0.25",  # ≥ 4 validation patients per fold: the fusion weight has data
        *FAST_MODEL,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("run", overrides=[*base, *overrides])


def _spy_fit(monkeypatch) -> list[set[str]]:
    """The patients every radiomics fit is given."""
    seen: list[set[str]] = []
    real = radiomics_mod.fit

    def spy(features, labels, patient_ids, *a, **k):
        seen.append({str(p) for p in patient_ids})
        return real(features, labels, patient_ids, *a, **k)

    monkeypatch.setattr(radiomics_mod, "fit", spy)
    return seen


@pytest.fixture(scope="module")
def jobs(store, tmp_path_factory):
    """A radiomics, a deep (random init) and a fusion job of seed 1, the radiomics fits seen."""
    root = tmp_path_factory.mktemp("jobs")
    mp = pytest.MonkeyPatch()
    try:
        seen = _spy_fit(mp)
        rad = run(make_cfg(store, root / "radiomics", "variant=radiomics", "seed=1"))
        fits = list(seen)
        deep = run(make_cfg(store, root / "baseline", "variant=baseline", "seed=1", *TINY))
        fusion = run(make_cfg(store, root / "fusion", "variant=fusion", "seed=1", *TINY))
    finally:
        mp.undo()
    return root, {"radiomics": rad, "baseline": deep, "fusion": fusion}, fits


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"patient_id": str})


def test_radiomics_job_writes_the_run_contract(store, jobs) -> None:
    root, results, _ = jobs
    out, result = root / "radiomics", results["radiomics"]
    stored = json.loads((out / "metrics.json").read_text())
    assert stored == result
    deep = results["baseline"]
    assert set(deep) <= set(stored)  # every key of a deep job, plus the features summary
    assert stored["variant"] == "radiomics" and stored["weights"]["init"] == "radiomics"
    assert stored["protocol"] == "cv" and stored["best_epoch"] is None
    assert [list(f) for f in stored["folds"]] == [list(f) for f in deep["folds"]]
    assert stored["radiomics"]["n_features"] > 50 and stored["radiomics"]["fit_on"] == "train"
    assert list(stored["metrics"]) == ["image", "lesion", "patient"]
    pred, val = _read(out / "predictions.csv"), _read(out / "val_predictions.csv")
    assert list(pred.columns) == COLUMNS and list(val.columns) == COLUMNS
    assert pred["crop_id"].isna().all() and pred["slice"].isna().all()  # lesion rows
    # one row per labelled lesion of the store, each tested once
    index = pd.read_parquet(store / "index.parquet")
    lesions = set(zip(index["patient_id"].astype(str), index["lesion"], strict=True))
    assert set(zip(pred["patient_id"], pred["lesion"], strict=True)) == lesions
    assert not pred.duplicated(["patient_id", "lesion"]).any()
    # image level = lesion level (the rows are lesions); metrics recomputed by sklearn
    assert stored["metrics"]["image"] == stored["metrics"]["lesion"]
    for c in CLASSES:
        expect = roc_auc_score(pred[c], pred[f"p_{c}"])
        got = stored["metrics"]["lesion"]["per_class"][c]["auc"]
        assert got == pytest.approx(expect, abs=1e-6)


def test_radiomics_model_never_sees_a_val_or_test_patient(store, jobs) -> None:
    root, _, fits = jobs
    out = root / "radiomics"
    splits = json.loads((out / "splits.json").read_text())
    assert len(fits) == len(splits["folds"]) == 2
    pred = _read(out / "predictions.csv")
    (table,) = store.glob("radiomics/*/features.parquet")  # the cache the job read
    features = pd.read_parquet(table).astype({"patient_id": str})
    for fold, fitted in zip(splits["folds"], fits, strict=True):
        f = fold["fold"]
        assert fitted == set(fold["train"])  # exactly the train side: no val, no test patient
        assert not fitted & (set(fold["val"]) | set(fold["test"]))
        model = RadiomicsModel.load(out / "models" / f"fold{f}")
        assert model.n_train_patients == len(fold["train"])
        # the saved model reproduces its test predictions from the store's feature table
        rows = pred[pred["fold"] == f].reset_index(drop=True)
        feats = rows.merge(features, on=["patient_id", "lesion"], how="left")
        expect = model.predict_proba(feats[list(model.feature_names)])
        np.testing.assert_allclose(rows[[f"p_{c}" for c in CLASSES]], expect, atol=1e-12)
        assert set(rows["patient_id"]) == set(fold["test"])


def test_folds_equal_a_deep_job_of_the_seed(jobs) -> None:
    root, results, _ = jobs
    docs = {v: json.loads((root / v / "splits.json").read_text()) for v in results}
    assert docs["radiomics"] == docs["baseline"] == docs["fusion"]
    assert results["radiomics"]["split"] == results["baseline"]["split"]


def test_report_puts_radiomics_and_fusion_beside_the_deep_variant(jobs, tmp_path) -> None:
    from crc_lightning.evaluation.results import build_repeats, evaluate, find_job_dirs, load_job

    root, _, _ = jobs
    repeats = build_repeats(load_job(p) for p in find_job_dirs(root))
    ev = evaluate(repeats, levels=("image", "lesion"), with_calibration=False)
    pooled = ev.results[ev.results["scope"] == "repeat"]
    arms = set(zip(pooled["variant"], pooled["weights"], strict=True))
    assert arms == {("radiomics", "radiomics"), ("baseline", "none"), ("fusion", "none")}
    rad = pooled[(pooled["variant"] == "radiomics") & (pooled["level"] == "lesion")]
    pred = _read(root / "radiomics" / "predictions.csv")
    assert rad["auc"].iloc[0] == pytest.approx(roc_auc_score(pred["RAS"], pred["p_RAS"]))

    from crc_lightning.evaluation.report import make_report

    md = make_report(root, tmp_path / "report", levels=["lesion"], permutations=50,
                     bootstrap=50).read_text()  # fmt: skip
    for arm in (
        "| radiomics | radiomics | cv |",
        "| baseline | none | cv |",
        "| fusion | none | cv |",
    ):
        rows = [line for line in md.splitlines() if line.startswith(arm)]
        assert rows, f"no {arm} row in the report's tables"
        first_cell = rows[0].split("|")[4].strip()
        assert first_cell != "–" and "[" in first_cell  # a value with its CI


def test_resume_skips_and_a_model_setting_refits(store, jobs, monkeypatch, tmp_path) -> None:
    import shutil

    root, results, _ = jobs
    seen = _spy_fit(monkeypatch)
    out = tmp_path / "radiomics"  # a copy: the other tests read the original
    shutil.copytree(root / "radiomics", out)
    again = run(make_cfg(store, out, "variant=radiomics", "seed=1"))
    assert again == results["radiomics"] and seen == []
    # a deep-only setting cannot change a radiomics job: still resumed
    run(make_cfg(store, out, "variant=radiomics", "seed=1", "model.dropout=0.5"))
    assert seen == []
    run(make_cfg(store, out, "variant=radiomics", "seed=1", "radiomics.model.C=[1.0]"))
    assert len(seen) == 2  # retrained, one fit per fold


def _lesion_mean(crops: pd.DataFrame) -> pd.DataFrame:
    """By hand: a lesion's deep probability = the mean over its crops."""
    probs = [f"p_{c}" for c in CLASSES]
    return crops.groupby(["fold", "patient_id", "lesion"], as_index=False)[
        [*CLASSES, *probs]
    ].mean()


def test_fusion_weight_is_the_val_grid_search_and_test_is_the_convex_mix(jobs) -> None:
    root, results, _ = jobs
    out = root / "fusion"
    probs = [f"p_{c}" for c in CLASSES]
    deep_val = _lesion_mean(_read(out / "val_predictions_deep.csv"))
    rad_val = _read(out / "val_predictions_radiomics.csv")
    grid = [i / 10 for i in range(11)]
    chosen = results["fusion"]["fusion"]
    assert sorted(chosen) == ["0", "1"]
    defined = 0
    for fold in (0, 1):
        v = deep_val[deep_val["fold"] == fold].merge(
            rad_val[rad_val["fold"] == fold], on=["patient_id", "lesion"], suffixes=("", "_r")
        )
        mean_auc = []
        for w in grid:
            aucs = [
                roc_auc_score(v[c], w * v[f"p_{c}"] + (1 - w) * v[f"p_{c}_r"])
                for c in CLASSES
                if v[c].nunique() == 2
            ]
            mean_auc.append(np.mean(aucs) if aucs else np.nan)
        if np.all(np.isnan(mean_auc)):
            expect = 0.5
        else:
            defined += 1
            best = np.nanmax(mean_auc)
            ties = [w for w, s in zip(grid, mean_auc, strict=True) if s >= best - 1e-12]
            expect = min(ties, key=lambda w: (abs(w - 0.5), w))
        assert chosen[str(fold)] == {c: pytest.approx(expect) for c in CLASSES}
        record = json.loads((out / "models" / f"fold{fold}" / "fusion.json").read_text())
        assert record["weights"] == chosen[str(fold)]
        assert (out / "checkpoints" / f"fold{fold}" / "best.ckpt").is_file()
        assert (out / "models" / f"fold{fold}" / "radiomics.skops").is_file()
    assert defined >= 1, "no fold had a class with both outcomes on validation: enlarge the cohort"

    # fused test = w·(mean of the deep crops) + (1 − w)·radiomics, lesion by lesion
    deep = _lesion_mean(_read(out / "predictions_deep.csv"))
    rad = _read(out / "predictions_radiomics.csv")
    fused = _read(out / "predictions.csv")
    assert list(fused.columns) == COLUMNS and fused["crop_id"].isna().all()
    both = fused.merge(deep, on=["fold", "patient_id", "lesion"], suffixes=("", "_d")).merge(
        rad, on=["fold", "patient_id", "lesion"], suffixes=("", "_r")
    )
    assert len(both) == len(fused) == len(rad)
    w = both["fold"].astype(str).map(lambda f: chosen[f]["RAS"]).to_numpy()
    for p in probs:
        np.testing.assert_allclose(both[p], w * both[f"{p}_d"] + (1 - w) * both[f"{p}_r"])
    # its radiomics member is the radiomics job's model: same seed, same folds, same predictions
    alone = _read(root / "radiomics" / "predictions.csv")
    pd.testing.assert_frame_equal(rad.sort_values(["patient_id", "lesion"]).reset_index(drop=True),
                                  alone.sort_values(["patient_id", "lesion"]).reset_index(drop=True))  # fmt: skip
