"""The built-in synthetic cohort: deterministic phantom abdominal CTs whose lesions depend on mutations.

Why it exists: it is the project's default data set (``make demo``, the tests, the benchmarks), so the
whole pipeline runs anywhere without patient data, and a classifier trained on it has a real but
imperfect signal to find.

Each patient is a phantom abdomen — air (−1000 HU), a body ellipse with a fat rim (−100 HU) around
soft tissue (40 HU), a spine (700 HU), a contrast-enhanced liver (60 HU) crossed by vessels (150 HU
tubes along z) — holding 1–3 hypodense liver lesions that never touch each other or the liver's edge.
Gaussian noise (σ 8–20 HU) and voxel spacing (``sz`` 1.0–2.5 mm; ``sy = sx`` 0.6–0.9 mm at 512 px,
scaled so the field of view stays ~300–460 mm at any matrix size) vary by patient.
All lesions of a patient carry the patient's biopsy labels (as in the paper).

How lesion appearance depends on the labels (each strength drawn per lesion, so classes overlap and a
classifier can learn something but not everything):

* **RAS (KRAS or NRAS) — the strongest signal**: a bright enhancing rim (+50…+100 HU over the outer
  40 % of the radius) around a darker, mottled core (≈ 22 HU, texture σ 4–8 HU), and a lobulated
  margin (radial amplitude 12–22 %, 4–6 lobes). Clearly visible in a 32×32 crop. 10 % of RAS lesions
  are "atypical": no rim, smooth margin (they look like OTHER).
* **BRAF / PIK3CA** (the ``PIK3CA_BRAF`` class): larger (50 %: radius 7–12 mm, else 5–10 mm),
  homogeneous (texture σ ≤ 2 HU), smooth and slightly lower attenuation (core ≈ 26 ± 8 HU vs
  ≈ 30 ± 8 HU). Weaker: sizes overlap, and the attenuation gap is below the lesion-to-lesion spread
  plus the per-patient contrast timing.
* **OTHER** (no mutation): small (5–10 mm), smooth, mid attenuation (≈ 30 ± 8 HU, texture σ
  2–5 HU); 10 % show a faint rim (+10…25 HU, RAS mimics).

Nuisances shared by all classes: per-patient contrast timing (liver 60 ± 10 HU, lesion cores shifted
by half as much), noise σ, spacing, lesion position and count, vessels. Measured on 32×32 crops
(tests/test_synthetic.py), a cross-validated logistic probe on four hand features (rim contrast,
mean HU, volume, internal std) reaches lesion-level AUC ≈ 0.90–0.96 for RAS vs rest, above
PIK3CA_BRAF (≈ 0.74–0.89) and OTHER (≈ 0.70–0.76) vs rest.

A patient with RAS and PIK3CA/BRAF gets both: the rim and margin of RAS on a large, dark lesion.

Label prevalences follow Table I of Perlo et al., whose patient row (NRAS 4, KRAS 37, BRAF 5,
PIK3CA 16, OTHER 38 %) sums to 100 % over label *occurrences*: with 5 % of patients carrying two
labels (KRAS+PIK3CA 3 %, PIK3CA+BRAF 2 % — PIK3CA and BRAF co-occur ~2× more often than by chance,
as in the paper's Fig. 1) the label shares match Table I exactly and the per-patient marginals are
KRAS 38.9, NRAS 4.2, BRAF 5.3, PIK3CA 16.8, OTHER 39.9 %. Labels are allotted by largest remainder
(a deterministic stratified scheme), so any cohort of ≥ 24 patients has every combination, hence
≥ 1 BRAF and ≥ 1 NRAS patient.

Output (``generate_synthetic_cohort``): ``labels.csv`` in the manifest format (one row per lesion),
``images/<pid>.nii.gz`` (or ``images/<pid>/`` as a DICOM series for about ``dicom_fraction`` of the
patients) and ``masks/<pid>.nii.gz`` instance masks. Same seed → identical arrays.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import ndimage

from crc_lightning.io import InputError, Volume, write_dicom_series, write_nifti
from crc_lightning.io.files import file_lock
from crc_lightning.sources.manifest import GENES

GENERATOR_VERSION = 3  # bump whenever the arrays for a given seed change
# label combinations and their patient fractions (label shares = Table I; see module docstring)
COMBOS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("KRAS",), 0.3585),
    (("NRAS",), 0.042),
    (("KRAS", "PIK3CA"), 0.03),
    (("PIK3CA",), 0.118),
    (("PIK3CA", "BRAF"), 0.02),
    (("BRAF",), 0.0325),
    ((), 0.399),
)
HU_MIN, HU_MAX = -1024.0, 3071.0  # what the DICOM writer's default rescale stores exactly
DEFAULT_SHAPE = (48, 160, 160)
# HU of the phantom's tissues
AIR, FAT, SOFT, BONE, LIVER, VESSEL = -1000.0, -100.0, 40.0, 700.0, 60.0, 150.0


def allot_labels(n_patients: int, rng: np.random.Generator) -> list[dict[str, int]]:
    """Label dicts for ``n_patients``: largest-remainder counts of ``COMBOS``, shuffled by ``rng``.

    Every combination with a non-zero fraction that rounds to 0 in a cohort of ≥ 24 still gets one
    patient (taken from the largest group), so rare mutations are always represented.
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be ≥ 1, got {n_patients}")
    fracs = np.array([f for _, f in COMBOS])
    raw = fracs * n_patients
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n_patients - counts.sum()]:
        counts[i] += 1
    if n_patients >= 24:
        for i in range(len(COMBOS)):
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    labels = []
    for (genes, _), k in zip(COMBOS, counts):
        labels += [{g: int(g in genes) for g in GENES} for _ in range(k)]
    order = rng.permutation(len(labels))
    return [labels[i] for i in order]


