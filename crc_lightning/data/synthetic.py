"""The built-in synthetic cohort: deterministic phantom abdominal CTs whose lesions depend on mutations.

Each patient is a phantom abdomen — air, a body ellipse with a fat rim, spine, a contrast-enhanced
liver (~60 HU) with vessels (~150 HU) — holding 1–3 hypodense liver lesions. Noise level and voxel
spacing vary by patient. All lesions of a patient carry the patient's biopsy labels (as in the paper).

How lesion appearance depends on the labels (each strength drawn per lesion, so classes overlap and a
classifier can learn something but not everything):

* **RAS (KRAS or NRAS) — the strongest signal**: a bright enhancing rim (+50…+100 HU over the outer
  40 % of the radius) around a darker core, and a lobulated margin. Clearly visible at 32×32 px.
  15 % of RAS lesions are "atypical" and show no rim.
* **BRAF / PIK3CA**: larger (radius 9–14 mm vs 5–10 mm), homogeneous and lower attenuation (≈5 HU
  vs ≈30 HU). Weaker: size overlaps and the window keeps the contrast small.
* **OTHER** (no mutation): small, smooth, mid-attenuation lesions; 10 % show a faint rim (mimics).

Label prevalences follow Table I of Perlo et al. (patients: KRAS 37 %, NRAS 4 %, BRAF 5 %, PIK3CA 16 %,
OTHER ≈ 40 %), with KRAS+PIK3CA and PIK3CA+BRAF co-occurrences (PIK3CA–BRAF above chance, as in
the paper's Fig. 1). Labels are allotted by largest remainder so even a small cohort (n ≥ 24) has
BRAF and NRAS patients.

Output (``generate_synthetic_cohort``): ``labels.csv`` in the manifest format (one row per lesion),
``images/<pid>.nii.gz`` (or ``images/<pid>/`` as a DICOM series for about ``dicom_fraction`` of the
patients) and ``masks/<pid>.nii.gz`` instance masks. Same seed → identical arrays.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from crc_lightning.io.volume import Volume

GENERATOR_VERSION = 1
GENES = ("KRAS", "NRAS", "BRAF", "PIK3CA")
# label combinations and their patient fractions (marginals ≈ Table I; see module docstring)
COMBOS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("KRAS",), 0.34),
    (("NRAS",), 0.04),
    (("KRAS", "PIK3CA"), 0.03),
    (("PIK3CA",), 0.11),
    (("PIK3CA", "BRAF"), 0.02),
    (("BRAF",), 0.03),
    ((), 0.43),
)
HU_MIN, HU_MAX = -1024.0, 3071.0


def allot_labels(n_patients: int, rng: np.random.Generator) -> list[dict[str, int]]:
    """Label dicts for ``n_patients``: largest-remainder counts of ``COMBOS``, shuffled by ``rng``.

    Every combination with a non-zero fraction that rounds to 0 in a cohort of ≥ 24 still gets one
    patient (taken from the largest group), so rare mutations are always represented.
    """
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


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _lesion_field(
    shape_box: tuple[int, int, int],
    center: np.ndarray,
    radii: np.ndarray,
    lob_amp: float,
    lob_k: int,
    phase: float,
) -> np.ndarray:
    """Normalised lesion "radius" d over a box (d ≤ 1 inside), with an angular lobulation."""
    zz, yy, xx = (np.arange(n, dtype=np.float32) for n in shape_box)
    dz = (zz[:, None, None] - center[0]) / radii[0]
    dy = (yy[None, :, None] - center[1]) / radii[1]
    dx = (xx[None, None, :] - center[2]) / radii[2]
    d = np.sqrt(dz**2 + dy**2 + dx**2)
    angle = np.arctan2(dy, dx)
    return d / (1.0 + lob_amp * np.cos(lob_k * angle + phase))


def make_phantom_case(
    rng: np.random.Generator,
    genes: Mapping[str, int],
    shape: tuple[int, int, int] = (48, 160, 160),
    spacing: tuple[float, float, float] | None = None,
    n_lesions: int | None = None,
) -> tuple[Volume, Volume]:
    """One phantom patient: (image in integer HU, instance mask 1..n). See the module docstring."""
    nz, ny, nx = shape
    if spacing is None:
        sxy = float(rng.uniform(0.6, 0.9)) * 512 / max(ny, nx)  # same field of view at any size
        spacing = (float(rng.uniform(1.0, 2.5)), sxy, sxy)
    sz, sy, sx = spacing
    ras = bool(genes.get("KRAS", 0) or genes.get("NRAS", 0))
    pb = bool(genes.get("BRAF", 0) or genes.get("PIK3CA", 0))

    # 2D anatomy (same on every slice, the liver tapers along z), built on open grids
    yy = np.linspace(-1, 1, ny, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, nx, dtype=np.float32)[None, :]
    body = _ellipse(yy, xx, 0.0, 0.0, 0.68, 0.9)
    inner = _ellipse(yy, xx, 0.0, 0.0, 0.6, 0.82)
    spine = _ellipse(yy, xx, 0.45, 0.0, 0.1, 0.1)
    vessels = np.zeros((ny, nx), bool)
    liver_c = (-0.08 + rng.uniform(-0.03, 0.03), -0.32 + rng.uniform(-0.03, 0.03))
    liver_r = (0.36 * rng.uniform(0.95, 1.05), 0.42 * rng.uniform(0.95, 1.05))
    for _ in range(3):
        vy = liver_c[0] + rng.uniform(-0.5, 0.5) * liver_r[0]
        vx = liver_c[1] + rng.uniform(-0.5, 0.5) * liver_r[1]
        vessels |= _ellipse(yy, xx, vy, vx, 0.025, 0.025)
    slab = np.where(body, -100.0, -1000.0).astype(np.float32)
    slab[inner] = 40.0
    slab[spine] = 700.0

    image = np.empty(shape, np.float32)
    liver3d = np.zeros(shape, bool)
    zc = np.linspace(-1, 1, nz, dtype=np.float32)
    for k in range(nz):
        taper = float(np.sqrt(max(0.0, 1.0 - (zc[k] / 0.95) ** 2)))
        image[k] = slab
        if taper > 0.05:
            liver = _ellipse(yy, xx, liver_c[0], liver_c[1], liver_r[0] * taper, liver_r[1] * taper)
            image[k][liver] = 60.0
            image[k][liver & vessels] = 150.0
            liver3d[k] = liver

    # lesions: inside the liver's central part, never touching each other
    mask = np.zeros(shape, np.int32)
    n = int(n_lesions) if n_lesions is not None else int(rng.integers(1, 4))
    placed = 0
    for _ in range(60 * n):
        if placed == n:
            break
        r_mm = rng.uniform(9.0, 14.0) if pb and rng.random() < 0.8 else rng.uniform(5.0, 10.0)
        radii_mm = r_mm * rng.uniform(0.8, 1.2, size=3)
        radii = radii_mm / np.array([sz, sy, sx])
        cz = rng.uniform(0.3, 0.7) * nz
        cy = (liver_c[0] + rng.uniform(-0.45, 0.45) * liver_r[0] + 1) / 2 * (ny - 1)
        cx = (liver_c[1] + rng.uniform(-0.45, 0.45) * liver_r[1] + 1) / 2 * (nx - 1)
        center = np.array([cz, cy, cx])
        lo = np.maximum(np.floor(center - 1.4 * radii).astype(int), 0)
        hi = np.minimum(np.ceil(center + 1.4 * radii).astype(int) + 1, shape)
        if np.any(hi - lo < 3):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        typical = rng.random() > 0.15
        lob_amp = rng.uniform(0.12, 0.22) if ras and typical else rng.uniform(0.0, 0.05)
        d = _lesion_field(
            tuple(hi - lo),
            center - lo,
            radii,
            lob_amp,
            int(rng.integers(4, 7)),
            float(rng.uniform(0, 2 * np.pi)),
        )
        region = d <= 1.0
        if region.sum() < 8 or mask[box][region].any() or not liver3d[box][region].all():
            continue
        placed += 1
        mask[box][region] = placed
        core = 30.0 + rng.normal(0, 4)
        if pb:
            core = 5.0 + rng.normal(0, 4)
        values = np.full(region.shape, core, np.float32)
        rim_strength = 0.0
        if ras and typical:
            rim_strength = rng.uniform(50.0, 100.0)
            values -= 8.0
        elif not ras and not pb and rng.random() < 0.10:
            rim_strength = rng.uniform(10.0, 25.0)  # mimics
        if rim_strength:
            values += rim_strength * np.clip((d - 0.6) / 0.3, 0, 1)
        image[box][region] = values[region]

    noise = float(rng.uniform(8.0, 20.0))
    image += rng.normal(0.0, noise, size=shape).astype(np.float32)
    np.clip(np.rint(image, out=image), HU_MIN, HU_MAX, out=image)
    img = Volume(image, spacing, origin=(0.0, 0.0, 0.0))
    return img, Volume(mask, spacing, origin=(0.0, 0.0, 0.0))


def _patient_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(i)])


def generate_synthetic_cohort(
    root: str | Path,
    n_patients: int = 48,
    seed: int = 2024,
    dicom_fraction: float = 0.25,
    shape: tuple[int, int, int] = (48, 160, 160),
) -> Path:
    """Write the cohort under ``root`` (must be empty or absent); returns ``root/labels.csv``."""
    from crc_lightning.io import write_dicom_series, write_nifti

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    labels = allot_labels(int(n_patients), np.random.default_rng([int(seed), 10**6]))
    n_dicom = round(dicom_fraction * n_patients)
    dicom_ids = set(np.random.default_rng([int(seed), 10**6 + 1]).permutation(n_patients)[:n_dicom])
    rows = []
    for i, genes in enumerate(labels):
        pid = f"SYN-{i + 1:03d}"
        image, mask = make_phantom_case(_patient_rng(seed, i), genes, shape=tuple(shape))
        if i in dicom_ids:
            from pydicom.uid import generate_uid

            uid = generate_uid(entropy_srcs=["crc-lightning-synthetic", str(seed), pid])
            write_dicom_series(image, root / "images" / pid, patient_id=pid, series_uid=uid)
            image_rel = f"images/{pid}"
        else:
            write_nifti(image, root / "images" / f"{pid}.nii.gz")
            image_rel = f"images/{pid}.nii.gz"
        write_nifti(mask, root / "masks" / f"{pid}.nii.gz")
        for lesion in range(1, int(mask.array.max()) + 1):
            rows.append([pid, image_rel, f"masks/{pid}.nii.gz", lesion, *(genes[g] for g in GENES)])
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "image", "mask", "lesion", *GENES])
        writer.writerows(rows)
    return root / "labels.csv"


def ensure_synthetic_cohort(
    root: str | Path,
    n_patients: int = 48,
    seed: int = 2024,
    dicom_fraction: float = 0.25,
    shape: tuple[int, int, int] = (48, 160, 160),
) -> Path:
    """Generate the cohort once and reuse it; regenerate when its parameters or the generator change.

    Generation happens in a temporary sibling folder that is renamed into place, so a killed run
    never leaves a half-written cohort at ``root``.
    """
    root = Path(root)
    params = {
        "n_patients": int(n_patients),
        "seed": int(seed),
        "dicom_fraction": float(dicom_fraction),
        "shape": [int(s) for s in shape],
        "generator_version": GENERATOR_VERSION,
    }
    stamp = root / "cohort.json"
    if stamp.is_file() and (root / "labels.csv").is_file():
        try:
            if json.loads(stamp.read_text()) == params:
                return root / "labels.csv"
        except json.JSONDecodeError:
            pass
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate_synthetic_cohort(tmp, n_patients, seed, dicom_fraction, tuple(shape))
        (tmp / "cohort.json").write_text(json.dumps(params, indent=2))
        if root.exists():
            old = root.with_name(f".{root.name}.old-{tmp.name[-8:]}")
            root.rename(old)
            tmp.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "labels.csv"
