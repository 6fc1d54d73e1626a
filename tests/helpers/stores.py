"""A tiny crop store for the classifier/run tests, written directly in the CONTRACTS.md layout.

Why not the real preprocessing: these tests exercise the training app, not Algorithm 1, and must
stay fast; the layout (index.parquet + store.json + cases/*.npz of int16 HU) is the same one the
preprocess app writes. The images carry a deliberate, known signal so a "training learns" test
has an oracle: a RAS (KRAS or NRAS) lesion is a bright disc (+160 HU over the liver), any other
lesion a dark one (-60 HU); PIK3CA/BRAF add a faint texture. Everything is drawn from ``seed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

GENES = ("KRAS", "NRAS", "BRAF", "PIK3CA")
# (KRAS, NRAS, BRAF, PIK3CA) patterns cycled over patients, so every class of both label sets
# has positives and negatives in any split of ≥ 10 patients.
PATTERNS = (
    (1, 0, 0, 0),
    (0, 0, 0, 0),
    (0, 1, 0, 0),
    (0, 0, 1, 0),
    (1, 0, 0, 1),
    (0, 0, 0, 0),
    (0, 0, 0, 1),
    (1, 0, 0, 0),
)


def lesion_crop(rng: np.random.Generator, genes: tuple[int, ...], size: int) -> np.ndarray:
    """One int16 HU crop: liver background, a disc whose brightness says RAS or not."""
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-2, 2, size=2)
    r = size * rng.uniform(0.22, 0.32)
    disc = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r**2
    img = 60.0 + rng.normal(0, 12, size=(size, size))
    ras = genes[0] or genes[1]
    img[disc] += 160.0 if ras else -60.0
    if genes[2] or genes[3]:
        img[disc] += 25.0 * np.sin(xx[disc] * 1.3)
    return np.clip(np.round(img), -1024, 3071).astype(np.int16)


def write_fake_store(
    store_dir: str | Path, n_patients: int = 16, seed: int = 0, source: str = "fake"
) -> Path:
    """Write a crop store with ``n_patients`` patients (1–2 lesions, 3–4 slices each)."""
    rng = np.random.default_rng(seed)
    store = Path(store_dir)
    (store / "cases").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        pid = f"P{p:03d}"
        genes = PATTERNS[p % len(PATTERNS)]
        case_file = f"cases/case{p:03d}.npz"
        arrays = {}
        for lesion in range(1, 2 + int(rng.integers(0, 2))):
            size = int(rng.integers(24, 40))
            for sl in range(10, 10 + int(rng.integers(3, 5))):
                key = f"l{lesion}_s{sl}"
                arrays[key] = lesion_crop(rng, genes, size)
                rows.append(
                    {
                        "crop_id": f"{pid}/{lesion}/{sl}",
                        "patient_id": pid,
                        "lesion": lesion,
                        "lesion_uid": f"{pid}/{lesion}",
                        "slice": sl,
                        "area_mm2": float(size * size * 0.2),
                        "spacing_y": 0.8,
                        "spacing_x": 0.8,
                        "size_px": size,
                        "source": source,
                        "case_file": case_file,
                        "key": key,
                        **dict(zip(GENES, genes)),
                    }
                )
        np.savez(store / case_file, **arrays)
    index = pd.DataFrame(rows)
    for g in GENES:
        index[g] = index[g].astype("Int8")
    index.to_parquet(store / "index.parquet", index=False)
    meta = {
        "version": "test",
        "params": {"epsilon": 0.4, "border_mm": 10.0, "window_width": 400, "window_level": 40},
        "inputs": {},
        "created": "2024-01-01T00:00:00",
        "summary": {"patients": n_patients, "crops": len(index)},
    }
    (store / "store.json").write_text(json.dumps(meta))
    return store


def synthetic_store(store_dir: str | Path, n_patients: int = 24, seed: int = 2024) -> Path:
    """The project's synthetic cohort (NIfTI only) through the real preprocessing."""
    from crc_lightning.cropstore.writer import build_crop_store
    from crc_lightning.sources.manifest import read_manifest
    from crc_lightning.sources.synthetic import ensure_synthetic_cohort

    store = Path(store_dir)
    csv = ensure_synthetic_cohort(store.parent / "raw", n_patients, seed, 0.0)
    cases = read_manifest(Path(csv), genes=GENES, source="synthetic")
    build_crop_store(cases, store, {}, n_jobs=1, progress=False)
    return store
