"""The synthetic cohort: deterministic, Table-I-like prevalences, a real label-dependent signal."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from crc_lightning.data.synthetic import (
    GENES,
    allot_labels,
    ensure_synthetic_cohort,
    make_phantom_case,
)
from crc_lightning.io import read_image, read_mask
from crc_lightning.preprocessing.manifest import read_manifest

SHAPE = (24, 96, 96)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_same_seed_same_arrays_other_seed_differs():
    a = make_phantom_case(np.random.default_rng(3), {"KRAS": 1}, shape=SHAPE)
    b = make_phantom_case(np.random.default_rng(3), {"KRAS": 1}, shape=SHAPE)
    c = make_phantom_case(np.random.default_rng(4), {"KRAS": 1}, shape=SHAPE)
    assert _digest(a[0].array, a[1].array) == _digest(b[0].array, b[1].array)
    assert _digest(a[0].array, a[1].array) != _digest(c[0].array, c[1].array)


def test_prevalences_near_table_one():
    labels = pd.DataFrame(allot_labels(200, np.random.default_rng(0)))
    table_one = {"KRAS": 0.37, "NRAS": 0.04, "BRAF": 0.05, "PIK3CA": 0.16}
    for gene, p in table_one.items():
        assert abs(labels[gene].mean() - p) <= 0.015, gene
    other = (labels[list(GENES)].sum(axis=1) == 0).mean()
    assert 0.36 <= other <= 0.45  # Table I: 38 % of patients, 43 % of images
    # PIK3CA and BRAF co-occur more often than under independence (paper Fig. 1)
    both = (labels.PIK3CA & labels.BRAF).mean()
    assert both > labels.PIK3CA.mean() * labels.BRAF.mean()


def test_small_cohort_has_every_class():
    labels = pd.DataFrame(allot_labels(24, np.random.default_rng(1)))
    assert labels.NRAS.sum() >= 1 and labels.BRAF.sum() >= 1
    assert labels.KRAS.sum() >= 2 and labels.PIK3CA.sum() >= 2
    assert (labels[list(GENES)].sum(axis=1) == 0).sum() >= 2


def _rim_contrast(image: np.ndarray, mask: np.ndarray, lesion: int) -> float:
    region = mask == lesion
    inner = ndimage.binary_erosion(region, iterations=2)
    rim = region & ~inner
    return float(image[rim].mean() - image[inner].mean()) if inner.any() else 0.0


def test_ras_lesions_have_a_brighter_rim_than_other_lesions():
    def contrasts(genes, seeds):
        out = []
        for s in seeds:
            img, m = make_phantom_case(np.random.default_rng(s), genes, shape=(32, 128, 128))
            out += [_rim_contrast(img.array, m.array, k) for k in range(1, m.array.max() + 1)]
        return np.array(out)

    ras = contrasts({"KRAS": 1}, range(8))
    other = contrasts({}, range(8, 16))
    assert np.median(ras) > np.median(other) + 15.0


def test_lesions_are_single_components_inside_the_liver():
    img, m = make_phantom_case(np.random.default_rng(5), {"PIK3CA": 1}, shape=SHAPE, n_lesions=3)
    assert m.array.max() == 3
    for k in range(1, 4):
        _, n = ndimage.label(m.array == k, structure=np.ones((3, 3, 3)))
        assert n == 1
        # liver parenchyma around each lesion: the dilated ring is soft tissue, not fat or air
        ring = ndimage.binary_dilation(m.array == k, iterations=1) & (m.array == 0)
        assert img.array[ring].mean() > 20


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "cohort"
    csv = ensure_synthetic_cohort(root, n_patients=6, seed=11, dicom_fraction=0.34, shape=SHAPE)
    return root, csv


def test_cohort_files_manifest_and_dicom_round_trip(cohort):
    _, csv = cohort
    df = pd.read_csv(csv)
    assert list(df.columns) == ["patient_id", "image", "mask", "lesion", *GENES]
    cases = read_manifest(csv)
    assert {c.patient_id for c in cases} == set(df.patient_id)
    dicom = [c for c in cases if c.image.is_dir()]
    assert len(dicom) == 2
    # the DICOM patient reads back as the phantom it was made from
    i = int(dicom[0].patient_id.split("-")[1]) - 1
    from crc_lightning.data.synthetic import _patient_rng  # the generator's own stream

    genes = {g: int(df[df.patient_id == dicom[0].patient_id][g].iloc[0]) for g in GENES}
    expected, _ = make_phantom_case(_patient_rng(11, i), genes, shape=SHAPE)
    got = read_image(dicom[0].image)
    np.testing.assert_array_equal(got.array, expected.array)
    np.testing.assert_allclose(got.spacing, expected.spacing, rtol=1e-5)
    mask = read_mask(dicom[0].masks[0], reference=got)
    assert set(np.unique(mask.array)) == set(range(int(mask.array.max()) + 1))


def test_ensure_reuses_then_regenerates_on_param_change(cohort):
    root, csv = cohort
    before = csv.stat().st_mtime_ns
    assert (
        ensure_synthetic_cohort(root, n_patients=6, seed=11, dicom_fraction=0.34, shape=SHAPE)
        == csv
    )
    assert csv.stat().st_mtime_ns == before
    ensure_synthetic_cohort(root, n_patients=5, seed=11, dicom_fraction=0.34, shape=SHAPE)
    assert json.loads((root / "cohort.json").read_text())["n_patients"] == 5
    assert pd.read_csv(root / "labels.csv").patient_id.nunique() == 5
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp left
