"""``predict checkpoint=<job | sweep folder>``: fold and seed ensembles of deep, radiomics and fusion
members. Oracles: each member predicted alone (``checkpoint=<its .ckpt / job folder>``) and numpy's
mean / SD / min / max over them; the radiomics model's own ``predict_proba`` on the features of
the same CT and mask; a hand-written forward pass for a single checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from crc_lightning.apps.predict import predict
from crc_lightning.apps.run import run
from crc_lightning.cropstore.format import store_hash
from crc_lightning.cropstore.writer import build_crop_store
from crc_lightning.inference.ensemble import load_ensemble
from crc_lightning.inference.predictor import model_inputs
from crc_lightning.io import read_image, read_mask
from crc_lightning.models import radiomics as rad
from crc_lightning.models.checkpoint import CheckpointError, load_model
from crc_lightning.preprocessing.algorithm import PreprocessParams, preprocess_scan
from crc_lightning.preprocessing.radiomics import RadiomicsParams, scan_features
from crc_lightning.sources.manifest import read_manifest
from crc_lightning.sources.synthetic import ensure_synthetic_cohort
from tests.helpers.config import compose_app

CLASSES = ["KRAS", "NRAS", "BRAF", "PIK3CA", "OTHER"]
PCOLS = [f"p_{c}" for c in CLASSES]
FEATURES = {"feature_classes": ["shape", "firstorder"], "resample_mm": None}  # fast, native grid
FUSION_W = {"KRAS": 0.2, "NRAS": 0.4, "BRAF": 0.5, "PIK3CA": 0.7, "OTHER": 0.9}


def compose_cfg(name: str, *overrides: str):
    return compose_app(name, *overrides)


def _features(image_path: Path, mask_path: Path) -> dict[int, dict[str, float]]:
    image = read_image(image_path)
    mask = read_mask(mask_path, reference=image)
    return scan_features(
        image.array, mask.array, image.spacing, RadiomicsParams.from_config(FEATURES), "instance",
        26,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny synthetic cohort → crop store → a 2-fold cv `run` job (res 32, random init) → a
    sweep folder: that job, a radiomics job, a fusion job and one unfinished job folder."""
    base = tmp_path_factory.mktemp("ensemble")
    csv = ensure_synthetic_cohort(base / "raw", 12, 7, 0.0, shape=(24, 96, 96))
    store = base / "crops"
    build_crop_store(read_manifest(csv, source="synthetic"), store, {}, progress=False)
    sweep = base / "sweep"
    job = sweep / "0"
    run(compose_cfg(
        "run",
        f"data.store={store}", f"paths.root_dir={base}", f"paths.output_dir={job}",
        "res=32", "trainer=cpu", "trainer.enable_progress_bar=false", "print_metrics=false",
        "split=cv", "split.n_splits=2", "model.backbone.weights=none",
        "trainer.max_epochs=2", "datamodule.batch_size=4", "+trainer.num_sanity_val_steps=0",
        "model.optimizer.lr=0.05", "seed=0",
    ))  # fmt: skip
    manifest = pd.read_csv(csv, dtype={"patient_id": str})
    files = manifest.drop_duplicates("patient_id").set_index("patient_id")
    image = {p: csv.parent / r["image"] for p, r in files.iterrows()}
    mask = {p: csv.parent / r["mask"] for p, r in files.iterrows()}

    # a radiomics job (the run app's layout): fitted on fold 0's training patients
    splits = json.loads((job / "splits.json").read_text())
    train = splits["folds"][0]["train"]
    rows, labels, groups = [], [], []
    for pid in train:
        genes = manifest[manifest.patient_id == pid].set_index("lesion")
        for lesion, feats in _features(image[pid], mask[pid]).items():
            rows.append(feats)
            y = genes.loc[lesion, CLASSES[:4]].astype(int).tolist()
            labels.append([*y, int(not any(y))])
            groups.append(pid)
    model = rad.fit(pd.DataFrame(rows), np.array(labels), groups, CLASSES,
                    {"inner_folds": 2, "k_features": [3], "C": [1.0]}, seed=0)  # fmt: skip
    radiomics_job = sweep / "1"
    model.save(radiomics_job / "models" / "fold0")
    metrics = {"variant": "radiomics", "seed": 0, "classes": CLASSES,
               "folds": [{"fold": 0, "n_train_patients": len(train)}],
               "data": {"name": "synthetic", "store_hash": store_hash(store)}}  # fmt: skip
    (radiomics_job / "metrics.json").write_text(json.dumps(metrics))
    (radiomics_job / ".hydra").mkdir()
    hydra_cfg = {"data": {"store": str(store)}, "radiomics": {"features": FEATURES}}
    (radiomics_job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(hydra_cfg))

    # a fusion job: fold 1's checkpoint + the radiomics model + per-class weights
    fusion_job = sweep / "2"
    (fusion_job / "checkpoints" / "fold0").mkdir(parents=True)
    shutil.copy(job / "checkpoints" / "fold1" / "best.ckpt", fusion_job / "checkpoints" / "fold0")
    shutil.copytree(radiomics_job / "models", fusion_job / "models")
    shutil.copytree(radiomics_job / ".hydra", fusion_job / ".hydra")
    (fusion_job / "models" / "fold0" / "fusion.json").write_text(json.dumps({"weights": FUSION_W}))
    (fusion_job / "metrics.json").write_text(json.dumps({**metrics, "variant": "fusion"}))
    (sweep / "3" / "checkpoints" / "fold0").mkdir(parents=True)  # still training: no metrics.json
    return {
        "base": base, "csv": csv, "job": job, "sweep": sweep, "radiomics": model,
        "radiomics_job": radiomics_job, "fusion_job": fusion_job, "train": train,
        "splits": splits, "image": image, "mask": mask, "manifest": manifest,
    }  # fmt: skip


