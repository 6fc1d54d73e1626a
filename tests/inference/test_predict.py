"""``python -m crc_lightning.predict``: same probabilities as the run's test output, safe loading,
refusals, ``--info``, streaming manifests, saliency maps against hand-computed oracles."""

from __future__ import annotations

import base64
import gc
import pickle
import re
import subprocess
import sys
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from crc_lightning.apps.predict import predict, rewrite_argv
from crc_lightning.apps.run import run
from crc_lightning.cropstore.writer import build_crop_store
from crc_lightning.inference.predictor import predict_case
from crc_lightning.inference.saliency import attention_map, gradcam_map, gradcam_target_layer
from crc_lightning.io import InputError, read_image, write_nifti
from crc_lightning.io.volume import Volume
from crc_lightning.models.checkpoint import (
    CheckpointError,
    check_expectations,
    export_model,
    load_model,
)
from crc_lightning.models.classifier import MutationClassifier
from crc_lightning.sources.manifest import read_manifest
from crc_lightning.sources.synthetic import ensure_synthetic_cohort
from tests.helpers.config import compose_app

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["KRAS", "NRAS", "BRAF", "PIK3CA", "OTHER"]
PCOLS = [f"p_{c}" for c in CLASSES]


def compose_cfg(name: str, *overrides: str):
    return compose_app(name, *overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny synthetic cohort → the real crop store → `run` (res 32, random init, 2 epochs)."""
    base = tmp_path_factory.mktemp("predict")
    csv = ensure_synthetic_cohort(base / "raw", 12, 7, 0.0, shape=(24, 96, 96))
    build_crop_store(read_manifest(csv, source="synthetic"), base / "crops", {}, progress=False)
    out = base / "job"
    cfg = compose_cfg(
        "run",
        f"data.store={base / 'crops'}", f"paths.root_dir={base}", f"paths.output_dir={out}",
        "res=32", "trainer=cpu", "trainer.enable_progress_bar=false", "print_metrics=false",
        "split=holdout", "split.test_size=0.25", "split.val_size=0.2",
        "model.backbone.weights=none",
        # batch 4 × 2 epochs at lr 0.05: enough updates that eval outputs depend on the input
        "trainer.max_epochs=2", "datamodule.batch_size=4", "+trainer.num_sanity_val_steps=0",
        "model.optimizer.lr=0.05",
        "seed=0",
    )  # fmt: skip
    run(cfg)
    manifest = pd.read_csv(csv, dtype={"patient_id": str})
    files = manifest.drop_duplicates("patient_id").set_index("patient_id")
    return {
        "base": base,
        "csv": csv,
        "ckpt": out / "checkpoints" / "fold0" / "best.ckpt",
        "run_preds": pd.read_csv(out / "predictions.csv", dtype={"patient_id": str}),
        "image": {p: csv.parent / r["image"] for p, r in files.iterrows()},
        "mask": {p: csv.parent / r["mask"] for p, r in files.iterrows()},
    }


def predict_cfg(trained: dict, out: Path, *overrides: str):
    return compose_cfg(
        "predict",
        f"checkpoint={trained['ckpt']}", f"paths.root_dir={trained['base']}",
        f"paths.output_dir={out}", "device=cpu", *overrides,
    )  # fmt: skip


# ----------------------------------------------------------------------------- equivalence
def test_predict_case_equals_the_run_test_predictions(trained) -> None:
    """Same checkpoint, same patient files: predict's slice and lesion probabilities equal the
    run's test-set rows (CONTRACTS.md predictions.csv) averaged per lesion."""
    model, card = load_model(trained["ckpt"])
    run_preds = trained["run_preds"]
    assert run_preds["patient_id"].nunique() >= 2
    # the comparison at 1e-5 means something only if outputs vary with the input
    assert run_preds[PCOLS].std().min() > 1e-3
    for pid, expected in run_preds.groupby("patient_id"):
        lesions, slices = predict_case(
            model, card, trained["image"][pid], trained["mask"][pid], pid, lesion_rule="instance"
        )
        assert list(lesions.columns) == ["patient_id", "lesion", "n_slices", *PCOLS]
        assert list(slices.columns) == ["patient_id", "lesion", "slice", "area_mm2", *PCOLS]
        exp = expected.sort_values(["lesion", "slice"]).reset_index(drop=True)
        got = slices.sort_values(["lesion", "slice"]).reset_index(drop=True)
        assert (
            got[["lesion", "slice"]].to_numpy().tolist()
            == exp[["lesion", "slice"]].to_numpy().tolist()
        )
        np.testing.assert_allclose(got[PCOLS].to_numpy(), exp[PCOLS].to_numpy(), atol=1e-5)
        per_lesion = exp.groupby("lesion").agg(
            n=("slice", "size"), **{c: (c, "mean") for c in PCOLS}
        )
        kept = lesions[lesions["n_slices"] > 0].set_index("lesion")
        assert kept.index.tolist() == per_lesion.index.tolist()
        assert kept["n_slices"].tolist() == per_lesion["n"].tolist()
        np.testing.assert_allclose(kept[PCOLS].to_numpy(), per_lesion[PCOLS].to_numpy(), atol=1e-5)
        # every lesion of the mask gets a row (oracle: the mask's own values)
        mask = np.asarray(nib.load(trained["mask"][pid]).dataobj)
        assert lesions["lesion"].tolist() == sorted(int(v) for v in np.unique(mask) if v)
    # and it discriminates: another CT window (350 instead of 400 HU) moves the probabilities
    other = {**card, "window": {"width": 350.0, "level": 40.0}}
    _, moved = predict_case(
        model, other, trained["image"][pid], trained["mask"][pid], pid, lesion_rule="instance"
    )
    moved = moved.sort_values(["lesion", "slice"]).reset_index(drop=True)
    assert np.abs(moved[PCOLS].to_numpy() - exp[PCOLS].to_numpy()).max() > 1e-3


def test_app_single_patient_writes_the_contract_files(trained, tmp_path, capsys) -> None:
    pid = trained["run_preds"]["patient_id"].iloc[0]
    out = tmp_path / "pred"
    cfg = predict_cfg(
        trained, out, f"image={trained['image'][pid]}", f"mask={trained['mask'][pid]}",
        f"patient_id={pid}", "lesion_rule=instance",  # the synthetic masks' values are the ids
    )  # fmt: skip
    summary = predict(cfg)
    lesions = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    slices = pd.read_csv(out / "predictions_slices.csv", dtype={"patient_id": str})
    spread = [f"{c}_{s}" for c in PCOLS for s in ("sd", "min", "max")]
    assert list(lesions.columns) == ["patient_id", "lesion", "n_slices", *PCOLS, *spread,
                                     "n_members"]  # fmt: skip
    # one checkpoint = an ensemble of one: no spread, its probabilities are the range
    scored = lesions.query("n_slices > 0")
    assert (scored["n_members"] == 1).all() and (scored[[f"{c}_sd" for c in PCOLS]] == 0).all(None)
    for c in PCOLS:
        assert (scored[f"{c}_min"] == scored[c]).all() and (scored[f"{c}_max"] == scored[c]).all()
    assert list(slices.columns) == ["patient_id", "lesion", "slice", "area_mm2", *PCOLS]
    assert set(lesions["patient_id"]) == {pid} == set(slices["patient_id"])
    exp = trained["run_preds"].query("patient_id == @pid").groupby("lesion")[PCOLS].mean()
    got = lesions.set_index("lesion").loc[exp.index, PCOLS]
    np.testing.assert_allclose(got.to_numpy(), exp.to_numpy(), atol=1e-5)
    assert summary["n_lesions"] == len(lesions) and summary["n_slices"] == len(slices)
    assert summary["n_spacing_outside_training"] == 0
    for lesion in lesions.query("n_slices > 0")["lesion"]:
        png = out / "saliency" / f"{pid}_{lesion}.png"
        assert png.is_file() and png.stat().st_size > 5000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"patient {pid}" in printed and "p(KRAS)" in printed
    assert not list(out.glob(".tmp-*"))
    # the patient's page: the lesion table and every saliency overlay, embedded
    page = (out / "patients" / f"{pid}.html").read_text()
    images = dict(re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="Lesion (\d+):', page))
    shown = {int(les): base64.b64decode(data) for data, les in images.items()}
    want = {int(les): (out / "saliency" / f"{pid}_{les}.png").read_bytes()
            for les in lesions.query("n_slices > 0")["lesion"]}  # fmt: skip
    assert shown == want and shown
    rows = [re.findall(r">([^<]*)</td>", r) for r in page.split("<tr>")[2:]]
    assert [r[:2] for r in rows] == [
        [str(a), str(b)] for a, b in lesions[["lesion", "n_slices"]].values
    ]
    for r, (_, row) in zip(rows, lesions.iterrows()):
        assert r[2 : 2 + len(PCOLS)] == [
            f"{row[c]:.3f}" if np.isfinite(row[c]) else "–" for c in PCOLS
        ]
    assert summary["files"]["patients"] == "patients/"


def test_card_carries_training_spacing_and_predict_warns_outside_it(trained, caplog) -> None:
    import logging

    from crc_lightning.cropstore.format import read_meta
    from crc_lightning.inference.predictor import predict_volumes, spacing_warning
    from crc_lightning.io import read_mask

    model, card = load_model(trained["ckpt"])
    store = read_meta(trained["base"] / "crops")["spacing"]
    assert card["spacing"] == {"min": store["min"], "max": store["max"]}
    pid = trained["run_preds"]["patient_id"].iloc[0]
    image = read_image(trained["image"][pid])
    mask = read_mask(trained["mask"][pid], reference=image)
    assert spacing_warning(card, image.spacing) is None
    thick = Volume(image.array, (3 * store["max"][0], *image.spacing[1:]), image.origin)
    with caplog.at_level(logging.WARNING, logger="crc_lightning.inference.predictor"):
        lesions, _ = predict_volumes(model, card, thick, mask, pid, lesion_rule="instance")
    assert "outside the training range" in caplog.text and pid not in caplog.text
    assert "outside the training range" in lesions.attrs["spacing_warning"]
    assert spacing_warning({**card, "spacing": None}, thick.spacing) is None  # old checkpoints


# ----------------------------------------------------------------------------- safety
class _Payload:
    """Unpickling this creates ``marker`` (stands in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch_save", "plain_pickle"])
def test_a_malicious_pickle_is_refused_without_running(tmp_path, how) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {}, "hyper_parameters": _Payload(marker)}
    if how == "torch_save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(CheckpointError, match="refused") as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    with open(path, "rb") as f:
        torch.load(f, weights_only=False) if how == "torch_save" else pickle.load(f)
    assert marker.exists()


def test_missing_metadata_is_refused(trained, tmp_path) -> None:
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    del ckpt["hyper_parameters"]["meta"]["window"]
    bad = tmp_path / "nowindow.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"lacks required metadata \['meta.window'\]"):
        load_model(bad)
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"fc.weight": torch.zeros(5, 1280)}, str(bare))
    with pytest.raises(CheckpointError, match="without crc_lightning metadata"):
        load_model(bare)


def test_export_is_pickle_free_and_equivalent(trained, tmp_path) -> None:
    model, card = load_model(trained["ckpt"])
    path = export_model(model, tmp_path / "model.safetensors")
    assert path.read_bytes()[:2] != b"PK"  # not a torch zip/pickle archive
    model2, card2 = load_model(path)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model2(x), model(x), rtol=0, atol=0)
    keys = ("class_names", "res", "window", "normalize", "preprocess", "data", "weights", "spacing")
    for key in keys:
        assert card2[key] == card[key]
    assert card2["source"]["sha256"] != card["source"]["sha256"]


# ----------------------------------------------------------------------------- refusals
def test_preprocessing_mismatch_is_refused(trained, tmp_path) -> None:
    pid = trained["run_preds"]["patient_id"].iloc[0]
    inputs = [f"image={trained['image'][pid]}", f"mask={trained['mask'][pid]}"]
    for override, text in [
        ("res=64", "res: checkpoint 32, given 64"),
        ("window.width=350", "window.width: checkpoint 400.0, given 350"),
        ("preprocess.epsilon=0.3", "preprocess.epsilon: checkpoint 0.4, given 0.3"),
    ]:
        out = tmp_path / override.split("=")[0]
        with pytest.raises(CheckpointError, match="preprocessing differs") as err:
            predict(predict_cfg(trained, out, *inputs, override))
        assert text in str(err.value)
        assert not (out / "predictions.csv").exists()
    _, card = load_model(trained["ckpt"])
    check_expectations(card, {"res": 32, "window": {"width": 400, "level": None}})  # agrees


def test_mask_on_another_grid_is_refused(trained, tmp_path) -> None:
    pid = trained["run_preds"]["patient_id"].iloc[0]
    image = read_image(trained["image"][pid])
    cut = Volume(np.zeros(image.shape, np.int32)[:-2], image.spacing, image.origin, image.direction)
    bad_mask = write_nifti(cut, tmp_path / "mask.nii.gz")
    model, card = load_model(trained["ckpt"])
    with pytest.raises(InputError, match=r"mask\.nii\.gz"):
        predict_case(model, card, trained["image"][pid], bad_mask, pid)


# ----------------------------------------------------------------------------- --info
def test_info_prints_the_model_card(trained, tmp_path, capsys) -> None:
    out = tmp_path / "info"
    result = predict(predict_cfg(trained, out, "info=true"))
    text = capsys.readouterr().out
    card = result["info"]
    for needle in [
        "KRAS, NRAS, BRAF, PIK3CA, OTHER", "32 × 32 px", "width 400 HU, level 40 HU",
        "mean 0.449, std 0.226", '"epsilon": 0.4', card["data"]["store_hash"], "baseline",
        "init none", "this crc-lightning", "five",
    ]:  # fmt: skip
        assert needle in text, needle
    assert not (out / "predictions.csv").exists()
    assert rewrite_argv(["--info", "checkpoint=x"]) == ["info=true", "checkpoint=x"]


@pytest.mark.slow
def test_info_flag_on_the_command_line(trained, tmp_path) -> None:
    cmd = [sys.executable, "-m", "crc_lightning.predict", "--info", f"checkpoint={trained['ckpt']}",
           f"paths.root_dir={tmp_path}"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "32 × 32 px" in res.stdout and "KRAS, NRAS, BRAF, PIK3CA, OTHER" in res.stdout


# ----------------------------------------------------------------------------- manifest
def test_manifest_streams_every_patient(trained, tmp_path, monkeypatch) -> None:
    """Rows for every patient; a patient's volumes are freed before the next one is read."""
    from crc_lightning.sources import case as cases

    pids = sorted(trained["image"])[:4]
    manifest = tmp_path / "new.csv"
    lines = ["patient_id,image,mask,lesion"]  # no gene columns: new patients are unlabelled
    lines += [f"{p},{trained['image'][p]},{trained['mask'][p]},*" for p in pids]
    manifest.write_text("\n".join(lines) + "\n")

    alive: list[weakref.ref] = []
    original = cases.Case.load

    def load(self, options=None):
        gc.collect()
        assert all(r() is None for r in alive), "an earlier patient's volume is still alive"
        image, mask = original(self, options)
        alive.extend([weakref.ref(image), weakref.ref(mask)])
        return image, mask

    monkeypatch.setattr(cases.Case, "load", load)
    out = tmp_path / "pred"
    summary = predict(predict_cfg(trained, out, f"manifest={manifest}", "saliency=false"))
    lesions = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert sorted(lesions["patient_id"].unique()) == pids
    for p in pids:
        mask = np.asarray(nib.load(trained["mask"][p]).dataobj)
        n = len([v for v in np.unique(mask) if v])
        assert len(lesions.query("patient_id == @p")) == n
    assert summary["n_patients"] == 4 and len(alive) == 8
    assert not (out / "saliency").exists()


def test_a_bad_patient_leaves_nothing_half_written(trained, tmp_path) -> None:
    pids = sorted(trained["image"])[:2]
    image = read_image(trained["image"][pids[1]])
    cut = Volume(
        np.zeros(image.shape, np.int32)[:, :-3], image.spacing, image.origin, image.direction
    )
    bad = write_nifti(cut, tmp_path / "bad_mask.nii.gz")
    manifest = tmp_path / "new.csv"
    manifest.write_text(
        "patient_id,image,mask,lesion\n"
        f"{pids[0]},{trained['image'][pids[0]]},{trained['mask'][pids[0]]},*\n"
        f"{pids[1]},{trained['image'][pids[1]]},{bad},*\n"
    )
    out = tmp_path / "pred"
    with pytest.raises(InputError, match=r"bad_mask\.nii\.gz"):
        predict(predict_cfg(trained, out, f"manifest={manifest}"))
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == []


# ----------------------------------------------------------------------------- saliency
def _random_model(attention: bool, res: int) -> MutationClassifier:
    torch.manual_seed(0)
    model = MutationClassifier(CLASSES, backbone={"weights": "none"}, attention=attention, res=res)
    return model.eval()


def test_gradcam_matches_a_hand_computed_gradcam() -> None:
    """Grad-CAM = ReLU(Σ_k mean(∂y_c/∂A_k) · A_k) on the last block, upsampled; compared at the
    token grid with autograd hooks (independent of pytorch-grad-cam)."""
    model = _random_model(False, 128)
    x = torch.randn(1, 1, 128, 128)
    layer = gradcam_target_layer(model)
    acts = {}
    handle = layer.register_forward_hook(lambda m, i, o: acts.update(a=o))
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits[0, 2], acts["a"])
    a = acts["a"][0].detach()
    cam = torch.relu((grad[0].mean(dim=(1, 2))[:, None, None] * a).sum(0))
    got = gradcam_map(model, x, 2)
    assert got.shape == (128, 128) and got.min() == 0.0 and got.max() == pytest.approx(1.0)
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(got)[None, None], 32)[0, 0]
    corr = np.corrcoef(pooled.flatten().numpy(), cam.flatten().numpy())[0, 1]
    assert corr > 0.9, corr


