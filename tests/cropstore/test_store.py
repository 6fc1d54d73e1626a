"""Crop store writer + reader: layout, HU round-trip, atomicity, resumability, parallelism, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crc_lightning.cropstore import writer as store_mod
from crc_lightning.cropstore.reader import CropStore
from crc_lightning.cropstore.writer import GENES, PreprocessError, build_crop_store
from crc_lightning.io import InputError, Volume, read_image, read_mask, write_nifti
from crc_lightning.preprocessing.algorithm import PreprocessParams

SPACING = (2.0, 0.8, 0.8)  # (sz, sy, sx) mm → border 10 mm = 13 px
PARAMS = {"epsilon": 0.4, "border_mm": 10.0, "opening_radius_px": 1}


@dataclass
class _Case:
    """The ``crc_lightning.io.cases.Case`` interface, kept local so this file tests the store only."""

    case_id: str
    patient_id: str
    image: Path
    masks: tuple[Path, ...]
    lesions: dict | None
    source: str = "cohort"
    mask_rule: str = "single"
    lesion_rule: str = "instance"
    loads: list = field(default_factory=list)

    def load(self, options=None) -> tuple[Volume, Volume]:
        image = read_image(self.image, options)
        return image, read_mask(self.masks[0], reference=image, options=options)

    def input_files(self) -> list[Path]:
        return [self.image, *self.masks]


# lesion boxes per case: (value, z0, z1, y0, y1, x0, x1); binary masks when every value is 1
BOXES = {
    "p1": [(1, 2, 7, 10, 22, 12, 20)],
    "p2": [(3, 1, 5, 5, 15, 30, 44), (5, 6, 10, 30, 40, 6, 14)],  # instance values 3, 5
    "p3": [(1, 0, 4, 0, 9, 40, 48)],  # at the volume corner: padding with air
}


def _write_case(root: Path, pid: str, seed: int) -> _Case:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-300, 400, size=(10, 48, 48)).astype(np.float32)
    mask = np.zeros(hu.shape, np.uint8)
    for v, z0, z1, y0, y1, x0, x1 in BOXES[pid]:
        mask[z0:z1, y0:y1, x0:x1] = v
    img = write_nifti(Volume(hu, SPACING), root / f"{pid}_ct.nii.gz")
    msk = write_nifti(Volume(mask, SPACING), root / f"{pid}_mask.nii.gz")
    values = sorted({b[0] for b in BOXES[pid]})
    lesions = {
        None if values == [1] else v: {"KRAS": seed % 2, "NRAS": 0, "BRAF": 1, "PIK3CA": 0}
        for v in values
    }
    rule = "components" if values == [1] else "instance"
    return _Case(pid, pid, img, (msk,), lesions, lesion_rule=rule)


@pytest.fixture
def cases(tmp_path) -> list[_Case]:
    raw = tmp_path / "raw"
    raw.mkdir()
    return [_write_case(raw, pid, i) for i, pid in enumerate(BOXES)]


def _files(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _count_process_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = store_mod.process_case

    def spy(case, *a, **k):
        calls.append(case.case_id)
        return real(case, *a, **k)

    monkeypatch.setattr(store_mod, "process_case", spy)
    return calls


def test_index_layout_types_and_hu_round_trip(cases, tmp_path):
    out = tmp_path / "store"
    summary = build_crop_store(cases, out, PARAMS, progress=False)
    assert {p.name for p in out.iterdir()} == {"cases", "index.parquet", "store.json"}
    st = CropStore(out)
    df = st.index
    assert list(df.columns) == [*store_mod.INDEX_COLUMNS, *GENES]
    for col in ("crop_id", "patient_id", "lesion_uid", "source", "case_file", "key"):
        assert pd.api.types.is_string_dtype(df[col]), col
    for col in ("lesion", "slice", "size_px"):
        assert pd.api.types.is_integer_dtype(df[col]), col
    for col in ("area_mm2", "spacing_y", "spacing_x"):
        assert pd.api.types.is_float_dtype(df[col]), col
    assert all(str(df[g].dtype) == "Int8" for g in GENES)
    assert st.params == PreprocessParams.from_config(PARAMS).to_dict()
    assert set(st.meta["inputs"]) == {"p1", "p2", "p3"}
    # every box slice survives (all areas equal): 5 + 4 + 4 + 4 crops
    assert summary["crops"] == len(df) == 17 and summary["lesions"] == 4
    assert summary["patients"] == 3 and summary["dropped_slices"] == 0
    assert set(df.loc[df.patient_id == "p2", "lesion"]) == {3, 5}
    assert (
        df.crop_id == df.patient_id + "/" + df.lesion.astype(str) + "/" + df.slice.astype(str)
    ).all()

    for case in cases:
        hu = read_image(case.image).array
        for v, z0, z1, y0, y1, x0, x1 in BOXES[case.patient_id]:
            rows = df[(df.patient_id == case.patient_id) & (df.lesion == v)]
            assert rows.slice.tolist() == list(range(z0, z1))
            # hand-computed window: box + 13 px border, squared on the longer side, centred
            h, w = y1 - y0 + 26, x1 - x0 + 26
            n = max(h, w)
            wy0, wx0 = y0 - 13 - (n - h) // 2, x0 - 13 - (n - w) // 2
            padded = np.full((10, 48 + 2 * n, 48 + 2 * n), -1024, np.float32)
            padded[:, n : n + 48, n : n + 48] = hu
            for _, r in rows.iterrows():
                crop = st.load(r.crop_id)
                assert crop.dtype == np.int16 and crop.shape == (n, n) == (r.size_px, r.size_px)
                want = padded[r.slice, n + wy0 : n + wy0 + n, n + wx0 : n + wx0 + n]
                np.testing.assert_array_equal(crop, want.astype(np.int16))
                # rectangle opened with a cross loses its 4 corners
                assert r.area_mm2 == pytest.approx(((y1 - y0) * (x1 - x0) - 4) * 0.64)
    corner = df[df.patient_id == "p3"].crop_id.iloc[0]
    assert (st.load(corner)[:5] == -1024).all()
    assert [a.shape for a in st.load_many(df.crop_id[:3].tolist())] == [(38, 38)] * 3


def test_labels_na_for_ood_and_unlabelled_lesions_skipped(cases, tmp_path):
    cases[0].lesions = None  # OOD: no labels
    cases[1].lesions = {3: {"KRAS": 1, "NRAS": 0, "BRAF": 0, "PIK3CA": 1}}  # lesion 5 unlabelled
    summary = build_crop_store(cases, tmp_path / "s", PARAMS, progress=False)
    df = CropStore(tmp_path / "s").index
    p1 = df[df.patient_id == "p1"]
    assert len(p1) == 5 and all(p1[g].isna().all() for g in GENES)
    p2 = df[df.patient_id == "p2"]
    assert set(p2.lesion) == {3} and (p2.KRAS == 1).all() and (p2.NRAS == 0).all()
    assert summary["lesions_unlabelled"] == 1 and summary["lesions_found"] == 4


def test_resumable_and_parameter_change_recomputes(cases, tmp_path, monkeypatch):
    out = tmp_path / "store"
    build_crop_store(cases, out, PARAMS, progress=False)
    before = _files(out / "cases")
    index_before = pd.read_parquet(out / "index.parquet")
    calls = _count_process_calls(monkeypatch)
    summary = build_crop_store(cases, out, PARAMS, progress=False)
    assert calls == [] and summary["computed"] == 0 and summary["reused"] == 3
    assert _files(out / "cases") == before
    pd.testing.assert_frame_equal(pd.read_parquet(out / "index.parquet"), index_before)

    # one changed input → only that case
    hu = read_image(cases[1].image)
    hu.array[0, 0, 0] += 1
    write_nifti(hu, cases[1].image)
    summary = build_crop_store(cases, out, PARAMS, progress=False)
    assert calls == ["p2"] and summary["computed"] == 1 and summary["removed_files"] == 1

    # a parameter change → everything, and the old case files are collected
    calls.clear()
    summary = build_crop_store(cases, out, {**PARAMS, "border_mm": 5.0}, progress=False)
    assert calls == ["p1", "p2", "p3"] and summary["removed_files"] == 3
    assert len(list((out / "cases").glob("*.npz"))) == 3
    assert CropStore(out).params["border_mm"] == 5.0


def test_crash_mid_run_leaves_previous_store_intact(cases, tmp_path, monkeypatch):
    out = tmp_path / "store"
    build_crop_store(cases, out, PARAMS, progress=False)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    real = store_mod._write_case_npz
    n = {"calls": 0}

    def crash_on_second(path, arrays, meta):
        n["calls"] += 1
        if n["calls"] == 2:  # half-write a temporary, then die like a full disk would
            (path.parent / f"{store_mod.TMP_PREFIX}junk.npz").write_bytes(b"half")
            raise RuntimeError("simulated crash")
        return real(path, arrays, meta)

    monkeypatch.setattr(store_mod, "_write_case_npz", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_crop_store(cases, out, {**PARAMS, "epsilon": 0.5}, progress=False)
    assert not [p for p in out.rglob(f"{store_mod.TMP_PREFIX}*")]
    for path, data in snapshot.items():
        assert path.read_bytes() == data, path
    st = CropStore(out)
    assert len(st.load_many(st.index.crop_id.tolist())) == 17 and st.params["epsilon"] == 0.4

    # crash while the index itself is written → old index and store.json untouched
    monkeypatch.setattr(store_mod, "_write_case_npz", real)

    def bad_parquet(self, f, **kw):
        f.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", bad_parquet)
    with pytest.raises(OSError, match="disk full"):
        build_crop_store(cases, out, {**PARAMS, "epsilon": 0.5}, progress=False)
    assert (out / "index.parquet").read_bytes() == snapshot[out / "index.parquet"]
    assert (out / "store.json").read_bytes() == snapshot[out / "store.json"]
    assert not [p for p in out.rglob(f"{store_mod.TMP_PREFIX}*")]
    # ... and the interrupted run resumes: its finished case files are reused
    monkeypatch.undo()
    calls = _count_process_calls(monkeypatch)
    summary = build_crop_store(cases, out, {**PARAMS, "epsilon": 0.5}, progress=False)
    assert calls == [] and summary["reused"] == 3


def test_parallel_gives_identical_store(cases, tmp_path):
    build_crop_store(cases, tmp_path / "a", PARAMS, n_jobs=1, progress=False)
    build_crop_store(cases, tmp_path / "b", PARAMS, n_jobs=2, progress=False)
    a, b = CropStore(tmp_path / "a"), CropStore(tmp_path / "b")
    pd.testing.assert_frame_equal(a.index, b.index)
    assert sorted(p.name for p in (tmp_path / "a/cases").iterdir()) == sorted(
        p.name for p in (tmp_path / "b/cases").iterdir()
    )
    for cid in a.index.crop_id:
        np.testing.assert_array_equal(a.load(cid), b.load(cid))


def test_bad_cases_reported_together_and_nothing_written(cases, tmp_path):
    out = tmp_path / "store"
    build_crop_store(cases[:1], out, PARAMS, progress=False)
    snapshot = _files(out)
    cases[1].image = tmp_path / "raw" / "missing_ct.nii.gz"
    wrong = write_nifti(
        Volume(np.zeros((3, 4, 5), np.uint8), SPACING), tmp_path / "raw/small.nii.gz"
    )
    cases[2].masks = (wrong,)
    with pytest.raises(PreprocessError) as err:
        build_crop_store(cases, out, PARAMS, progress=False)
    msg = str(err.value)
    assert (
        "missing_ct.nii.gz" in msg
        and "small.nii.gz" in msg
        and "3×4×5 voxels" in msg
        and "differs" in msg
    )
    assert len(err.value.problems) == 2
    assert _files(out) == snapshot  # p1 was reused; nothing new, nothing removed

    fresh = tmp_path / "fresh"
    with pytest.raises(PreprocessError):
        build_crop_store(cases, fresh, PARAMS, progress=False)
    assert not list(fresh.rglob("*.npz")) and not (fresh / "index.parquet").exists()


def test_same_patient_twice_is_a_clear_error(cases, tmp_path):
    cases[1].patient_id = "p1"
    cases[1].lesions = {None: {"KRAS": 1}}
    cases[1].masks = cases[0].masks
    cases[1].image = cases[0].image
    with pytest.raises(PreprocessError, match="more than one case"):
        build_crop_store(cases[:2], tmp_path / "s", PARAMS, progress=False)
    assert not list((tmp_path / "s").rglob("*.npz"))


def test_missing_store_names_the_command(tmp_path):
    with pytest.raises(InputError, match=r"python -m crc_lightning\.preprocess"):
        CropStore(tmp_path / "nowhere")
    # the store's identity of a missing store: the same one line, not a FileNotFoundError
    from crc_lightning.cropstore.format import store_facts

    with pytest.raises(InputError, match=r"nowhere: no crop store here; build it with"):
        store_facts(tmp_path / "nowhere")


def test_store_records_orientation_spacing_and_what_was_resampled(cases, tmp_path):
    """store.json: the canonical orientation, the CTs' spacing distribution (what a checkpoint
    carries as its training range), the reading options, and how many masks were resampled."""
    from crc_lightning.cropstore.format import store_facts

    raw = tmp_path / "raw"
    hu = np.random.default_rng(9).integers(-300, 400, size=(6, 40, 40)).astype(np.float32)
    img = write_nifti(Volume(hu, (3.0, 0.6, 0.6)), raw / "p4_ct.nii.gz")
    mask = np.zeros((6, 20, 20), np.uint8)
    mask[1:5, 4:12, 5:13] = 1  # drawn on a 2× coarser in-plane grid
    msk = write_nifti(Volume(mask, (3.0, 1.2, 1.2), (0.0, 0.3, 0.3)), raw / "p4_mask.nii.gz")
    lesions = {None: {"KRAS": 0, "NRAS": 0, "BRAF": 0, "PIK3CA": 1}}
    cases.append(_Case("p4", "p4", img, (msk,), lesions, lesion_rule="components"))
    with pytest.raises(store_mod.PreprocessError, match=r"p4_mask\.nii\.gz.*resample_mask=true"):
        build_crop_store(cases, tmp_path / "refused", PARAMS, progress=False)
    out = tmp_path / "store"
    summary = build_crop_store(cases, out, {**PARAMS, "resample_mask": True}, progress=False)
    meta = CropStore(out).meta
    assert meta["orientation"]["code"] == "LPS" and "radiological" in meta["orientation"]["meaning"]
    assert meta["params"]["resample_mask"] is True and meta["params"]["gantry_tilt"] == "refuse"
    spacing = meta["spacing"]
    assert spacing["cases"] == 4 and spacing["axes"] == ["z", "y", "x"]
    assert spacing["min"] == [2.0, 0.6, 0.6] and spacing["max"] == [3.0, 0.8, 0.8]
    assert spacing["median"] == [2.0, 0.8, 0.8]
    assert summary["masks_resampled"] == 1 and summary["images_resampled_for_tilt"] == 0
    assert summary["source_orientations"] == {"LPS": 4}
    assert summary["lesions"] == 5  # the resampled mask still has its lesion
    assert store_facts(out)["spacing"] == {"min": [2.0, 0.6, 0.6], "max": [3.0, 0.8, 0.8]}


# ----------------------------------------------------------------------------- shards
def assert_same_store(a: Path, b: Path) -> None:
    """Two stores are the same: index bytes (the store hash), index rows, every crop array,
    the input hashes and the summary counts."""
    from crc_lightning.cropstore.format import store_hash

    assert store_hash(a) == store_hash(b)
    sa, sb = CropStore(a), CropStore(b)
    pd.testing.assert_frame_equal(sa.index, sb.index)
    assert sorted(p.name for p in (a / "cases").iterdir()) == sorted(
        p.name for p in (b / "cases").iterdir()
    )
    for cid in sa.index.crop_id:
        np.testing.assert_array_equal(sa.load(cid), sb.load(cid))
    assert sa.meta["inputs"] == sb.meta["inputs"] and sa.meta["params"] == sb.meta["params"]
    drop = ("seconds", "computed", "reused", "removed_files", "shards")
    assert {k: v for k, v in sa.summary.items() if k not in drop} == {
        k: v for k, v in sb.summary.items() if k not in drop
    }


def _shard_cases(cases: list[_Case]) -> list[_Case]:
    """The three cases plus a second scan of p2 (another case of the same patient)."""
    extra = _Case("p2_followup", "p2x", cases[0].image, cases[0].masks, {None: {"KRAS": 1}})
    return [*cases, extra]


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_shards_merged_equal_the_single_process_store(cases, tmp_path, shards):
    cases = _shard_cases(cases)
    single = tmp_path / "single"
    build_crop_store(cases, single, PARAMS, progress=False)
    sharded = tmp_path / "sharded"
    done = []
    for i in reversed(range(shards)):  # any order: the merge restores the cohort's
        s = store_mod.build_shard(cases, sharded, PARAMS, i, shards, progress=False)
        done.append(s["cases"])
        assert not (sharded / "index.parquet").exists()  # nothing is a store before the merge
    assert sum(done) == len(cases) and max(done) - min(done) <= 1  # balanced by patient
    assert len(store_mod.shard_parts(sharded)) == shards
    summary = store_mod.merge_shards(sharded)
    assert summary["shards"] == shards and summary["crops"] == CropStore(single).summary["crops"]
    assert_same_store(single, sharded)
    assert not (sharded / "shards").exists()  # parts removed once merged


def test_shards_are_deterministic_and_by_patient():
    ids = [f"P{i:03d}" for i in range(10)]
    owner = store_mod.shard_of_patients(ids[::-1] + ids[:3], 3)  # order and repeats: no matter
    assert owner == store_mod.shard_of_patients(ids, 3)
    assert [owner[p] for p in ids] == [i % 3 for i in range(10)]  # sorted ids, dealt round-robin


def test_merge_refuses_an_incomplete_or_mixed_set_of_parts(cases, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(InputError, match="no shard parts to merge"):
        store_mod.merge_shards(out)
    store_mod.build_shard(cases, out, PARAMS, 0, 2, progress=False)
    with pytest.raises(InputError, match=r"1 of 2 shard\(s\) not done \(shard=1/2\)"):
        store_mod.merge_shards(out)
    store_mod.build_shard(cases, out, PARAMS, 2, 3, progress=False)
    with pytest.raises(InputError, match=r"different shard counts \[2, 3\]"):
        store_mod.merge_shards(out)
    for part in store_mod.shard_parts(out):
        part.unlink()
    # the cohort changed between shards: a part of another case list
    store_mod.build_shard(cases, out, PARAMS, 0, 2, progress=False)
    store_mod.build_shard(cases[:2], out, PARAMS, 1, 2, progress=False)
    with pytest.raises(InputError, match="another cohort"):
        store_mod.merge_shards(out)
    assert not (out / "index.parquet").exists()


def test_failed_shard_writes_no_part_and_removes_its_case_files(cases, tmp_path):
    out = tmp_path / "s"
    owner = store_mod.shard_of_patients([c.patient_id for c in cases], 2)
    assert owner == {"p1": 0, "p2": 1, "p3": 0}
    store_mod.build_shard(cases, out, PARAMS, 0, 2, progress=False)
    before = _files(out)
    good = cases[1].image
    cases[1].image = tmp_path / "raw" / "missing_ct.nii.gz"  # p2: shard 1
    with pytest.raises(PreprocessError, match="missing_ct"):
        store_mod.build_shard(cases, out, PARAMS, 1, 2, progress=False)
    assert _files(out) == before  # shard 0's files untouched, nothing of shard 1 left
    # a shard that once succeeded and then fails leaves no stale part for a merge to pick up
    cases[1].image = good
    store_mod.build_shard(cases, out, PARAMS, 1, 2, progress=False)
    cases[1].image = tmp_path / "raw" / "missing_ct.nii.gz"
    with pytest.raises(PreprocessError):
        store_mod.build_shard(cases, out, PARAMS, 1, 2, progress=False)
    assert [p.name for p in store_mod.shard_parts(out)] == ["part-0000-of-0002.json"]
    with pytest.raises(InputError, match=r"shard=1/2"):
        store_mod.merge_shards(out)
