"""Benchmark: is Algorithm 1 cheap next to just reading the CT?

A synthetic 512×512×200 case (body ellipse, liver-like region, a few spherical lesions) is written as
NIfTI (.nii.gz) and timed two ways, best of ``--repeats``:

  (a) read_image + read_mask only;
  (b) what the crop store does per case: hash the inputs, load, lesion components, Algorithm 1,
      write the case npz.

``--orientation RAS`` (the default: how nibabel / TotalSegmentator write NIfTI) stores the case with
its x and y axes reversed, so every read reorients it to the canonical LPS order (flipped views);
``LPS`` stores it in canonical order already. Target: (b)/(a) ≤ 1.15. Also reports the peak extra memory of the Algorithm 1 step (numpy allocations
via tracemalloc) relative to one float32 volume: Algorithm 1 works inside each lesion's box, so it
must stay near the one label map it allocates, whatever the number of lesions.

    .venv/bin/python benchmarks/preprocess.py [--repeats 3] [--slices 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crc_lightning.cropstore.writer import (
    _run_case,
    _write_case_npz,
    case_fingerprint,
    package_version,
)
from crc_lightning.io import Volume, read_image, read_mask, write_nifti
from crc_lightning.io.lesions import lesion_labels_in_box
from crc_lightning.preprocessing.algorithm import PreprocessParams, preprocess_volume

SPACING = (2.5, 0.75, 0.75)  # (sz, sy, sx) mm


@dataclass
class BenchCase:
    """The Case interface (crc_lightning.io.cases) reduced to what the store needs."""

    case_id: str
    patient_id: str
    image: Path
    masks: tuple[Path, ...]
    lesions: dict | None = None
    source: str = "bench"
    mask_rule: str = "single"
    lesion_rule: str = "components"

    def load(self, options=None) -> tuple[Volume, Volume]:
        image = read_image(self.image, options)
        return image, read_mask(self.masks[0], reference=image, options=options)


def phantom(n_slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (HU, int16 values in float32) and a binary mask with 6 spherical lesions."""
    rng = np.random.default_rng(seed)
    z, y, x = n_slices, 512, 512
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - 256) / 200.0) ** 2 + ((xx - 256) / 240.0) ** 2 <= 1
    liver = ((yy - 230) / 90.0) ** 2 + ((xx - 180) / 110.0) ** 2 <= 1
    plane = np.full((y, x), -1000, np.int16)
    plane[body] = 30
    plane[liver] = 60
    hu = np.broadcast_to(plane, (z, y, x)).astype(np.float32)
    hu += rng.normal(0, 12, size=hu.shape).astype(np.float32)
    mask = np.zeros((z, y, x), np.uint8)
    zz = np.arange(z)[:, None, None]
    for _ in range(6):
        cz = rng.integers(10, z - 10)
        cy, cx = rng.integers(170, 290), rng.integers(110, 250)
        r = rng.uniform(6, 25)  # mm
        box = (
            slice(max(int(cz - r / SPACING[0]) - 1, 0), int(cz + r / SPACING[0]) + 2),
            slice(int(cy - r / SPACING[1]) - 1, int(cy + r / SPACING[1]) + 2),
            slice(int(cx - r / SPACING[2]) - 1, int(cx + r / SPACING[2]) + 2),
        )
        d2 = (
            ((zz[box[0]] - cz) * SPACING[0]) ** 2
            + ((yy[box[1]] - cy) * SPACING[1]) ** 2
            + ((xx[:, box[2]] - cx) * SPACING[2]) ** 2
        )
        sphere = d2 <= r * r
        mask[box][sphere] = 1
        hu[box][sphere] = 90.0 + rng.normal(0, 12, size=int(sphere.sum()))
    return np.rint(hu).astype(np.float32), mask


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def median_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--orientation", choices=("RAS", "LPS"), default="RAS")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        hu, mask = phantom(args.slices)
        if args.orientation == "RAS":  # the same anatomy with x and y stored reversed
            ras = np.diag([-1.0, -1.0, 1.0])
            origin = ((hu.shape[2] - 1) * SPACING[2], (hu.shape[1] - 1) * SPACING[1], 0.0)
            hu, mask = hu[:, ::-1, ::-1], mask[:, ::-1, ::-1]
            grid = {"origin": origin, "direction": ras}
        else:
            grid = {}
        img = write_nifti(Volume(hu, SPACING, **grid), tmp / "ct.nii.gz")
        msk = write_nifti(Volume(mask, SPACING, **grid), tmp / "mask.nii.gz")
        del hu, mask
        case = BenchCase("bench", "bench", img, (msk,))
        params = PreprocessParams()
        cases_dir = tmp / "cases"
        cases_dir.mkdir()
        version = package_version()

        def read_only() -> None:
            image = read_image(img)
            read_mask(msk, reference=image)

        def whole() -> None:
            out = _run_case(case, params, cases_dir, version, reuse=False)
            assert out.error is None, out.error

        # interleave so both see the same cache / load conditions
        read_only()
        t_read, t_whole = [], []
        for _ in range(args.repeats):
            t_read.append(best_of(read_only, 1))
            t_whole.append(best_of(whole, 1))
        a, b = min(t_read), min(t_whole)

        image, raw = case.load()

        def algorithm() -> tuple[list, list]:
            labels, box = lesion_labels_in_box(raw.array, case.lesion_rule, params.connectivity)
            offset = tuple(b.start for b in box)
            return preprocess_volume(image.array, labels, image.spacing[1:], params, offset)

        def write() -> None:
            crops, _ = algorithm()
            arrays = {f"l{c.lesion}_z{c.slice}": c.array for c in crops}
            _write_case_npz(cases_dir / "bench.npz", arrays, {"crops": len(crops)})

        t_hash = median_of(lambda: case_fingerprint(case, params, version), args.repeats)
        t_alg = median_of(algorithm, args.repeats)
        t_write = median_of(write, args.repeats) - t_alg
        tracemalloc.start()
        crops, stats = algorithm()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

        npz = next(p for p in cases_dir.glob("*.npz") if p.name != "bench.npz")
        print(
            f"volume {image.shape} spacing {image.spacing} mm, {len(stats)} lesions, {len(crops)} crops"
        )
        print(
            f"stored as {image.source_orientation}, read as {image.orientation} "
            f"(image array C-contiguous: {image.array.flags.c_contiguous})"
        )
        print(
            f"inputs: {img.stat().st_size / 2**20:.1f} MiB + {msk.stat().st_size / 2**20:.1f} MiB; case npz {npz.stat().st_size / 2**20:.2f} MiB"
        )
        print(f"(a) read_image + read_mask            {a:7.3f} s  (best of {args.repeats})")
        print(f"(b) hash + load + Algorithm 1 + npz   {b:7.3f} s  (best of {args.repeats})")
        extra = t_hash + t_alg + t_write
        print(
            f"    beyond reading (medians): hash {t_hash:.3f} + labels & Algorithm 1 {t_alg:.3f}"
            f" + npz {t_write:.3f} = {extra:.3f} s"
        )
        paired = sorted(w / r for r, w in zip(t_read, t_whole))
        print(
            f"ratio (b)/(a) = {b / a:.3f} best-of   {paired[len(paired) // 2]:.3f} median of paired "
            "runs   (target <= 1.15)"
        )
        a_med = float(np.median(t_read))
        print(f"ratio from the medians: ((a) + extra) / (a) = {(a_med + extra) / a_med:.3f}")
        print(
            f"Algorithm 1 peak numpy allocation: {peak / 2**20:.1f} MiB = "
            f"{peak / image.array.nbytes:.3f} × one volume ({image.array.nbytes / 2**20:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
