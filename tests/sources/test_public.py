"""OOD adapters (LiTS, 3D-IRCADb, TCIA-CRLM) on tiny fake trees in each exact layout, and
content de-duplication of the LiTS copies of IRCADb patients."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crc_lightning.io import InputError, Volume, read_image, write_dicom_seg, write_dicom_series
from crc_lightning.io.lesions import lesion_labels
from crc_lightning.sources.case import Case
from crc_lightning.sources.crlm import iter_crlm
from crc_lightning.sources.dedupe import content_fingerprint, dedupe_by_content
from crc_lightning.sources.ircadb import iter_ircadb
from crc_lightning.sources.lits import iter_lits

SHAPE = (8, 16, 16)  # z, y, x
SPACING = (2.0, 0.8, 0.8)
AFFINE = np.diag([-0.8, -0.8, 2.0, 1.0])  # NIfTI RAS affine of an LPS-identity grid
STRUCT26 = np.ones((3, 3, 3), bool)


def _hu(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 300, size=SHAPE).astype(np.float32)


def _vol(array: np.ndarray) -> Volume:
    return Volume(np.asarray(array), SPACING)


def _write_nib(array_zyx: np.ndarray, path, dtype) -> None:
    """A NIfTI written with nibabel directly ([z,y,x] → nibabel's [i,j,k] = [x,y,z])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array_zyx).transpose(2, 1, 0).astype(dtype), AFFINE), path)


def _lits_seg() -> np.ndarray:
    """Liver (1) containing two separate tumours (2)."""
    seg = np.zeros(SHAPE, np.uint8)
    seg[1:7, 2:14, 2:14] = 1
    seg[2:4, 3:6, 3:6] = 2
    seg[5, 9:12, 9:12] = 2
    return seg


# ------------------------------------------------------------------------------------------ LiTS
@pytest.fixture
def lits_root(tmp_path):
    root = tmp_path / "lits"
    _write_nib(_hu(0), root / "Training Batch 1" / "volume-0.nii", np.int16)
    _write_nib(_lits_seg(), root / "Training Batch 1" / "segmentation-0.nii", np.uint8)
    _write_nib(_hu(10), root / "Training Batch 2" / "volume-10.nii.gz", np.int16)
    _write_nib(_lits_seg(), root / "Training Batch 2" / "segmentation-10.nii.gz", np.uint8)
    _write_nib(_hu(2), root / "Training Batch 1" / "volume-2.nii", np.int16)
    _write_nib(_hu(99), root / "Test" / "volume-99.nii.gz", np.int16)  # no segmentation
    return root


def test_lits_finds_pairs_in_batches_and_skips_unsegmented(lits_root, caplog):
    with caplog.at_level(logging.WARNING, logger="crc_lightning.sources.lits"):
        cases = iter_lits(lits_root)
    assert [c.case_id for c in cases] == ["lits-0", "lits-10"]  # numeric order; 2 and 99 skipped
    assert all(c.lesions is None and c.source == "lits" for c in cases)
    assert all(c.mask_rule == "lits_tumour" for c in cases)
    assert cases[1].image == lits_root / "Training Batch 2" / "volume-10.nii.gz"
    assert cases[1].masks == (lits_root / "Training Batch 2" / "segmentation-10.nii.gz",)
    assert "2 volume(s) without segmentation" in caplog.text
    assert "volume-99" not in caplog.text  # no file names / ids at WARNING


def test_lits_load_keeps_tumour_label_only(lits_root):
    image, mask = iter_lits(lits_root)[0].load()
    np.testing.assert_array_equal(image.array, _hu(0))
    expected = (_lits_seg() == 2).astype(np.int32)
    assert mask.array.dtype == np.int32
    np.testing.assert_array_equal(mask.array, expected)  # the liver (label 1) is gone
    n_scipy = ndimage.label(expected, STRUCT26)[1]
    assert iter_lits(lits_root)[0].lesion_rule == "components"
    assert int(lesion_labels(mask.array, "components").max()) == n_scipy == 2


def test_lits_input_files(lits_root):
    case = iter_lits(lits_root)[0]
    assert case.input_files() == [case.image, case.masks[0]]


def test_lits_wrong_layout_names_root(tmp_path):
    root = tmp_path / "not_lits"
    _write_nib(_hu(0), root / "ct.nii.gz", np.int16)
    with pytest.raises(InputError, match="volume-N") as err:
        iter_lits(root)
    assert err.value.path == root
    with pytest.raises(InputError, match="not a folder"):
        iter_lits(tmp_path / "missing")


def test_lits_only_unsegmented_is_an_error(tmp_path):
    root = tmp_path / "lits_test"
    _write_nib(_hu(0), root / "volume-3.nii", np.int16)
    with pytest.raises(InputError, match="segmentation"):
        iter_lits(root)


# ---------------------------------------------------------------------------------------- IRCADb
def _ircadb_masks() -> dict[str, np.ndarray]:
    """0/255 masks as IRCADb ships them: two tumour folders, a cyst, the liver."""
    t1 = np.zeros(SHAPE, np.float32)
    t1[1:3, 2:5, 2:5] = 255
    t2 = np.zeros(SHAPE, np.float32)
    t2[5:7, 10:13, 10:13] = 255
    kyst = np.zeros(SHAPE, np.float32)
    kyst[4, 2:4, 12:14] = 255
    liver = np.zeros(SHAPE, np.float32)
    liver[:, 1:15, 1:15] = 255
    return {"livertumor01": t1, "LiverTumor02": t2, "liverkyst": kyst, "liver": liver}


def _write_ircadb_patient(root, n: int, hu: np.ndarray, masks: dict[str, np.ndarray]) -> None:
    folder = root / f"3Dircadb1.{n}"
    write_dicom_series(_vol(hu), folder / "PATIENT_DICOM", f"ircadb{n}", series_uid=f"1.2.3.{n}")
    for k, (name, mask) in enumerate(masks.items()):
        write_dicom_series(
            _vol(mask),
            folder / "MASKS_DICOM" / name,
            f"ircadb{n}",
            series_uid=f"1.2.3.{n}.{k + 1}",
            rescale=(1.0, 0.0),
        )


@pytest.fixture
def ircadb_root(tmp_path):
    root = tmp_path / "3Dircadb1"
    _write_ircadb_patient(root, 1, _hu(1), _ircadb_masks())
    _write_ircadb_patient(root, 2, _hu(2), {"liver": _ircadb_masks()["liver"]})  # no tumour
    (root / "README.txt").write_text("not a patient")
    return root


def test_ircadb_tumour_folders_only(ircadb_root, caplog):
    with caplog.at_level(logging.WARNING, logger="crc_lightning.sources.ircadb"):
        cases = iter_ircadb(ircadb_root)
    assert [c.case_id for c in cases] == ["ircadb-1"]
    assert "1 patient(s) without a tumour mask folder" in caplog.text
    case = cases[0]
    assert case.source == "ircadb" and case.lesions is None
    assert (case.mask_rule, case.lesion_rule) == ("union", "components")
    assert [m.name for m in case.masks] == ["livertumor01", "LiverTumor02"]  # cyst, liver excluded
    image, mask = case.load()
    np.testing.assert_array_equal(image.array, _hu(1))
    m = _ircadb_masks()
    expected = ((m["livertumor01"] > 0) | (m["LiverTumor02"] > 0)).astype(np.int32)
    np.testing.assert_array_equal(mask.array, expected)
    n = ndimage.label(expected, STRUCT26)[1]
    assert int(lesion_labels(mask.array, "components").max()) == n == 2


def test_ircadb_input_files_are_all_series_files_sorted(ircadb_root):
    case = iter_ircadb(ircadb_root)[0]
    files = case.input_files()
    expected = sorted((case.image).iterdir())
    for folder in case.masks:
        expected += sorted(folder.iterdir())
    assert files == expected
    assert len(files) == 3 * SHAPE[0]


def test_ircadb_zipped_only_asks_to_unzip(tmp_path):
    root = tmp_path / "ircadb_zips"
    (root / "3Dircadb1.4").mkdir(parents=True)
    (root / "3Dircadb1.4" / "PATIENT_DICOM.zip").write_bytes(b"PK\x03\x04")
    (root / "3Dircadb1.4" / "MASKS_DICOM.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(InputError, match=r"(?i)unzip") as err:
        iter_ircadb(root)
    assert err.value.path == root
    assert "3Dircadb1.4" in str(err.value)


def test_ircadb_wrong_layout_names_root(lits_root):
    with pytest.raises(InputError, match=r"3Dircadb1\.N") as err:
        iter_ircadb(lits_root)
    assert err.value.path == lits_root


# ------------------------------------------------------------------------------------------ CRLM
def _write_overlapping_seg(ct_folder, path, masks: list[np.ndarray], labels: list[str]) -> None:
    """A SEG with overlapping segments (Liver contains the tumours), as TCIA-CRLM ships them."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from crc_lightning.io.dicom import series_grid

    sources, _ = series_grid(ct_folder)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, label in enumerate(labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.stack(masks, axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    path.parent.mkdir(parents=True)
    seg.save_as(path)


def _crlm_masks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    liver = np.zeros(SHAPE, np.uint8)
    liver[1:7, 1:15, 1:15] = 1
    t1 = np.zeros(SHAPE, np.uint8)
    t1[2:4, 3:6, 3:6] = 1
    t2 = np.zeros(SHAPE, np.uint8)
    t2[5, 9:12, 9:12] = 1
    return liver, t1, t2


@pytest.fixture
def crlm_root(tmp_path):
    root = tmp_path / "Colorectal-Liver-Metastases"
    liver, t1, t2 = _crlm_masks()
    # patient 1001: the annotated CT, a decoy CT series in the same study, an overlapping SEG
    study = root / "CRLM-CT-1001" / "11-13-1992-NA-ABDOMEN"
    write_dicom_series(_vol(_hu(3)), study / "2.000000-PORTAL", "CRLM-CT-1001", "1.2.9.1")
    write_dicom_series(_vol(_hu(4)), study / "3.000000-ARTERIAL", "CRLM-CT-1001", "1.2.9.2")
    _write_overlapping_seg(
        study / "2.000000-PORTAL",
        study / "100.000000-Segmentation" / "1-1.dcm",
        [liver, t1, liver, t2],
        ["Liver", "Tumor_1", "Liver_Remnant", "Tumor_2"],
    )
    # patient 1002: SEG written by crc_lightning's writer (no overlap)
    study2 = root / "CRLM-CT-1002" / "01-01-1990-NA-CT"
    write_dicom_series(_vol(_hu(5)), study2 / "4.000000-CT", "CRLM-CT-1002", "1.2.9.3")
    write_dicom_seg(
        _vol(t2 + 2 * t1),
        study2 / "4.000000-CT",
        study2 / "200.000000-Segmentation" / "1-1.dcm",
        ["Hepatic", "tumour A"],
    )
    # patient 1003: SEG without tumour segment → skipped
    study3 = root / "CRLM-CT-1003" / "01-01-1991-NA-CT"
    write_dicom_series(_vol(_hu(6)), study3 / "5.000000-CT", "CRLM-CT-1003", "1.2.9.4")
    write_dicom_seg(_vol(liver), study3 / "5.000000-CT", study3 / "300-Seg" / "1-1.dcm", ["Portal"])
    return root


def test_crlm_pairs_seg_with_its_ct(crlm_root, caplog):
    with caplog.at_level(logging.WARNING, logger="crc_lightning.sources.crlm"):
        cases = iter_crlm(crlm_root)
    assert [c.case_id for c in cases] == ["crlm-1001", "crlm-1002"]
    assert [c.patient_id for c in cases] == ["CRLM-CT-1001", "CRLM-CT-1002"]
    assert "1 SEG file(s) without tumour segment" in caplog.text
    c1 = cases[0]
    assert c1.image.name == "2.000000-PORTAL"  # by ReferencedSeriesSequence, not the decoy
    assert c1.masks[0].name == "1-1.dcm" and c1.mask_rule == "single"
    assert (c1.lesion_rule, c1.segments) == ("instance", "tumou?r")
    assert c1.source == "crlm" and c1.lesions is None


def test_crlm_load_keeps_tumour_segments_only(crlm_root):
    _, t1, t2 = _crlm_masks()
    c1, c2 = iter_crlm(crlm_root)
    image, mask = c1.load()
    np.testing.assert_array_equal(image.array, _hu(3))
    # Liver / Liver_Remnant (which overlap the tumours) dropped; values = segment numbers:
    # Tumor_1 is segment 2, Tumor_2 segment 4
    np.testing.assert_array_equal(mask.array, 2 * t1 + 4 * t2)
    _, mask2 = c2.load()
    np.testing.assert_array_equal(mask2.array, 2 * t1)  # "Hepatic" (1) excluded; "tumour A" is 2


def test_crlm_all_segments_overlap_is_refused_naming_them(crlm_root):
    """Reading every segment of the overlapping SEG: one voxel would be two lesions."""
    c1 = iter_crlm(crlm_root)[0]
    c1.segments = None
    with pytest.raises(InputError, match=r"1-1\.dcm: segments \d \('.*'\) and \d .* overlap"):
        c1.load()
    c1.segments = (2, 4)  # by number: Tumor_1, Tumor_2
    _, t1, t2 = _crlm_masks()
    np.testing.assert_array_equal(c1.load()[1].array, 2 * t1 + 4 * t2)


def test_crlm_wrong_layout_names_root(lits_root):
    with pytest.raises(InputError, match="CRLM-CT-XXXX") as err:
        iter_crlm(lits_root)
    assert err.value.path == lits_root


# ----------------------------------------------------------------------------------------- dedupe
def test_fingerprint_is_permutation_invariant_and_content_sensitive():
    a = _hu(7)
    fp = content_fingerprint(a)
    assert content_fingerprint(a[:, ::-1, :]) == fp
    assert content_fingerprint(a.transpose(2, 1, 0)) == fp
    assert content_fingerprint(a + 0.2) == fp  # same int16-rounded HU
    b = a.copy()
    b[0, 0, 0] += 1
    assert content_fingerprint(b) != fp
    assert content_fingerprint(a[:-1]) != fp


def test_dedupe_drops_lits_copy_of_ircadb_patient(ircadb_root, tmp_path, caplog, monkeypatch):
    lits = tmp_path / "lits"
    _write_nib(_hu(1)[:, ::-1, :], lits / "volume-28.nii.gz", np.int16)  # IRCADb 1, flipped y
    _write_nib(_lits_seg(), lits / "segmentation-28.nii.gz", np.uint8)
    _write_nib(_hu(30), lits / "volume-30.nii.gz", np.int16)
    _write_nib(_lits_seg(), lits / "segmentation-30.nii.gz", np.uint8)
    ircadb = iter_ircadb(ircadb_root)
    lits_cases = iter_lits(lits)
    # the copy really is the same scan in another format and orientation
    assert (
        read_image(lits_cases[0].image).array.tolist() != read_image(ircadb[0].image).array.tolist()
    )

    import crc_lightning.sources.dedupe as dedupe_mod

    calls: list[str] = []
    real = dedupe_mod.read_image
    monkeypatch.setattr(
        dedupe_mod, "read_image", lambda p, o=None: calls.append(str(p)) or real(p, o)
    )
    with caplog.at_level(logging.INFO, logger="crc_lightning.sources.dedupe"):
        kept, n = dedupe_by_content([*ircadb, *lits_cases, ircadb[0]])
    assert n == 2  # lits-28 and the repeated ircadb-1
    assert [c.case_id for c in kept] == ["ircadb-1", "lits-30"]
    assert len(calls) == 3  # one read per distinct image
    assert "dropped 2 of 4" in caplog.text
    assert "lits-28" not in caplog.text and "ircadb-1" not in caplog.text

    kept, n = dedupe_by_content([*lits_cases, *ircadb])  # first occurrence wins
    assert n == 1 and [c.case_id for c in kept] == ["lits-28", "lits-30"]


def test_case_rejects_bad_rule(tmp_path):
    with pytest.raises(ValueError, match="mask_rule"):
        Case("a", "a", tmp_path, (tmp_path,), None, "x", mask_rule="nope")
    with pytest.raises(ValueError, match="lesion rule"):
        Case("a", "a", tmp_path, (tmp_path,), None, "x", lesion_rule="binary")
    with pytest.raises(ValueError, match="exactly one mask"):
        Case("a", "a", tmp_path, (tmp_path, tmp_path), None, "x", mask_rule="lits_tumour")
