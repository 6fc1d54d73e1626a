"""Benchmark: preprocessing throughput over cores (``preprocess n_jobs=k``), and LiTS on 16 cores.

A synthetic cohort of LiTS-like scans — 512×512 in-plane, ~400 slices (``--slices`` ± 2 %), int16
HU in uncompressed ``.nii`` as LiTS ships them, a binary mask of 6 spherical lesions each
(``phantom`` of ``benchmarks/preprocess.py``) — is preprocessed into a fresh crop store with
``n_jobs`` = 1, 2, … (joblib processes, as ``python -m crc_lightning.preprocess n_jobs=k``): hash,
read, Algorithm 1, case file, index. The inputs are read once before timing, so every run reads
them from the page cache alike. Deterministic: the volumes follow ``--seed``.

Reports cases/s per ``n_jobs`` and the parallel efficiency ``rate(k) / (k · rate(1))`` (target
≥ 0.85 at 2 workers on 2 cores), and projects 131 LiTS volumes on 16 cores:
``131 · (LiTS slices / benchmark slices) / (16 · rate(1) · efficiency)``, taking the largest
measured ``n_jobs``' efficiency as the 16-core one (an assumption: memory bandwidth and disk may
lower it; a shard per node with ``preprocess -m shard=…`` scales across nodes instead).

    .venv/bin/python benchmarks/preprocess_scaling.py [--cases 4] [--slices 400] [--jobs 1,2]
        [--repeats 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import SPACING, BenchCase, phantom  # benchmarks/preprocess.py

from crc_lightning.cropstore.writer import build_crop_store
from crc_lightning.io import Volume, write_nifti

LITS_VOLUMES = 131
# LiTS17 training set: 131 volumes, 58 638 slices (Bilic et al., Med. Image Anal. 2023) ≈ 448 each
LITS_MEAN_SLICES = 58638 / 131


def make_cohort(folder: Path, n: int, slices: int, seed: int) -> list[BenchCase]:
    """``n`` LiTS-like cases (written once; reused when ``folder`` already has them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        z = round(slices * rng.uniform(0.98, 1.02))
        img, msk = folder / f"case{i:03d}_{z}_ct.nii", folder / f"case{i:03d}_{z}_mask.nii"
        if not (img.is_file() and msk.is_file()):
            hu, mask = phantom(z, seed=seed + i)
            write_nifti(Volume(hu.astype(np.int16), SPACING), img)
            write_nifti(Volume(mask, SPACING), msk)
            del hu, mask
        cases.append(BenchCase(f"case{i:03d}", f"P{i:03d}", img, (msk,)))
    return cases


def warm(cases: list[BenchCase]) -> int:
    """Read every input once (page cache), returns the bytes read."""
    total = 0
    for case in cases:
        for path in (case.image, *case.masks):
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--jobs", default="1,2", help="n_jobs values (the first should be 1)")
    ap.add_argument("--repeats", type=int, default=1, help="best of this many runs per n_jobs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the cohort here (reused)")
    a = ap.parse_args()
    jobs = [int(j) for j in a.jobs.split(",")]
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="crc-scaling-"))
    t0 = time.perf_counter()
    cases = make_cohort(workdir / "cohort", a.cases, a.slices, a.seed)
    gen = time.perf_counter() - t0
    nbytes = warm(cases)
    mean_slices = float(np.mean([int(c.image.name.split("_")[1]) for c in cases]))
    print(f"{a.cases} cases of 512×512×{mean_slices:.0f} (int16 .nii, {nbytes / 2**30:.2f} GiB in "
          f"all; made in {gen:.0f} s), {os.cpu_count()} cores here")  # fmt: skip
    print(f"{'n_jobs':>6} {'seconds':>8} {'cases/s':>8} {'speed-up':>8} {'efficiency':>10}")
    rates: dict[int, float] = {}
    for k in jobs:
        best = float("inf")
        for _ in range(a.repeats):
            store = workdir / f"store_{k}"
            shutil.rmtree(store, ignore_errors=True)
            t0 = time.perf_counter()
            summary = build_crop_store(cases, store, {}, n_jobs=k, progress=False)
            best = min(best, time.perf_counter() - t0)
            assert summary["computed"] == len(cases), summary
        rates[k] = len(cases) / best
        speedup = rates[k] / rates[jobs[0]]
        print(f"{k:>6} {best:>8.1f} {rates[k]:>8.3f} {speedup:>8.2f} {speedup / k:>10.2f}",
              flush=True)  # fmt: skip
    k_max = max(jobs)
    eff = rates[k_max] / (k_max * rates[jobs[0]])
    if 2 in rates:
        print(f"parallel efficiency at 2 workers: {rates[2] / (2 * rates[jobs[0]]):.2f} "
              "(target ≥ 0.85 on 2 idle cores)")  # fmt: skip
    per_case = 1.0 / rates[jobs[0]] * (LITS_MEAN_SLICES / mean_slices)
    hours = LITS_VOLUMES * per_case / (16 * eff) / 3600
    print(f"projection, {LITS_VOLUMES} LiTS volumes (≈{LITS_MEAN_SLICES:.0f} slices each) on 16 "
          f"cores at efficiency {eff:.2f}: {hours * 60:.1f} min "
          f"({per_case:.1f} s per volume on one core)")  # fmt: skip
    if a.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
