"""`python -m crc_lightning.preprocess`: composed config → crop store + printed summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from crc_lightning.apps.preprocess import preprocess
from crc_lightning.cropstore.reader import CropStore
from crc_lightning.io import InputError, Volume, write_nifti
from tests.apps.conftest import SHARD_COHORT
from tests.helpers.config import CONF_DIR

REPO = Path(__file__).resolve().parents[2]
CONF = Path(CONF_DIR)
SPACING = (2.0, 0.8, 0.8)


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("preprocess", overrides=overrides)


@pytest.fixture
def manifest(tmp_path) -> Path:
    """Two patients: A with a binary mask (2 components, '*' row, KRAS), B with an instance mask
    (lesion 3 BRAF, lesion 5 wild type = OTHER)."""
    raw = tmp_path / "cohort"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for pid, boxes in {
        "A": [(1, 1, 5, 5, 15, 5, 15), (1, 6, 9, 25, 35, 25, 35)],
        "B": [(3, 0, 3, 8, 18, 8, 20), (5, 4, 10, 20, 30, 20, 30)],
    }.items():
        hu = rng.integers(-100, 200, size=(10, 40, 40)).astype(np.float32)
        mask = np.zeros(hu.shape, np.uint8)
        for v, z0, z1, y0, y1, x0, x1 in boxes:
            mask[z0:z1, y0:y1, x0:x1] = v
        write_nifti(Volume(hu, SPACING), raw / f"{pid}_ct.nii.gz")
        write_nifti(Volume(mask, SPACING), raw / f"{pid}_mask.nii.gz")
    csv = raw / "labels.csv"
    csv.write_text(
        "patient_id,image,mask,lesion,KRAS,NRAS,BRAF,PIK3CA\n"
        "A,A_ct.nii.gz,A_mask.nii.gz,*,1,0,0,0\n"
        "B,B_ct.nii.gz,B_mask.nii.gz,3,0,0,1,0\n"
        "B,B_ct.nii.gz,B_mask.nii.gz,5,0,0,0,0\n"
    )
    return csv


def test_manifest_app_writes_store_and_prints_summary(manifest, tmp_path, capsys):
    cfg = _cfg(
        [
            "data=manifest",
            f"data.manifest={manifest}",
            f"paths.root_dir={tmp_path}",
            "progress=false",
        ]
    )
    summary = preprocess(cfg)
    store = tmp_path / "data" / "crops" / "cohort"
    st = CropStore(store)
    # every slice of each box has the same area → all kept: A 4 + 3, B 3 + 6 slices
    assert summary["crops"] == len(st.index) == 16
    assert summary["patients"] == 2 and summary["lesions"] == 4 and summary["dropped_slices"] == 0
    assert summary["per_class"]["lesions"] == {
        "KRAS": 2,
        "NRAS": 0,
        "BRAF": 1,
        "PIK3CA": 0,
        "OTHER": 1,
    }
    assert summary["per_class"]["crops"] == {
        "KRAS": 7,
        "NRAS": 0,
        "BRAF": 3,
        "PIK3CA": 0,
        "OTHER": 6,
    }
    assert set(st.index.source) == {"cohort"}
    assert st.params["epsilon"] == cfg.preprocess.epsilon == 0.4
    out = capsys.readouterr().out
    assert "crops 16" in out and "KRAS" in out and "OTHER" in out
    assert "A_ct" not in out  # counts only, no file names / ids beyond the store path

    # the three-class label set only changes the printed counts; nothing is recomputed
    cfg3 = _cfg(
        [
            "data=manifest",
            f"data.manifest={manifest}",
            f"paths.root_dir={tmp_path}",
            "progress=false",
            "labels=three",
            "preprocess.epsilon=0.4",
        ]
    )
    summary3 = preprocess(cfg3)
    assert summary3["computed"] == 0 and summary3["reused"] == 2
    assert summary3["per_class"]["lesions"] == {"RAS": 2, "PIK3CA_BRAF": 1, "OTHER": 1}


def test_missing_manifest_is_a_clear_error(tmp_path):
    cfg = _cfg(["data=manifest", f"paths.root_dir={tmp_path}"])
    with pytest.raises(InputError, match=r"data\.manifest=/path/labels\.csv"):
        preprocess(cfg)


def test_unknown_parameter_is_refused(manifest, tmp_path):
    cfg = _cfg(
        [
            "data=manifest",
            f"data.manifest={manifest}",
            f"paths.root_dir={tmp_path}",
            "+preprocess.eps=1",
        ]
    )
    with pytest.raises(ValueError, match="unknown preprocess parameter"):
        preprocess(cfg)


def test_command_line_entry_point(manifest, tmp_path):
    env = {**os.environ, "CRC_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "crc_lightning.preprocess",
            "data=manifest",
            f"data.manifest={manifest}",
            "progress=false",
            "preprocess.border_mm=5",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "crops 16" in proc.stdout
    index = pd.read_parquet(tmp_path / "data/crops/cohort/index.parquet")
    # border 5 mm at 0.8 mm → 7 px each side: A's first lesion is 10×10 → 24 px
    assert index.loc[index.lesion_uid == "A/1", "size_px"].eq(24).all()
    assert (tmp_path / "outputs" / "preprocess" / "runs").is_dir()  # Hydra's run dir


def test_synthetic_cohort(tmp_path, capsys):
    synthetic = pytest.importorskip("crc_lightning.sources.synthetic")
    assert hasattr(synthetic, "ensure_synthetic_cohort")
    cfg = _cfg(
        [
            "data=synthetic",
            f"paths.root_dir={tmp_path}",
            "data.synthetic.n_patients=3",
            "data.synthetic.dicom_fraction=0.34",
            "progress=false",
        ]
    )
    summary = preprocess(cfg)
    st = CropStore(cfg.data.store)
    assert summary["patients"] == 3 == st.index.patient_id.nunique()
    assert summary["crops"] == len(st.index) > 0
    assert set(st.index.source) == {"synthetic"}
    assert sum(summary["per_class"]["lesions"].values()) >= summary["lesions"]
    crop = st.load(st.index.crop_id.iloc[0])
    assert crop.dtype == np.int16 and crop.shape[0] == crop.shape[1]
    assert "crops" in capsys.readouterr().out


# ----------------------------------------------------------------------------- shards
def sharded_preprocess(root: Path, store: Path, *launcher: str, env=None, timeout: int = 600):
    """``preprocess -m shard=0/2,1/2 …`` as typed: two shard jobs, merged at the sweep's end."""
    cmd = [sys.executable, "-m", "crc_lightning.preprocess", "-m", "shard=0/2,1/2", *SHARD_COHORT,
           f"paths.root_dir={root}", f"data.store={store}", *launcher]  # fmt: skip
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1"}
    cwd = store.parent / f"cwd_{store.name}"
    cwd.mkdir(parents=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert not list(cwd.iterdir()), "the sweep wrote into its working directory"
    return proc


def shard_jobs(root: Path) -> list[dict]:
    """What each shard job of the (one) preprocess sweep under ``root`` says it did."""
    import json

    (sweep,) = (root / "outputs" / "preprocess" / "multiruns").iterdir()
    return [json.loads(p.read_text()) for p in sorted(sweep.rglob("shard.json"))]


def test_shards_through_joblib_merge_into_the_single_process_store(single_store, tmp_path):
    from tests.cropstore.test_store import assert_same_store

    root, single = single_store
    sharded = tmp_path / "sharded"
    proc = sharded_preprocess(root, sharded, "hydra/launcher=joblib")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [(j["shard"], j["shards"]) for j in shard_jobs(root)] == [(0, 2), (1, 2)]
    assert f"crop store 'synthetic': {sharded}" in proc.stdout  # the merge, in the sweep process
    assert_same_store(single, sharded)
    assert CropStore(sharded).summary["shards"] == 2


def test_shard_and_merge_arguments(tmp_path):
    from crc_lightning.apps._hydra import UsageError
    from crc_lightning.apps.preprocess import parse_shard

    assert parse_shard("0/4") == (0, 4) and parse_shard(" 3/4 ") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(UsageError, match="shard="):
            parse_shard(bad)
    cfg = _cfg(["data=manifest", f"paths.root_dir={tmp_path}", "merge=true"])
    with pytest.raises(InputError, match=r"no shard parts to merge; run `python -m crc_lightning"):
        preprocess(cfg)
    cfg = _cfg(["data=manifest", f"paths.root_dir={tmp_path}", "merge=true", "shard=0/2"])
    with pytest.raises(UsageError, match="two steps"):
        preprocess(cfg)