def _ellipse_q(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float):
    """Squared normalised ellipse radius (≤ 1 inside) on open grids."""
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _lesion_field(
    shape_box: tuple[int, int, int],
    center: np.ndarray,
    radii: np.ndarray,
    lob_amp: float,
    lob_k: int,
    phase: float,
) -> np.ndarray:
    """Normalised lesion "radius" d over a box (d ≤ 1 inside), with an in-plane lobulation.

    The lobulation divides d by a function of the in-plane angle only, so the region stays
    star-shaped about its centre (one connected piece).
    """
    zz, yy, xx = (np.arange(n, dtype=np.float32) for n in shape_box)
    dz = (zz[:, None, None] - center[0]) / radii[0]
    dy = (yy[None, :, None] - center[1]) / radii[1]
    dx = (xx[None, None, :] - center[2]) / radii[2]
    d = np.sqrt(dz**2 + dy**2 + dx**2)
    angle = np.arctan2(dy, dx)
    return d / (1.0 + lob_amp * np.cos(lob_k * angle + phase))


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma_hu: float) -> np.ndarray:
    """Spatially correlated noise (σ ≈ ``sigma_hu``) — the mottled interior of a lesion."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
    std = float(field.std()) or 1.0
    return field * np.float32(sigma_hu / std)


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int], enhancement: float):
    """Noise-free body/spine/liver/vessels, vectorised over z; the liver and its vessels are
    ``enhancement`` HU brighter (contrast timing). Returns (image, liver mask, centre, radii)."""
    nz, ny, nx = shape
    yy = np.linspace(-1, 1, ny, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, nx, dtype=np.float32)[None, :]
    slab = np.full((ny, nx), AIR, np.float32)
    slab[_ellipse_q(yy, xx, 0.0, 0.0, 0.68, 0.9) <= 1] = FAT
    slab[_ellipse_q(yy, xx, 0.0, 0.0, 0.6, 0.82) <= 1] = SOFT
    slab[_ellipse_q(yy, xx, 0.45, 0.0, 0.1, 0.1) <= 1] = BONE
    liver_c = (-0.08 + rng.uniform(-0.03, 0.03), -0.32 + rng.uniform(-0.03, 0.03))
    liver_r = (0.36 * rng.uniform(0.95, 1.05), 0.42 * rng.uniform(0.95, 1.05))
    vessels = np.zeros((ny, nx), bool)
    for _ in range(3):
        vy = liver_c[0] + rng.uniform(-0.5, 0.5) * liver_r[0]
        vx = liver_c[1] + rng.uniform(-0.5, 0.5) * liver_r[1]
        vessels |= _ellipse_q(yy, xx, vy, vx, 0.025, 0.025) <= 1
    # the liver is an ellipse that tapers along z: inside where q ≤ taper(z)²
    q = _ellipse_q(yy, xx, liver_c[0], liver_c[1], liver_r[0], liver_r[1])
    zc = np.linspace(-1, 1, nz, dtype=np.float32)
    taper2 = np.clip(1.0 - (zc / 0.95) ** 2, 0.0, None)
    taper2[taper2 <= 0.05**2] = -1.0  # no liver on the polar slices
    liver = q[None] <= taper2[:, None, None]
    organ = np.where(vessels, np.float32(VESSEL + enhancement), np.float32(LIVER + enhancement))
    image = np.where(liver, organ[None], slab[None]).astype(np.float32)
    return image, liver, liver_c, liver_r


def make_phantom_case(
    rng: np.random.Generator,
    genes: Mapping[str, int],
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] | None = None,
    n_lesions: int | None = None,
    noise_sigma: float | None = None,
) -> tuple[Volume, Volume]:
    """One phantom patient: (image, float32 whole HU values; instance mask, int32 1..n).

    ``spacing`` (sz, sy, sx) mm, ``n_lesions`` (default 1–3) and ``noise_sigma`` (HU, default
    8–20) are drawn from ``rng`` when not given; ``noise_sigma=0`` gives the noise-free phantom.
    Fewer than ``n_lesions`` lesions are placed only when the liver has no room left for them.
    See the module docstring for how the lesions depend on ``genes``.
    """
    nz, ny, nx = (int(s) for s in shape)
    shape = (nz, ny, nx)
    if min(shape) < 8:
        raise ValueError(f"shape must be at least 8 voxels along each axis, got {shape}")
    if spacing is None:
        sxy = float(rng.uniform(0.6, 0.9)) * 512 / max(ny, nx)  # same field of view at any size
        spacing = (float(rng.uniform(1.0, 2.5)), sxy, sxy)
    sz, sy, sx = (float(s) for s in spacing)
    ras = bool(genes.get("KRAS", 0) or genes.get("NRAS", 0))
    pb = bool(genes.get("BRAF", 0) or genes.get("PIK3CA", 0))

    # contrast timing varies by patient: the liver by ±10 HU, lesions (poorly perfused) by half that
    enhancement = float(rng.uniform(-10.0, 10.0))
    image, liver3d, liver_c, liver_r = _anatomy(rng, shape, enhancement)

    # lesions: inside the liver's central part, never touching each other or the liver's edge
    mask = np.zeros(shape, np.int32)
    n = int(n_lesions) if n_lesions is not None else int(rng.integers(1, 4))
    placed, tries, radii = 0, 0, None
    for _ in range(60 * n):
        if placed == n:
            break
        if radii is None:  # a new lesion: its size and shape are kept while a place is sought,
            # so large lesions are not rejected more often than small ones (that would erase
            # the size signal); after 20 failed places it shrinks by 10 %
            r_mm = rng.uniform(7.0, 12.0) if pb and rng.random() < 0.5 else rng.uniform(5.0, 10.0)
            radii = r_mm * rng.uniform(0.8, 1.2, size=3) / np.array([sz, sy, sx])
            typical = rng.random() > 0.10
            lob_amp = rng.uniform(0.12, 0.22) if ras and typical else rng.uniform(0.0, 0.05)
            lob_k, phase = int(rng.integers(4, 7)), float(rng.uniform(0, 2 * np.pi))
            tries = 0
        tries += 1
        if tries % 20 == 0:
            radii = radii * 0.9
        cz = rng.uniform(0.3, 0.7) * nz
        cy = (liver_c[0] + rng.uniform(-0.45, 0.45) * liver_r[0] + 1) / 2 * (ny - 1)
        cx = (liver_c[1] + rng.uniform(-0.45, 0.45) * liver_r[1] + 1) / 2 * (nx - 1)
        center = np.array([cz, cy, cx])
        lo = np.maximum(np.floor(center - 1.4 * radii).astype(int) - 1, 0)
        hi = np.minimum(np.ceil(center + 1.4 * radii).astype(int) + 2, shape)
        if np.any(hi - lo < 3):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        d = _lesion_field(tuple(hi - lo), center - lo, radii, lob_amp, lob_k, phase)
        region = d <= 1.0
        if region.sum() < 8:
            continue
        # keep the piece holding the centre (a voxelised lobe tip can come loose)
        comps, _ = ndimage.label(region, structure=np.ones((3, 3, 3)))
        region = comps == comps.flat[int(np.argmin(d))]
        halo = ndimage.binary_dilation(region, structure=np.ones((3, 3, 3)))
        if mask[box][halo].any() or not liver3d[box][halo].all():
            continue
        placed += 1
        mask[box][region] = placed
        radii = None

        core = (26.0 if pb else 30.0) + rng.normal(0, 8) + 0.5 * enhancement
        if pb:
            tex_sigma = rng.uniform(0.5, 2.0)
        elif ras and typical:
            tex_sigma = rng.uniform(4.0, 8.0)
        else:
            tex_sigma = rng.uniform(2.0, 5.0)
        values = core + _texture(rng, region.shape, tex_sigma)
        rim_strength = 0.0
        if ras and typical:
            rim_strength = rng.uniform(50.0, 100.0)
            values -= 8.0
        elif not ras and not pb and rng.random() < 0.10:
            rim_strength = rng.uniform(10.0, 25.0)  # mimics
        if rim_strength:
            values += rim_strength * np.clip((d - 0.6) / 0.3, 0, 1)
        image[box][region] = values[region]

    sigma = float(rng.uniform(8.0, 20.0)) if noise_sigma is None else float(noise_sigma)
    if sigma > 0:
        noise = rng.standard_normal(shape, dtype=np.float32)
        noise *= np.float32(sigma)
        image += noise
        del noise
    np.clip(np.rint(image, out=image), HU_MIN, HU_MAX, out=image)
    spacing = (sz, sy, sx)
    return Volume(image, spacing), Volume(mask, spacing)


def _patient_rng(seed: int, i: int) -> np.random.Generator:
    """Patient ``i``'s own stream: its phantom does not depend on how many patients come before."""
    return np.random.default_rng([int(seed), int(i)])


