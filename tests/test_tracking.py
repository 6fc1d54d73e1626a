"""W&B privacy: hyper-parameters are sanitised and media is refused unless asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from crc_lightning.tracking import PrivateWandbLogger, finish_wandb, sanitize


def test_sanitize_drops_paths_and_patient_keys_keeps_numbers():
    params = {
        "lr": 1e-3,
        "variant": "oodp_sa",
        "data": {"manifest": "/cohort/labels.csv", "name": "cohort", "store": "data/crops/x"},
        "paths": {"data_dir": "/data"},
        "exclude_patients": ["P001", "P002"],
        "weights_file": "w.ckpt",
        "tags": ["run", "/abs/path"],
        "classes": ["RAS", "OTHER"],
    }
    out = sanitize(params)
    assert out == {
        "lr": 1e-3,
        "variant": "oodp_sa",
        "data/name": "cohort",
        "tags": ["run"],
        "classes": ["RAS", "OTHER"],
    }


def test_offline_run_files_hold_no_path_or_private_value(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    secret_path = "/very/secret/cohort/labels.csv"
    lg = PrivateWandbLogger(
        project="crc",
        group="sweep-x",
        name="baseline/res32/seed0",
        job_type="run",
        save_dir=str(tmp_path),
    )
    lg.log_hyperparams({"data": {"manifest": secret_path}, "lr": 0.1, "patient_id": "PAT-SECRET-1"})
    lg.log_metrics({"test/auc": 0.7})
    with pytest.raises(PermissionError, match="log_media"):
        lg.log_image("crops", images=[])
    finish_wandb(lg)
    files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    blob = b"".join(p.read_bytes() for p in files)
    assert b"very/secret" not in blob and b"PAT-SECRET-1" not in blob
    assert b"test/auc" in blob  # the numbers did get recorded