def _predict(trained: dict, checkpoint: Path, out: Path, pid: str, *extra: str) -> pd.DataFrame:
    cfg = compose_cfg(
        "predict",
        f"checkpoint={checkpoint}", f"paths.root_dir={trained['base']}", f"paths.output_dir={out}",
        "device=cpu", f"image={trained['image'][pid]}", f"mask={trained['mask'][pid]}",
        f"patient_id={pid}", "lesion_rule=instance", *extra,
    )  # fmt: skip
    predict(cfg)
    return pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})


def _test_patient(trained: dict) -> str:
    """A patient none of the members trained on: fold 0's test side (fold 1 trains on it, so it
    is a new patient for fold-0 members and the radiomics model only)."""
    return sorted(trained["splits"]["folds"][0]["test"])[0]


def test_job_folder_gives_one_member_per_fold(trained) -> None:
    ensemble = load_ensemble(trained["job"])
    assert ensemble.kind == "job" and len(ensemble.members) == 2
    assert [m.info["fold"] for m in ensemble.members] == [0, 1]
    assert {m.kind for m in ensemble.members} == {"deep"}
    for m, fold in zip(ensemble.members, trained["splits"]["folds"]):
        assert m.info["n_train_patients"] == len(fold["train"])
        assert m.info["path"] == str(trained["job"] / "checkpoints" / f"fold{fold['fold']}" /
                                     "best.ckpt")  # fmt: skip


def test_sweep_ensemble_is_the_mean_of_its_members(trained, tmp_path, capsys) -> None:
    pid = _test_patient(trained)
    sweep = _predict(trained, trained["sweep"], tmp_path / "sweep", pid)
    printed = capsys.readouterr().out
    assert "variants baseline ×2, fusion ×1, radiomics ×1" in printed
    assert "1 unfinished job folder(s) skipped: 3" in printed and "±" in printed
    job = trained["job"]
    alone = {
        "fold0": _predict(trained, job / "checkpoints/fold0/best.ckpt", tmp_path / "a", pid),
        "fold1": _predict(trained, job / "checkpoints/fold1/best.ckpt", tmp_path / "b", pid),
        "radiomics": _predict(trained, trained["radiomics_job"], tmp_path / "c", pid),
        "fusion": _predict(trained, trained["fusion_job"], tmp_path / "d", pid),
    }
    # the radiomics member = its model on the features of this CT and mask (lesions with crops)
    feats = _features(trained["image"][pid], trained["mask"][pid])
    scored = alone["fold0"]["n_slices"].to_numpy() > 0
    lesions = alone["fold0"]["lesion"].to_numpy()
    expected = trained["radiomics"].predict_proba(pd.DataFrame([feats[int(x)] for x in lesions]))
    got = alone["radiomics"][PCOLS].to_numpy()
    np.testing.assert_allclose(got[scored], expected[scored], rtol=1e-12)
    assert np.isnan(got[~scored]).all()
    # the fusion member = w·deep + (1 − w)·radiomics of its fold's two models
    w = np.array([FUSION_W[c] for c in CLASSES])
    np.testing.assert_allclose(
        alone["fusion"][PCOLS].to_numpy(),
        w * alone["fold1"][PCOLS].to_numpy() + (1 - w) * got,
        rtol=1e-12,
    )
    # the ensemble = numpy's mean, SD, min, max over the four members alone
    stack = np.stack([a[PCOLS].to_numpy() for a in alone.values()])[:, scored]
    assert scored.any() and (np.std(stack, axis=0) > 1e-2).sum() >= 5  # members really differ
    ens = sweep[scored]
    np.testing.assert_allclose(ens[PCOLS].to_numpy(), stack.mean(axis=0), rtol=1e-12)
    for fn, suffix in ((np.std, "sd"), (np.min, "min"), (np.max, "max")):
        cols = [f"{c}_{suffix}" for c in PCOLS]
        np.testing.assert_allclose(ens[cols].to_numpy(), fn(stack, axis=0), rtol=1e-12)
    assert (ens["n_members"] == 4).all()
    assert (sweep.loc[~scored, "n_members"] == 0).all()
    assert sweep["n_slices"].tolist() == alone["fold0"]["n_slices"].tolist()
    # slices: the mean of the three deep models (two folds, fusion's deep part = fold 1)
    slices = {k: pd.read_csv(tmp_path / d / "predictions_slices.csv")
              for k, d in (("sweep", "sweep"), ("fold0", "a"), ("fold1", "b"))}  # fmt: skip
    np.testing.assert_allclose(
        slices["sweep"][PCOLS].to_numpy(),
        (slices["fold0"][PCOLS].to_numpy() + 2 * slices["fold1"][PCOLS].to_numpy()) / 3,
        rtol=1e-6,
    )
    # the patient page shows p ± SD (min–max) per class
    page = (tmp_path / "sweep" / "patients" / f"{pid}.html").read_text()
    row = ens.iloc[0]
    cell = (f"{row['p_KRAS']:.3f} ± {row['p_KRAS_sd']:.3f} "
            f"({row['p_KRAS_min']:.3f}–{row['p_KRAS_max']:.3f})")  # fmt: skip
    assert cell in page and "mean over the 4 members" in page
    assert sorted(p.name for p in (tmp_path / "sweep" / "saliency").glob("*.png")) == [
        f"{pid}_{lesion}.png" for lesion in ens["lesion"]
    ]
    summary = json.loads((tmp_path / "sweep" / "predict.json").read_text())
    assert [m["kind"] for m in summary["members"]] == ["deep", "deep", "radiomics", "fusion"]