def test_attention_map_is_the_mean_attention_received_per_token() -> None:
    """Oracle: softmax(QKᵀ/√d) per head from the block's own projection weights, by hand."""
    model = _random_model(True, 96)
    with torch.no_grad():  # sharpen the random block's attention so it has a spatial pattern
        model.pool.attn.in_proj_weight.mul_(30.0)
    x = torch.randn(1, 1, 96, 96)
    got = attention_map(model, x)
    with torch.no_grad():
        fmap = model.backbone.forward_features(x)
        tokens = model.pool.norm(fmap.flatten(2).transpose(1, 2))[0]  # [hw, C]
        attn = model.pool.attn
        q, k, _ = (tokens @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
        heads, d = attn.num_heads, q.shape[-1] // attn.num_heads
        q, k = (t.reshape(-1, heads, d).transpose(0, 1) for t in (q, k))
        w = torch.softmax(q @ k.transpose(1, 2) / d**0.5, dim=-1).mean(0)  # [hw, hw]
        received = w.mean(0).reshape(fmap.shape[-2:])
    assert tuple(fmap.shape[-2:]) == (3, 3)
    up = torch.nn.functional.interpolate(
        received[None, None], size=(96, 96), mode="bilinear", align_corners=False
    )[0, 0]
    expected = (up - up.min()) / (up.max() - up.min())
    assert float(received.max() - received.min()) > 1e-4  # a real spatial pattern, not constant
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
