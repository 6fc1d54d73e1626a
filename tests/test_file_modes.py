"""Every file the pipeline writes gets the same ordinary permissions (0644 under umask 022): the
synthetic cohort, the crop store, a run's metrics/predictions/checkpoint, SimCLR weights, the
report with its figures, predict's tables and saliency PNGs, an exported model. (mkstemp's 0600
once made shared results folders unreadable to the other members of a lab.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd

from crc_lightning.apps.predict import predict
from crc_lightning.apps.pretrain import pretrain
from crc_lightning.apps.run import run
from crc_lightning.evaluation.report import report_from_jobs
from crc_lightning.models.checkpoint import export_model, load_model
from tests.helpers.stores import synthetic_store


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in root.rglob("*")
        if p.is_file() and ".hydra" not in p.parts
    }


def test_every_written_file_is_0644(tmp_path, app_config) -> None:
    old = os.umask(0o022)
    try:
        store = synthetic_store(tmp_path / "data" / "crops" / "syn", n_patients=12, seed=5)
        job = tmp_path / "job"
        run(app_config(
            "run", f"data.store={store}", f"paths.output_dir={job}", "res=32", "trainer=cpu",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "print_metrics=false",
            "model.backbone.weights=none", "split=holdout", "split.test_size=0.25",
            "split.val_size=0.2",
        ))  # fmt: skip
        pretrain(app_config(
            "pretrain", "ood=none", f"ood_stores=[{store}]", "res=32", "epochs=1",
            "batch_size=16", "logger=none", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path / 'pre'}",
        ))  # fmt: skip
        report_from_jobs([job], tmp_path / "report", permutations=10, store=store,
                         window=(400.0, 40.0))  # fmt: skip
        ckpt = job / "checkpoints" / "fold0" / "best.ckpt"
        export_model(load_model(ckpt)[0], tmp_path / "export" / "model.safetensors")
        raw = store.parent / "raw"  # where synthetic_store generates the cohort
        first = pd.read_csv(raw / "labels.csv", dtype={"patient_id": str}).iloc[0]
        predict(app_config(
            "predict", f"checkpoint={ckpt}", f"image={raw / first['image']}",
            f"mask={raw / first['mask']}", f"paths.output_dir={tmp_path / 'pred'}",
            "device=cpu", "print_table=false",
        ))  # fmt: skip
    finally:
        os.umask(old)
    modes = _modes(tmp_path)
    for must in ("job/metrics.json", "job/predictions.csv", "job/checkpoints/fold0/best.ckpt",
                 "job/val_predictions.csv", "job/splits.json",
                 "report/report.md", "report/fig2_sample_crops.png", "export/model.safetensors",
                 "pred/predictions.csv", "pred/predict.json", "data/crops/syn/index.parquet",
                 "data/crops/syn/store.json", "pre/pretrain.json"):  # fmt: skip
        assert must in modes, f"{must} was not written"
    assert any(k.startswith("pred/saliency/") and k.endswith(".png") for k in modes)
    assert any(k.startswith("weights/simclr_res32") for k in modes)
    assert any(k.startswith("data/crops/syn/cases/") for k in modes)
    wrong = {k: oct(v) for k, v in modes.items() if v != 0o644}
    assert not wrong, f"files not 0644: {wrong}"
    folders = {
        str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in tmp_path.rglob("*")
        if p.is_dir() and stat.S_IMODE(p.stat().st_mode) != 0o755
    }
    assert not folders, f"folders not 0755: {folders}"
