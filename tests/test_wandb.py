"""``logger=wandb`` in a sweep: one offline W&B run per job, all in the sweep's group, nothing private.

The offline ``.wandb`` files are read back with an independent reader of their documented on-disk
format (LevelDB log records of W&B protobuf ``Record`` messages), not through project code.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from wandb.proto import wandb_internal_pb2 as pb

from crc_lightning.tracking import PrivateWandbLogger, finish_wandb
from tests.helpers.stores import write_fake_store

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32768  # LevelDB log block size used by W&B's transaction log
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[pb.Record]:
    """Every record of an offline ``run-*.wandb`` file (7-byte file header, then LevelDB blocks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (FULL, FIRST) else buf + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def run_facts(path: Path) -> dict:
    facts: dict = {"summary": set(), "config": set()}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            facts.update(
                id=r.run.run_id, group=r.run.run_group, name=r.run.display_name,
                job_type=r.run.job_type, tags=list(r.run.tags),
            )  # fmt: skip
        elif kind == "summary":
            facts["summary"] |= {u.key or "/".join(u.nested_key) for u in r.summary.update}
        elif kind == "config":
            facts["config"] |= {u.key for u in r.config.update}
        elif kind == "exit":
            facts["exit_code"] = r.exit.exit_code
    return facts


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_fake_store(tmp_path_factory.mktemp("cohort") / "crops" / "fake", n_patients=16)


@pytest.fixture(scope="module")
def sweep(store, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wb")
    sweep_dir = tmp / "grid-lr"
    cmd = [
        sys.executable, "-m", "crc_lightning.run", "-m", "seed=0,1", "logger=wandb", "trainer=cpu",
        f"data.store={store}", f"paths.root_dir={tmp}", f"hydra.sweep.dir={sweep_dir}", "res=32",
        "model.backbone.weights=none", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "datamodule.batch_size=4", "split.n_splits=2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sweep_dir


def test_two_jobs_give_two_runs_in_the_sweeps_group(sweep) -> None:
    jobs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(jobs) == 2
    facts = []
    for seed, job in enumerate(jobs):
        files = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, f"{job.name}: expected one W&B run, got {files}"
        f = run_facts(files[0])
        assert f["group"] == "grid-lr"  # the sweep folder's name
        assert f["name"] == f"baseline/res32/seed{seed}" and f["job_type"] == "run"
        assert "run" in f["tags"] and f["exit_code"] == 0
        # one W&B run per job although the job trains 2 folds: epoch metrics prefixed per fold
        assert {"final/test/image/auc", "final/test/lesion/auc"} <= f["summary"]
        assert {"fold0-val/auc", "fold1-val/auc", "fold1-train/loss"} <= f["summary"]
        assert {"variant", "seed", "optimizer/lr"} <= f["config"]
        facts.append(f)
    assert facts[0]["id"] != facts[1]["id"]


def test_offline_files_hold_no_patient_id_or_cohort_path(sweep, store) -> None:
    index = pd.read_parquet(store / "index.parquet")
    secrets = {*index["patient_id"].astype(str), *index["crop_id"].astype(str)}
    secrets |= {str(store), str(store.parent.parent)}  # the cohort's folders
    secrets |= {str((store / f).resolve()) for f in index["case_file"].unique()}
    files = [p for p in sweep.rglob("*") if p.is_file() and "wandb" in p.relative_to(sweep).parts]
    assert len([p for p in files if p.suffix == ".wandb"]) >= 2
    for path in files:
        blob = path.read_bytes()
        found = [s for s in secrets if s.encode() in blob]
        assert not found, f"{path.relative_to(sweep)} holds {found[:5]}"


def test_a_failed_job_finishes_its_run_with_exit_code_1(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    lg = PrivateWandbLogger(project="crc", name="x/res32/seed0", job_type="run",
                            save_dir=str(tmp_path))  # fmt: skip
    lg.log_metrics({"val/auc": 0.5})
    finish_wandb(lg, failed=True)
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    facts = run_facts(path)
    assert facts["exit_code"] == 1 and facts["group"] == ""  # single run: no sweep group