def test_a_single_checkpoint_is_a_plain_forward_pass(trained, tmp_path) -> None:
    """checkpoint=<.ckpt> as before: p = mean over the lesion's slices of sigmoid(model(x)) on
    Algorithm 1's crops (written out here by hand), n_members 1, SD 0."""
    pid = _test_patient(trained)
    ckpt = trained["job"] / "checkpoints" / "fold0" / "best.ckpt"
    got = _predict(trained, ckpt, tmp_path / "one", pid, "saliency=false").set_index("lesion")
    model, card = load_model(ckpt)
    image = read_image(trained["image"][pid])
    mask = read_mask(trained["mask"][pid], reference=image)
    params = PreprocessParams.from_config(card["preprocess"])
    crops, _ = preprocess_scan(image.array, mask.array, image.spacing, params, "instance")
    with torch.no_grad():
        prob = torch.sigmoid(model(model_inputs(crops, card))).numpy()
    frame = pd.DataFrame(prob, columns=PCOLS).assign(lesion=[c.lesion for c in crops])
    expected = frame.groupby("lesion").mean()
    np.testing.assert_array_equal(got.loc[expected.index, PCOLS].to_numpy(), expected.to_numpy())
    assert (got.loc[expected.index, "n_members"] == 1).all()
    assert (got.loc[expected.index, [f"{c}_sd" for c in PCOLS]] == 0).all(axis=None)


def _with_window(src: Path, dst: Path, width: float) -> None:
    shutil.copytree(src, dst)
    for ckpt in dst.glob("checkpoints/fold*/best.ckpt"):
        obj = torch.load(ckpt, weights_only=True)
        obj["hyper_parameters"]["meta"]["window"]["width"] = width
        torch.save(obj, ckpt)


def test_members_with_other_preprocessing_are_refused(trained, tmp_path) -> None:
    sweep = tmp_path / "mixed"
    shutil.copytree(trained["job"], sweep / "a")
    _with_window(trained["job"], sweep / "b", 350.0)
    pid = _test_patient(trained)
    with pytest.raises(CheckpointError, match="disagree on window") as err:
        _predict(trained, sweep, tmp_path / "out", pid)
    message = str(err.value)
    assert "\n" not in message and str(sweep) in message
    assert '"width": 350.0}' in message and " in b" in message and " in a" in message
    assert not (tmp_path / "out" / "predictions.csv").exists()
    load_ensemble(sweep / "b")  # each job alone is fine


def test_info_lists_the_members_and_the_shared_card(trained, tmp_path, capsys) -> None:
    cfg = compose_cfg(
        "predict", f"checkpoint={trained['sweep']}", f"paths.root_dir={trained['base']}",
        f"paths.output_dir={tmp_path / 'info'}", "device=cpu", "info=true",
    )  # fmt: skip
    result = predict(cfg)
    text = capsys.readouterr().out
    members = result["members"]
    assert [(m["job"], m["fold"], m["kind"]) for m in members] == [
        ("0", 0, "deep"), ("0", 1, "deep"), ("1", 0, "radiomics"), ("2", 0, "fusion"),
    ]  # fmt: skip
    n_train = [len(f["train"]) for f in trained["splits"]["folds"]]
    assert [m["n_train_patients"] for m in members] == [*n_train, *[len(trained["train"])] * 2]
    for needle in ["ensemble of 4 member(s) from 3 job(s)", "radiomics", "fusion",
                   f"{n_train[0]} patients", "32 × 32 px", "width 400 HU"]:  # fmt: skip
        assert needle in text, needle
    assert "best.ckpt" in text and not (tmp_path / "info" / "predictions.csv").exists()


def test_a_folder_without_finished_jobs_is_refused(trained, tmp_path) -> None:
    (tmp_path / "empty" / "j" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"unfinished: j\)"):
        load_ensemble(tmp_path / "empty")