def patient_ids(n_patients: int) -> list[str]:
    """``SYN-001``, ``SYN-002``, … (wider numbers past 999)."""
    width = max(3, len(str(n_patients)))
    return [f"SYN-{i + 1:0{width}d}" for i in range(n_patients)]


def generate_synthetic_cohort(
    root: str | Path,
    n_patients: int = 48,
    seed: int = 2024,
    dicom_fraction: float = 0.25,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
) -> Path:
    """Write the cohort under ``root`` (must be empty or absent); returns ``root/labels.csv``.

    Prefer :func:`ensure_synthetic_cohort`, which makes this atomic and reuses earlier output.
    """
    from pydicom.uid import generate_uid

    if not 0.0 <= float(dicom_fraction) <= 1.0:
        raise ValueError(f"dicom_fraction must be in [0, 1], got {dicom_fraction}")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InputError(root, "synthetic cohort output must be an empty or absent folder")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    n_patients = int(n_patients)
    labels = allot_labels(n_patients, np.random.default_rng([int(seed), 10**6]))
    n_dicom = round(float(dicom_fraction) * n_patients)
    dicom_ids = set(np.random.default_rng([int(seed), 10**6 + 1]).permutation(n_patients)[:n_dicom])
    rows = []
    for i, (pid, genes) in enumerate(zip(patient_ids(n_patients), labels)):
        image, mask = make_phantom_case(_patient_rng(seed, i), genes, shape=tuple(shape))
        if i in dicom_ids:
            uid = generate_uid(entropy_srcs=["crc-lightning-synthetic", str(seed), pid])
            write_dicom_series(image, root / "images" / pid, patient_id=pid, series_uid=uid)
            image_rel = f"images/{pid}"
        else:
            write_nifti(image, root / "images" / f"{pid}.nii.gz")
            image_rel = f"images/{pid}.nii.gz"
        write_nifti(mask, root / "masks" / f"{pid}.nii.gz")
        for lesion in range(1, int(mask.array.max()) + 1):
            rows.append([pid, image_rel, f"masks/{pid}.nii.gz", lesion, *(genes[g] for g in GENES)])
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["patient_id", "image", "mask", "lesion", *GENES])
        writer.writerows(rows)
    return root / "labels.csv"


