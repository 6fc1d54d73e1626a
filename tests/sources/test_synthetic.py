"""The synthetic cohort: deterministic, Table-I-like prevalences, a real but imperfect label signal."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.transform import resize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from crc_lightning.io import InputError, read_image, read_mask
from crc_lightning.sources.synthetic import (
    GENES,
    LIVER,
    VESSEL,
    _patient_rng,
    allot_labels,
    ensure_synthetic_cohort,
    generate_synthetic_cohort,
    make_phantom_case,
)

SHAPE = (24, 96, 96)
CUBE = np.ones((3, 3, 3), bool)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_same_seed_same_arrays_other_seed_differs():
    a = make_phantom_case(np.random.default_rng(3), {"KRAS": 1}, shape=SHAPE)
    b = make_phantom_case(np.random.default_rng(3), {"KRAS": 1}, shape=SHAPE)
    c = make_phantom_case(np.random.default_rng(4), {"KRAS": 1}, shape=SHAPE)
    assert _digest(a[0].array, a[1].array) == _digest(b[0].array, b[1].array)
    assert a[0].spacing == b[0].spacing
    assert _digest(a[0].array, a[1].array) != _digest(c[0].array, c[1].array)
    assert a[0].array.dtype == np.float32 and a[1].array.dtype == np.int32
    assert np.array_equal(a[0].array, np.rint(a[0].array))  # whole HU: exact in DICOM/NIfTI


def test_phantom_tissues_spacing_and_noise():
    img, m = make_phantom_case(np.random.default_rng(0), {}, shape=SHAPE, noise_sigma=0.0)
    values = np.unique(img.array[m.array == 0])
    assert {-1000.0, -100.0, 40.0, 700.0} <= set(values.tolist())  # air fat soft-tissue bone
    liver = values[(values >= LIVER - 10) & (values <= LIVER + 10)]
    assert len(liver) == 1 and np.isin(liver + VESSEL - LIVER, values).all()  # liver and vessels
    assert img.array[m.array > 0].mean() < liver[0] - 10  # lesions are hypodense
    noisy, _ = make_phantom_case(np.random.default_rng(0), {}, shape=SHAPE, noise_sigma=15.0)
    # the noise σ asked for, measured on the body's uniform soft tissue (air is clipped at −1024)
    soft = ndimage.binary_erosion(img.array == 40.0, iterations=2)
    assert soft.sum() > 1000 and 14.0 < noisy.array[soft].std() < 16.0
    spacings = np.array(
        [make_phantom_case(_patient_rng(1, i), {}, shape=SHAPE)[0].spacing
         for i in range(20)]
    )  # fmt: skip
    assert len(set(spacings[:, 0])) == 20 and np.all(spacings[:, 1] == spacings[:, 2])
    assert spacings[:, 0].min() >= 1.0 and spacings[:, 0].max() <= 2.5


def test_prevalences_near_table_one():
    labels = pd.DataFrame(allot_labels(200, np.random.default_rng(0)))
    genes = labels[list(GENES)]
    other = genes.sum(axis=1) == 0
    table_one = {"KRAS": 0.37, "NRAS": 0.04, "BRAF": 0.05, "PIK3CA": 0.16, "OTHER": 0.38}
    # per-patient marginals within 2.5 points of Table I's patient row …
    marginals = {**genes.mean().to_dict(), "OTHER": other.mean()}
    for name, p in table_one.items():
        assert abs(marginals[name] - p) <= 0.025, (name, marginals[name])
    # … and label shares (Table I's row sums to 100 % over label occurrences) within 1 point
    counts = {**genes.sum().to_dict(), "OTHER": other.sum()}
    total = sum(counts.values())
    for name, p in table_one.items():
        assert abs(counts[name] / total - p) <= 0.01, (name, counts[name] / total)
    assert (genes.sum(axis=1) >= 2).sum() >= 5  # some multi-label patients
    # PIK3CA and BRAF co-occur more often than under independence (paper Fig. 1)
    both = (labels.PIK3CA & labels.BRAF).mean()
    assert both > 1.5 * labels.PIK3CA.mean() * labels.BRAF.mean()


@pytest.mark.parametrize("n", [24, 25, 31, 48])
def test_small_cohort_has_every_class(n):
    labels = pd.DataFrame(allot_labels(n, np.random.default_rng(n)))
    assert len(labels) == n
    assert labels.NRAS.sum() >= 1 and labels.BRAF.sum() >= 1
    assert labels.KRAS.sum() >= 2 and labels.PIK3CA.sum() >= 2
    assert (labels[list(GENES)].sum(axis=1) == 0).sum() >= 2


def _crop32(image: np.ndarray, mask: np.ndarray, lesion: int) -> tuple[np.ndarray, np.ndarray]:
    """The lesion's largest slice, its square bounding box + 2 px, resized to 32×32 (like a crop)."""
    region = mask == lesion
    z = int(np.argmax(region.sum(axis=(1, 2))))
    ys, xs = np.nonzero(region[z])
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    half = max(ys.max() - ys.min(), xs.max() - xs.min()) / 2 + 2
    y0, x0 = int(np.floor(cy - half)), int(np.floor(cx - half))
    side = int(np.ceil(2 * half)) + 1
    img = image[z, y0 : y0 + side, x0 : x0 + side]
    msk = region[z, y0 : y0 + side, x0 : x0 + side]
    return (
        resize(img, (32, 32), order=1, preserve_range=True, anti_aliasing=True),
        resize(msk.astype(float), (32, 32), order=1) > 0.5,
    )


