"""The crop store's radiomics feature table: same lesions as the crops, cached per case and
setting, resumable, parallel, checked against the store, written atomically."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crc_lightning.cropstore import features as feat_mod
from crc_lightning.cropstore.features import (
    FeatureError,
    build_feature_table,
    feature_columns,
    feature_table,
    lesion_table,
    read_feature_table,
    settings_key,
)
from crc_lightning.cropstore.format import (
    FEATURE_CASES_DIR,
    FEATURE_ID_COLUMNS,
    FEATURES_FILE,
    FEATURES_META_FILE,
    GENES,
    INDEX_FILE,
    features_dir,
)
from crc_lightning.cropstore.writer import build_crop_store
from crc_lightning.io import Volume, write_nifti
from crc_lightning.io.files import TMP_PREFIX
from crc_lightning.preprocessing.radiomics import RadiomicsParams, scan_features
from crc_lightning.sources.case import Case

SPACING = (2.0, 0.8, 0.8)
PARAMS = RadiomicsParams(feature_classes=("shape", "firstorder", "glcm"))
# per patient: lesion centres (z, y, x) and radii in mm; binary masks (components = lesions)
LESIONS = {
    "P1": [((6, 14, 14), 5.0)],
    "P2": [((4, 12, 30), 4.0), ((9, 30, 12), 6.0)],
    "P3": [((6, 24, 24), 7.0)],
}


def _write_case(root: Path, pid: str, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    shape = (14, 44, 44)
    hu = rng.normal(60, 20, shape)
    mask = np.zeros(shape, np.uint8)
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    for (cz, cy, cx), r in LESIONS[pid]:
        d2 = ((zz - cz) * SPACING[0]) ** 2 + ((yy - cy) * SPACING[1]) ** 2
        ball = d2 + ((xx - cx) * SPACING[2]) ** 2 <= r * r
        mask[ball] = 1
        hu[ball] = rng.normal(30 + 5 * r, 10, int(ball.sum()))
    img = write_nifti(Volume(np.rint(hu).astype(np.float32), SPACING), root / f"{pid}_ct.nii.gz")
    msk = write_nifti(Volume(mask, SPACING), root / f"{pid}_mask.nii.gz")
    genes = {"KRAS": seed % 2, "NRAS": 0, "BRAF": 0, "PIK3CA": 1 - seed % 2}
    return Case(pid, pid, img, (msk,), {None: genes}, source="cohort", lesion_rule="components")


@pytest.fixture
def store(tmp_path) -> tuple[Path, list[Case]]:
    raw = tmp_path / "raw"
    raw.mkdir()
    cases = [_write_case(raw, pid, i) for i, pid in enumerate(LESIONS)]
    out = tmp_path / "store"
    build_crop_store(cases, out, {}, progress=False)
    return out, cases


def _spy(monkeypatch) -> list[str]:
    """Count the scans whose features are computed (n_jobs=1: in this process)."""
    calls: list[str] = []
    real = feat_mod.scan_features

    def spy(*a, **k):
        calls.append("scan")
        return real(*a, **k)

    monkeypatch.setattr(feat_mod, "scan_features", spy)
    return calls


def test_table_has_one_row_per_lesion_with_the_crop_store_ids(store):
    out, cases = store
    summary = build_feature_table(cases, out, PARAMS, progress=False)
    table = read_feature_table(out, PARAMS)
    assert summary["lesions"] == len(table) == 4 and summary["computed"] == 3
    assert list(table.columns[: len(FEATURE_ID_COLUMNS)]) == list(FEATURE_ID_COLUMNS)
    index = pd.read_parquet(out / INDEX_FILE)
    assert sorted(table["lesion_uid"]) == sorted(index["lesion_uid"].unique())
    # oracle: the pure function on the same CT and mask, lesion by lesion
    for case in cases:
        image, mask = case.load()
        ref = scan_features(image.array, mask.array, image.spacing, PARAMS)
        rows = table[table.patient_id == case.patient_id].set_index("lesion")
        assert sorted(rows.index) == sorted(ref)
        for lesion, values in ref.items():
            for name, v in values.items():
                assert rows.loc[lesion, name] == pytest.approx(v, rel=1e-12), name
    # the biggest lesion of P2 (6 mm) is its second in raster order
    p2 = table[table.patient_id == "P2"].set_index("lesion")
    assert p2.loc[2, "shape_VoxelVolume"] > p2.loc[1, "shape_VoxelVolume"]
    folder = features_dir(out, settings_key(PARAMS, 26))
    meta = json.loads((folder / FEATURES_META_FILE).read_text())
    assert meta["params"] == PARAMS.to_dict() and set(meta["inputs"]) == {"P1", "P2", "P3"}
    assert meta["library"].startswith("pyradiomics")


def test_written_files_are_0644(store):
    out, cases = store
    old = os.umask(0o022)
    try:
        build_feature_table(cases, out, PARAMS, progress=False)
    finally:
        os.umask(old)
    files = [p for p in (out / "radiomics").rglob("*") if p.is_file()]
    assert len(files) >= 5  # 3 cases, table, metadata (+ the lock)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}


def test_reused_per_case_and_per_setting(store, monkeypatch):
    out, cases = store
    build_feature_table(cases, out, PARAMS, progress=False)
    first = read_feature_table(out, PARAMS)
    calls = _spy(monkeypatch)
    summary = build_feature_table(cases, out, PARAMS, progress=False)
    assert calls == [] and summary["reused"] == 3
    pd.testing.assert_frame_equal(read_feature_table(out, PARAMS), first)
    other = RadiomicsParams(bin_width=10.0, feature_classes=("firstorder",))
    build_feature_table(cases, out, other, progress=False)
    assert len(calls) == 3  # a new setting computes every case once …
    assert set(read_feature_table(out, other).columns) - set(FEATURE_ID_COLUMNS) == {
        c for c in read_feature_table(out, other).columns if c.startswith("firstorder_")
    } | {"n_voxels"}
    pd.testing.assert_frame_equal(read_feature_table(out, PARAMS), first)  # … the old one stays
    assert settings_key(PARAMS, 26) != settings_key(other, 26) != settings_key(other, 6)


def test_feature_table_builds_once_then_reads(store, monkeypatch):
    out, cases = store
    calls = _spy(monkeypatch)
    loads: list[int] = []

    def cases_fn():
        loads.append(1)
        return cases

    a = feature_table(out, PARAMS, cases_fn, progress=False)
    b = feature_table(out, PARAMS, cases_fn, progress=False)  # a second seed of the sweep
    assert len(calls) == 3 and loads == [1]
    pd.testing.assert_frame_equal(a, b)


def test_killed_run_resumes_from_finished_cases(store, monkeypatch):
    out, cases = store
    real = feat_mod.scan_features
    done: list[int] = []

    def dies_on_second(*a, **k):
        if len(done) == 1:
            raise KeyboardInterrupt
        done.append(1)
        return real(*a, **k)

    monkeypatch.setattr(feat_mod, "scan_features", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_feature_table(cases, out, PARAMS, progress=False)
    folder = features_dir(out, settings_key(PARAMS, 26))
    finished = list((folder / FEATURE_CASES_DIR).glob("*.parquet"))
    assert len(finished) == 1 and not (folder / FEATURES_FILE).exists()
    assert not [p for p in folder.rglob(f"{TMP_PREFIX}*")]
    with pytest.raises(FeatureError, match="no feature table"):
        read_feature_table(out, PARAMS)
    monkeypatch.setattr(feat_mod, "scan_features", real)
    calls = _spy(monkeypatch)
    summary = build_feature_table(cases, out, PARAMS, progress=False)
    assert len(calls) == 2 and summary["reused"] == 1 and summary["computed"] == 2


def test_parallel_equals_serial(store, tmp_path):
    out, cases = store
    build_feature_table(cases, out, PARAMS, n_jobs=1, progress=False)
    serial = read_feature_table(out, PARAMS)
    import shutil

    shutil.rmtree(out / "radiomics")
    build_feature_table(cases, out, PARAMS, n_jobs=2, progress=False)
    pd.testing.assert_frame_equal(read_feature_table(out, PARAMS), serial)


def test_stale_or_foreign_inputs_are_refused(store):
    out, cases = store
    build_feature_table(cases, out, PARAMS, progress=False)
    # the store is rebuilt without P3: the table no longer matches it
    build_crop_store(cases[:2], out, {}, progress=False)
    with pytest.raises(FeatureError, match="crop store changed"):
        read_feature_table(out, PARAMS)
    with pytest.raises(FeatureError, match=r"P3.*is not in the store"):
        build_feature_table(cases, out, PARAMS, progress=False)
    with pytest.raises(FeatureError, match="'P2' of the store is not among"):
        build_feature_table(cases[:1], out, PARAMS, progress=False)
    # an input changed after the store was built
    img = cases[0].image
    img.write_bytes(img.read_bytes() + b"\0")
    with pytest.raises(FeatureError, match="changed since the store was built"):
        build_feature_table(cases[:2], out, PARAMS, progress=False)
    with pytest.raises(Exception, match="not a crop store"):
        read_feature_table(out.parent / "nowhere", PARAMS)


def test_every_bad_case_is_reported_and_good_ones_are_kept(store, monkeypatch):
    out, cases = store
    from crc_lightning.io.errors import InputError

    real = Case.load

    def load(self):
        if self.case_id == "P2":
            return real(self)
        raise InputError(self.image, "unreadable NIfTI header")

    monkeypatch.setattr(Case, "load", load)
    with pytest.raises(FeatureError) as err:
        build_feature_table(cases, out, PARAMS, progress=False)
    assert len(err.value.problems) == 2
    assert all("unreadable NIfTI header" in p for p in err.value.problems)
    assert "P1_ct.nii.gz" in str(err.value) and "P3_ct.nii.gz" in str(err.value)
    folder = features_dir(out, settings_key(PARAMS, 26))
    assert len(list((folder / FEATURE_CASES_DIR).glob("*.parquet"))) == 1  # P2's, for the resume
    assert not (folder / FEATURES_FILE).exists()


def test_lesion_table_joins_labels_of_lesions_with_crops(store):
    out, cases = store
    build_feature_table(cases, out, PARAMS, progress=False)
    features = read_feature_table(out, PARAMS)
    index = pd.read_parquet(out / INDEX_FILE)
    table = lesion_table(features, index, GENES)
    assert len(table) == index["lesion_uid"].nunique() == 4
    assert table["lesion_uid"].tolist() == index["lesion_uid"].drop_duplicates().tolist()
    assert table.loc[table.patient_id == "P2", "KRAS"].tolist() == [1, 1]
    assert table.loc[table.patient_id == "P1", "PIK3CA"].tolist() == [1]
    assert list(table.columns) == [*FEATURE_ID_COLUMNS, *GENES, *feature_columns(features)]
    assert feature_columns(features)[0] == "n_voxels" and "glcm_Contrast" in feature_columns(table)
    with pytest.raises(FeatureError, match="no features row"):
        lesion_table(features[features.patient_id != "P1"], index, GENES)