def _read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def ensure_synthetic_cohort(
    root: str | Path,
    n_patients: int = 48,
    seed: int = 2024,
    dicom_fraction: float = 0.25,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
) -> Path:
    """Generate the cohort once and reuse it; regenerate when its parameters or the generator change.

    ``root/cohort.json`` records the parameters and ``GENERATOR_VERSION``. Generation happens in a
    temporary sibling folder that is renamed into place, so a killed run never leaves a half-written
    cohort at ``root`` (its leftover temporary folder is removed by the next call). A ``root`` that
    holds anything but a cohort made here is refused rather than replaced.
    """
    root = Path(root).absolute()
    params = {
        "n_patients": int(n_patients),
        "seed": int(seed),
        "dicom_fraction": float(dicom_fraction),
        "shape": [int(s) for s in shape],
        "generator_version": GENERATOR_VERSION,
    }
    stamp, labels_csv = root / "cohort.json", root / "labels.csv"
    if labels_csv.is_file() and _read_stamp(stamp) == params:
        return labels_csv
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):
        if labels_csv.is_file() and _read_stamp(stamp) == params:
            return labels_csv  # another process made it while we waited
        if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not stamp.is_file())):
            raise InputError(
                root,
                "exists and is not a synthetic cohort (no cohort.json); refusing to overwrite it — "
                "choose another data.root",
            )
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.parent.glob(f".{root.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()  # not mkdtemp: its 0700 would make the cohort unreadable to other users
        try:
            generate_synthetic_cohort(tmp, n_patients, seed, dicom_fraction, tuple(shape))
            (tmp / "cohort.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
            if root.exists():
                old = root.with_name(f".{root.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
                os.replace(root, old)
                os.replace(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return labels_csv