def _rim_minus_core(img: np.ndarray, msk: np.ndarray) -> float:
    """Mean HU of the lesion's outer band minus its inner part, on a 32×32 crop."""
    dist = ndimage.distance_transform_edt(msk)
    inner = dist > 0.45 * dist.max()
    rim = msk & ~inner
    return float(img[rim].mean() - img[inner].mean())


@pytest.fixture(scope="module")
def lesions() -> pd.DataFrame:
    """Lesion features on 32×32 crops from 48 phantoms (16 per class), each with its own stream."""
    rows = []
    kinds = {"RAS": {"KRAS": 1}, "PIK3CA_BRAF": {"PIK3CA": 1}, "OTHER": {}}
    for j, (cls, genes) in enumerate(kinds.items()):
        for i in range(16):
            img, m = make_phantom_case(_patient_rng(100 + j, i), genes, shape=(32, 128, 128))
            vox = float(np.prod(img.spacing))
            for k in range(1, int(m.array.max()) + 1):
                crop, cmask = _crop32(img.array, m.array, k)
                rows.append(
                    {
                        "cls": cls,
                        "patient": f"{cls}-{i}",
                        "rim": _rim_minus_core(crop, cmask),
                        "log_volume": float(np.log((m.array == k).sum() * vox)),
                        "mean_hu": float(crop[cmask].mean()),
                        "std_hu": float(crop[cmask].std()),
                    }
                )
    return pd.DataFrame(rows)


def _probe_auc(lesions: pd.DataFrame, cls: str) -> float:
    """Lesion-level AUC of a patient-grouped cross-validated logistic probe, ``cls`` vs rest."""
    x = lesions[["rim", "log_volume", "mean_hu", "std_hu"]].to_numpy()
    y = (lesions.cls == cls).to_numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression())
    p = cross_val_predict(
        probe, x, y, groups=lesions.patient, cv=GroupKFold(4), method="predict_proba"
    )[:, 1]
    return float(roc_auc_score(y, p))


def test_ras_rim_is_visible_at_32px_but_not_perfect(lesions):
    ras = lesions.cls == "RAS"
    assert ras.sum() >= 16 and (~ras).sum() >= 32
    auc_rim = roc_auc_score(ras, lesions.rim)
    # strong at 32×32 but not perfect (atypical RAS lesions, rim-like OTHER mimics)
    assert 0.8 <= auc_rim < 0.99, auc_rim
    assert lesions.rim[ras].median() > lesions.rim[~ras].median() + 10.0


def test_ras_carries_the_strongest_signal(lesions):
    auc = {cls: _probe_auc(lesions, cls) for cls in ("RAS", "PIK3CA_BRAF", "OTHER")}
    assert 0.8 <= auc["RAS"] < 0.99, auc
    assert auc["RAS"] > auc["PIK3CA_BRAF"] and auc["RAS"] > auc["OTHER"], auc
    assert auc["PIK3CA_BRAF"] > 0.6 and auc["OTHER"] > 0.55, auc  # weaker, but there


def test_pik3ca_braf_lesions_larger_and_more_homogeneous_than_other():
    """On noise-free phantoms: bigger, a little darker, smoother inside (needs many lesions)."""
    stats = {}
    for j, (cls, genes) in enumerate({"PIK3CA_BRAF": {"BRAF": 1}, "OTHER": {}}.items()):
        vol, hu, sd = [], [], []
        for i in range(30):
            img, m = make_phantom_case(
                _patient_rng(300 + j, i), genes, shape=(48, 96, 96), noise_sigma=0.0
            )
            for k in range(1, int(m.array.max()) + 1):
                inner = ndimage.binary_erosion(m.array == k)
                if inner.sum() < 5:
                    continue
                vol.append((m.array == k).sum() * np.prod(img.spacing))
                hu.append(img.array[inner].mean())
                sd.append(img.array[inner].std())
        stats[cls] = (np.mean(vol), np.mean(hu), np.median(sd))
    pb, other = stats["PIK3CA_BRAF"], stats["OTHER"]
    assert pb[0] > 1.25 * other[0] and pb[1] < other[1] and pb[2] < other[2], stats


