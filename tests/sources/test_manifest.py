"""Cohort manifest: a good CSV gives the expected Cases; a bad one gives ONE error listing all
problems with their line numbers; lesion ids are checked against the masks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import crc_lightning.io as cio
import crc_lightning.sources.manifest as manifest_mod
from crc_lightning.io import InputError, ManifestError, Volume, write_nifti
from crc_lightning.sources.case import Case
from crc_lightning.sources.manifest import read_manifest

SHAPE = (8, 16, 16)
HEADER = "patient_id,image,mask,lesion,KRAS,NRAS,BRAF,PIK3CA"


def _instance_mask(values=(1, 2)) -> np.ndarray:
    m = np.zeros(SHAPE, np.int16)
    for k, v in enumerate(values):
        m[1 + 3 * k : 3 + 3 * k, 2:6, 2 + 5 * k : 6 + 5 * k] = v
    return m


def _binary_mask() -> np.ndarray:
    """Two 26-separate components (oracle: scipy.ndimage.label)."""
    m = np.zeros(SHAPE, np.uint8)
    m[1:3, 2:5, 2:5] = 1
    m[5:7, 10:13, 10:13] = 1
    assert ndimage.label(m, np.ones((3, 3, 3)))[1] == 2
    return m


@pytest.fixture
def cohort(tmp_path) -> Path:
    """images/ and masks/ next to where the CSV goes; p1 instance {1,2}, p2 binary (2 comps)."""
    root = tmp_path / "cohort"
    rng = np.random.default_rng(0)
    for name in ("p1", "p1b", "p2", "p3"):
        hu = rng.integers(-100, 200, SHAPE).astype(np.float32)
        write_nifti(Volume(hu, (2.0, 0.8, 0.8)), root / "images" / f"{name}.nii.gz")
    write_nifti(Volume(_instance_mask((1, 2)), (2.0, 0.8, 0.8)), root / "masks" / "p1.nii.gz")
    write_nifti(Volume(_instance_mask((3,)), (2.0, 0.8, 0.8)), root / "masks" / "p1b.nii.gz")
    # written with nibabel directly: an independent writer
    nib.save(
        nib.Nifti1Image(_binary_mask().transpose(2, 1, 0), np.diag([-0.8, -0.8, 2.0, 1.0])),
        root / "masks" / "p2.nii.gz",
    )
    write_nifti(Volume(_binary_mask(), (2.0, 0.8, 0.8)), root / "masks" / "p3.nii.gz")
    return root


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_good_manifest(cohort, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths must resolve against the CSV's folder, not cwd
    abs_p3 = cohort / "images" / "p3.nii.gz"
    csv = _write(
        cohort / "manifest.csv",
        [
            HEADER,
            "P1,images/p1.nii.gz,masks/p1.nii.gz,1,1,0,0,0",
            "P1,images/p1.nii.gz,masks/p1.nii.gz,2,0,0,1,0",
            "",
            "P2,images/p2.nii.gz,masks/p2.nii.gz,*,0,0,0,1",
            f"P3,{abs_p3},masks/p3.nii.gz,,0,0,0,0",
            "P1, images/p1b.nii.gz ,masks/p1b.nii.gz,3,0,1,0,0",  # second scan of P1
        ],
    )
    cases = read_manifest(csv)
    c = cohort
    assert [x.case_id for x in cases][1:3] == ["P2", "P3"]
    assert cases[0].case_id != cases[3].case_id and cases[0].case_id.startswith("P1-")
    expected = [
        Case(
            cases[0].case_id,
            "P1",
            c / "images/p1.nii.gz",
            (c / "masks/p1.nii.gz",),
            {1: {"KRAS": 1, "NRAS": 0, "BRAF": 0, "PIK3CA": 0},
             2: {"KRAS": 0, "NRAS": 0, "BRAF": 1, "PIK3CA": 0}},
            "cohort",
        ),
        Case("P2", "P2", c / "images/p2.nii.gz", (c / "masks/p2.nii.gz",),
             {None: {"KRAS": 0, "NRAS": 0, "BRAF": 0, "PIK3CA": 1}}, "cohort"),
        Case("P3", "P3", abs_p3, (c / "masks/p3.nii.gz",),
             {None: {"KRAS": 0, "NRAS": 0, "BRAF": 0, "PIK3CA": 0}}, "cohort"),
        Case(cases[3].case_id, "P1", c / "images/p1b.nii.gz", (c / "masks/p1b.nii.gz",),
             {3: {"KRAS": 0, "NRAS": 1, "BRAF": 0, "PIK3CA": 0}}, "cohort"),
    ]  # fmt: skip
    assert len(cases) == len(expected)
    for got, want in zip(cases, expected, strict=True):
        assert got.patient_id == want.patient_id
        assert got.image.resolve() == want.image.resolve()
        assert [m.resolve() for m in got.masks] == [m.resolve() for m in want.masks]
        assert got.lesions == want.lesions
        assert (got.source, got.mask_rule) == ("cohort", "single")
    # the lesion rule comes from the rows: explicit ids → instance values, '*'/empty → components
    assert [c.lesion_rule for c in cases] == ["instance", "components", "components", "instance"]
    assert read_manifest(csv)[0].case_id == cases[0].case_id  # deterministic ids
    _, mask = cases[0].load()
    np.testing.assert_array_equal(mask.array, _instance_mask((1, 2)))
    # genes are a parameter (vocabulary lives in conf/labels), and the source name too
    csv2 = _write(
        cohort / "m2.csv",
        ["patient_id,image,mask,lesion,KRAS", "P1,images/p1.nii.gz,masks/p1.nii.gz,2,1"],
    )
    (only,) = read_manifest(csv2, genes=("KRAS",), source="mine")
    assert only.lesions == {2: {"KRAS": 1}} and only.source == "mine"


def test_bad_manifest_lists_every_problem_before_reading_masks(cohort, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("masks must not be read while cheap checks fail")

    monkeypatch.setattr(manifest_mod, "read_mask", no_reads)
    csv = _write(
        cohort / "bad.csv",
        [
            HEADER,  # 1
            "P1,images/p1.nii.gz,masks/p1.nii.gz,1,1,0,0,0",  # 2 ok
            "P2,images/missing.nii.gz,masks/p2.nii.gz,1,0,0,0,0",  # 3 image missing
            "P3,images/p3.nii.gz,masks/nomask.nii.gz,1,2,0,0,0",  # 4 mask missing, KRAS=2
            "",  # 5 blank: line numbers stay physical
            "P4,images/p1b.nii.gz,masks/p1b.nii.gz,1,0,,0,0",  # 6 empty NRAS
            ",images/p2.nii.gz,masks/p2.nii.gz,1,0,0,0,0",  # 7 empty patient_id
            "P1,images/p1.nii.gz,masks/p1.nii.gz,1,0,1,0,0",  # 8 duplicate (P1, 1)
            "P1,images/p1.nii.gz,masks/p1.nii.gz,*,0,0,0,0",  # 9 '*' mixed with lesion rows
            "P5,images/p1.nii.gz,masks/p1.nii.gz,2,0,0,0,0",  # 10 P1's image under P5
            "P6,images/p2.nii.gz,masks/p2.nii.gz,abc,0,0,0,0",  # 11 lesion not an integer
            "P7,images/p2.nii.gz,masks/p2.nii.gz,1,0,0",  # 12 wrong field count
        ],
    )
    with pytest.raises(ManifestError) as err:
        read_manifest(csv)
    problems = err.value.problems
    text = str(err.value)

    def has(line: int, *words: str) -> bool:
        return any(p.startswith(f"line {line}:") and all(w in p for w in words) for p in problems)

    assert has(3, "image not found", "missing.nii.gz")
    assert has(4, "mask not found", "nomask.nii.gz")
    assert has(4, "KRAS", "'2'", "0 or 1")
    assert has(6, "NRAS", "empty")
    assert has(7, "empty patient_id")
    assert has(8, "duplicate", "'P1'", "lesion 1", "line 2")
    assert has(9, "'*'", "same image and mask", "2")
    assert has(10, "patient 'P1'", "one patient")
    assert has(11, "'abc'", "positive integer")
    assert has(12, "6 field(s)", "8")
    assert err.value.path == csv and str(csv) in text
    assert len(problems) == 10, problems  # nothing else, nothing twice


def test_bad_header_reports_missing_unknown_duplicate(cohort):
    csv = _write(
        cohort / "hdr.csv",
        [
            "patient_id,image,mask,KRAS,KRAS,NRAS,BRAF,EGFR",
            "P1,images/p1.nii.gz,masks/p1.nii.gz,1,1,0,0,0",
            "P2,images/p2.nii.gz,masks/p2.nii.gz,x,1,0,0,0",  # still checked: KRAS is 'x'
        ],
    )
    with pytest.raises(ManifestError) as err:
        read_manifest(csv)
    p = err.value.problems
    assert any(s.startswith("line 1:") and "duplicate column 'KRAS'" in s for s in p)
    assert any(s.startswith("line 1:") and "missing column(s) lesion, PIK3CA" in s for s in p)
    assert any(s.startswith("line 1:") and "unknown column(s) 'EGFR'" in s for s in p)
    assert any(s.startswith("line 3:") and "KRAS is 'x'" in s for s in p)


def test_lesion_ids_checked_against_masks_once_per_file(cohort, monkeypatch):
    reads: list[str] = []
    real = cio.read_mask
    monkeypatch.setattr(manifest_mod, "read_mask", lambda p, **kw: reads.append(p) or real(p, **kw))
    csv = _write(
        cohort / "lesions.csv",
        [
            HEADER,
            "P1,images/p1.nii.gz,masks/p1.nii.gz,1,1,0,0,0",
            "P1,images/p1.nii.gz,masks/p1.nii.gz,5,1,0,0,0",  # 5 absent from instance mask {1,2}
            "P2,images/p2.nii.gz,masks/p2.nii.gz,1,0,0,0,0",  # binary mask: value 1 exists
            "P2,images/p2.nii.gz,masks/p2.nii.gz,2,0,0,0,0",  # ids are values, not components
        ],
    )
    with pytest.raises(ManifestError) as err:
        read_manifest(csv)
    p = err.value.problems
    assert len(p) == 2
    assert p[0].startswith("line 3:") and "lesion 5" in p[0] and "values: 1, 2" in p[0]
    assert p[1].startswith("line 5:") and "lesion 2" in p[1] and "values: 1" in p[1]
    assert "binary mask (0/1)" in p[1] and "write '*'" in p[1]
    assert sorted(Path(r).name for r in reads) == ["p1.nii.gz", "p2.nii.gz"]  # once per file

    reads.clear()
    assert len(read_manifest(csv, check_lesions=False)) == 2
    assert reads == []


def test_star_row_on_empty_mask_is_reported(cohort):
    write_nifti(Volume(np.zeros(SHAPE, np.uint8), (2.0, 0.8, 0.8)), cohort / "masks" / "e.nii.gz")
    csv = _write(cohort / "e.csv", [HEADER, "P9,images/p1.nii.gz,masks/e.nii.gz,*,0,0,0,0"])
    with pytest.raises(ManifestError, match=r"line 2: mask .* is empty"):
        read_manifest(csv)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(InputError, match="manifest file not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(ManifestError, match="header"):
        read_manifest(tmp_path / "empty.csv")
    (tmp_path / "hdr.csv").write_text(HEADER + "\n")
    with pytest.raises(ManifestError, match="no data rows"):
        read_manifest(tmp_path / "hdr.csv")


def test_invalid_lesion_cell_is_not_also_a_star_row(cohort):
    csv = _write(
        cohort / "l.csv",
        [
            HEADER,
            "P8,images/p2.nii.gz,masks/p2.nii.gz,0,0,0,0,0",
            "P8,images/p2.nii.gz,masks/p2.nii.gz,*,0,0,0,0",
            "P/9,images/p3.nii.gz,masks/p3.nii.gz,*,0,0,0,0",
        ],
    )
    with pytest.raises(ManifestError) as err:
        read_manifest(csv)
    p = err.value.problems
    assert len(p) == 2, p
    assert p[0].startswith("line 2:") and "lesion '0' is not a positive integer" in p[0]
    assert p[1].startswith("line 4:") and "'P/9'" in p[1]


def test_headers_and_grids_checked_before_any_voxel_is_read(cohort, tmp_path, monkeypatch):
    """One incomplete DICOM series and one mask on another grid: both reported, with their lines
    and files, from headers alone (no pixel decoded, no NIfTI data read, no mask read)."""
    import crc_lightning.io.dicom as dicom_mod
    import crc_lightning.io.nifti as nifti_mod
    from crc_lightning.io import ReadOptions, write_dicom_series

    series = write_dicom_series(
        Volume(np.zeros(SHAPE, np.float32), (2.0, 0.8, 0.8)), cohort / "images" / "dcm", "P4"
    )
    sorted(series.iterdir())[3].unlink()  # a slice lost in the export
    write_nifti(Volume(_instance_mask((1,)), (2.0, 0.4, 0.8)), cohort / "masks" / "fine.nii.gz")

    def boom(*args, **kwargs):
        raise AssertionError("voxels read during header validation")

    for module, name in (
        (dicom_mod, "_pixels"),
        (nifti_mod, "read_nifti"),
        (manifest_mod, "read_mask"),
    ):
        monkeypatch.setattr(module, name, boom)
    csv = _write(
        cohort / "geo.csv",
        [
            HEADER,
            "P1,images/p1.nii.gz,masks/p1.nii.gz,1,1,0,0,0",
            "P4,images/dcm,masks/p3.nii.gz,*,0,0,0,0",
            "P5,images/p2.nii.gz,masks/fine.nii.gz,1,0,0,0,0",
        ],
    )
    with pytest.raises(ManifestError) as err:
        read_manifest(csv)
    p = err.value.problems
    assert len(p) == 2, p
    assert p[0].startswith("line(s) 3: image") and "dcm" in p[0] and "missing slice" in p[0]
    assert p[1].startswith("line(s) 4: mask") and "fine.nii.gz" in p[1] and "differs" in p[1]
    # with resampling allowed the mask passes; the broken series still does not
    with pytest.raises(ManifestError) as err:
        read_manifest(csv, check_lesions=False, options=ReadOptions(resample_mask=True))
    assert len(err.value.problems) == 1 and "missing slice" in err.value.problems[0]