def test_lesions_are_single_components_inside_the_liver():
    for i, genes in enumerate([{"PIK3CA": 1}, {"KRAS": 1}, {}, {"NRAS": 1, "BRAF": 1}]):
        img, m = make_phantom_case(
            _patient_rng(7, i), genes, shape=(32, 128, 128), n_lesions=3, noise_sigma=0.0
        )
        assert m.array.max() == 3
        for k in range(1, 4):
            _, n = ndimage.label(m.array == k, structure=CUBE)
            assert n == 1
            # the noise-free voxels around each lesion are all liver: parenchyma (60 ± 10 HU with
            # the patient's contrast timing) or vessel (150 ± 10 HU) — never soft tissue or fat
            ring = ndimage.binary_dilation(m.array == k, structure=CUBE) & (m.array == 0)
            values = np.unique(img.array[ring])
            assert len(values) <= 2 and values.min() >= LIVER - 10 and values.max() <= VESSEL + 10


def test_512_case_generates_in_a_few_seconds():
    t = time.perf_counter()
    img, m = make_phantom_case(np.random.default_rng(0), {"KRAS": 1}, shape=(200, 512, 512))
    elapsed = time.perf_counter() - t
    assert img.shape == (200, 512, 512) and m.array.max() >= 1
    assert 0.6 <= img.spacing[1] <= 0.9
    assert elapsed < 8.0, f"{elapsed:.1f} s"


def _cohort_digest(root) -> str:
    df = pd.read_csv(root / "labels.csv")
    arrays = []
    for _pid, g in df.groupby("patient_id", sort=True):
        arrays += [
            read_image(root / g.image.iloc[0]).array,
            read_mask(root / g["mask"].iloc[0]).array,
        ]
    return _digest(*arrays)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "cohort"
    csv = ensure_synthetic_cohort(root, n_patients=6, seed=11, dicom_fraction=0.34, shape=SHAPE)
    return root, csv


def test_cohort_is_deterministic(cohort, tmp_path):
    root, _ = cohort
    again = generate_synthetic_cohort(tmp_path / "a", 6, 11, 0.34, SHAPE).parent
    other = generate_synthetic_cohort(tmp_path / "b", 6, 12, 0.34, SHAPE).parent
    assert (root / "labels.csv").read_bytes() == (again / "labels.csv").read_bytes()
    assert _cohort_digest(root) == _cohort_digest(again)
    assert _cohort_digest(root) != _cohort_digest(other)


def test_cohort_files_manifest_and_dicom_round_trip(cohort):
    manifest = pytest.importorskip(
        "crc_lightning.sources.manifest", reason="manifest reader not in the tree yet"
    )
    root, csv = cohort
    df = pd.read_csv(csv)
    assert list(df.columns) == ["patient_id", "image", "mask", "lesion", *GENES]
    assert sorted(df.patient_id.unique()) == [f"SYN-{i:03d}" for i in range(1, 7)]
    assert df.groupby("patient_id")[list(GENES)].nunique().max().max() == 1  # patient-level labels
    cases = manifest.read_manifest(csv)
    assert {c.patient_id for c in cases} == set(df.patient_id)
    dicom = [c for c in cases if c.image.is_dir()]
    assert len(dicom) == 2 and all(
        (root / "masks" / f"{c.patient_id}.nii.gz").is_file() for c in cases
    )
    for case in dicom:
        pid = case.patient_id
        i = int(pid.split("-")[1]) - 1
        genes = {g: int(df[df.patient_id == pid][g].iloc[0]) for g in GENES}
        expected, expected_mask = make_phantom_case(_patient_rng(11, i), genes, shape=SHAPE)
        got = read_image(case.image)
        np.testing.assert_array_equal(got.array, expected.array)  # whole HU: exact
        np.testing.assert_allclose(got.spacing, expected.spacing, rtol=1e-5)
        mask = read_mask(case.masks[0], reference=got)
        np.testing.assert_array_equal(mask.array, expected_mask.array)
        assert sorted(df[df.patient_id == pid].lesion) == list(range(1, mask.array.max() + 1))


def test_ensure_reuses_then_regenerates_on_param_change(cohort):
    root, csv = cohort
    before = csv.stat().st_mtime_ns
    stamp = json.loads((root / "cohort.json").read_text())
    assert stamp["seed"] == 11 and "generator_version" in stamp
    again = ensure_synthetic_cohort(root, n_patients=6, seed=11, dicom_fraction=0.34, shape=SHAPE)
    assert again == csv and csv.stat().st_mtime_ns == before
    ensure_synthetic_cohort(root, n_patients=5, seed=11, dicom_fraction=0.34, shape=SHAPE)
    assert json.loads((root / "cohort.json").read_text())["n_patients"] == 5
    assert pd.read_csv(root / "labels.csv").patient_id.nunique() == 5
    leftovers = [p for p in root.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers


def test_ensure_cleans_a_killed_run_and_refuses_foreign_folders(tmp_path):
    root = tmp_path / "cohort"
    stale = tmp_path / ".cohort.tmp-deadbeef"  # what a killed generation leaves behind
    (stale / "images").mkdir(parents=True)
    ensure_synthetic_cohort(root, n_patients=2, seed=1, dicom_fraction=0.0, shape=SHAPE)
    assert not stale.exists() and (root / "cohort.json").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a synthetic cohort"):
        ensure_synthetic_cohort(foreign, n_patients=2, seed=1, shape=SHAPE)
    assert (foreign / "notes.txt").read_text() == "keep me"
