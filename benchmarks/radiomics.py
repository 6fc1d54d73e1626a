"""Benchmark: radiomics features of a case next to just reading it.

The crop-store benchmark's synthetic 512×512×200 case (``benchmarks/preprocess.py``: NIfTI, 0.75 ×
0.75 × 2.5 mm, 6 spherical lesions of 6–25 mm radius) is timed, best of and median of
``--repeats`` (interleaved, so both see the same machine load):

  (a) read_image + read_mask only;
  (b) what the feature cache does per case (``cropstore.features._feature_case``): hash the
      inputs, load, lesion ids, PyRadiomics features of the 6 lesions with
      ``conf/radiomics/default.yaml``, write the case's parquet.

Also the cached path a sweep's later jobs take (the table read back and checked, no CT read).

Target: (b)/(a) ≤ 1.5. Then, on the loaded arrays, the feature step alone per setting (median):
the default; each feature class on its own; no resampling; coarser resampling; without shape —
with the ratio each would give, so what dominates and what gets closest are measured, not guessed.

    .venv/bin/python benchmarks/radiomics.py [--repeats 3] [--slices 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

# this file's name is the feature library's package name: take its folder off the import path so
# `import radiomics` finds PyRadiomics, and load the crop-store benchmark's case by file name
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("bench_preprocess", HERE / "preprocess.py")
_bench = sys.modules["bench_preprocess"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
SPACING, BenchCase, phantom = _bench.SPACING, _bench.BenchCase, _bench.phantom

from crc_lightning.cropstore.features import (  # noqa: E402
    _feature_case,
    _Job,
    build_feature_table,
    read_feature_table,
)
from crc_lightning.cropstore.format import feature_case_file  # noqa: E402
from crc_lightning.cropstore.writer import (  # noqa: E402
    build_crop_store,
    case_fingerprint,
    package_version,
)
from crc_lightning.io import Volume, read_image, read_mask, write_nifti  # noqa: E402
from crc_lightning.preprocessing.algorithm import PreprocessParams, lesion_boxes  # noqa: E402
from crc_lightning.preprocessing.radiomics import (  # noqa: E402
    FEATURE_CLASSES,
    RadiomicsParams,
    _radiomics,
    lesion_block,
    resample_lesion,
    scan_features,
    scan_label_map,
)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_of(fn, repeats: int) -> float:
    return float(np.median([timed(fn) for _ in range(repeats)]))


def bench_case(folder: Path, n_slices: int) -> BenchCase:
    """The crop-store benchmark's phantom written as NIfTI CT + mask, as a case."""
    arrays = dict(zip(("ct", "mask"), phantom(n_slices)))
    paths = {k: write_nifti(Volume(a, SPACING), folder / f"{k}.nii.gz") for k, a in arrays.items()}
    return BenchCase("bench", "bench", paths["ct"], (paths["mask"],))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default in (("--repeats", int, 3), ("--slices", int, 200)):
        ap.add_argument(flag, type=kind, default=default)
    ap.add_argument("--workdir", type=Path, default=None, help="folder for the temporary files")
    args = ap.parse_args()
    params = RadiomicsParams()  # = conf/radiomics/default.yaml (tests/models check they agree)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        case = bench_case(tmp, args.slices)
        img, msk = case.image, case.masks[0]

        def read_only() -> None:
            image = read_image(img)
            read_mask(msk, reference=image)

        preprocess = PreprocessParams()
        version = package_version()
        case_hash = case_fingerprint(case, preprocess, version)[2]
        job = _Job(tmp / "whole", "bench", params, preprocess, version)

        def whole() -> None:
            out = _feature_case(case, case_hash, job)
            assert out.error is None and out.computed, out.error
            feature_case_file(job.store, job.key, case_hash).unlink()

        image, raw = case.load()
        feats = scan_features(image.array, raw.array, image.spacing, params)  # warm-up: imports
        read_only()
        t_read, t_whole = [], []
        for _ in range(args.repeats):
            t_read.append(timed(read_only))
            t_whole.append(timed(whole))
        a, b = min(t_read), min(t_whole)
        a_med, b_med = float(np.median(t_read)), float(np.median(t_whole))
        voxels = [int(f["n_voxels"]) for f in feats.values()]
        print("loaded machine (shared, timings noisy): compare ratios within this run")
        print(
            f"volume {image.shape} spacing {image.spacing} mm, {len(feats)} lesions, "
            f"{len(next(iter(feats.values())))} features each; lesion voxels at "
            f"{params.resample_mm} mm: {voxels}"
        )
        print(f"(a) read_image + read_mask           best {a:7.3f} s   median {a_med:7.3f} s")
        print(f"(b) hash + load + features + parquet best {b:7.3f} s   median {b_med:7.3f} s")
        print(
            f"ratio (b)/(a) = {b / a:.2f} best-of, {b_med / a_med:.2f} from the medians"
            "   (target <= 1.5)"
        )

        # a sweep's later jobs: the table is read back, checked against store.json, no CT read
        store = tmp / "store"
        build_crop_store([case], store, {}, progress=False)
        build_feature_table([case], store, params, progress=False)
        t_again = timed(lambda: build_feature_table([case], store, params, progress=False))
        t_cached = median_of(lambda: read_feature_table(store, params), args.repeats)
        print(
            f"cached: read_feature_table {1000 * t_cached:.1f} ms (each later job of a sweep); "
            f"build again with every case reused {t_again:.2f} s (hashes the inputs)"
        )

        # where the default's feature step goes: lesion ids, cutting + resampling, PyRadiomics
        t_ids, t_cut, t_lib = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            labels, box = scan_label_map(raw.array, "components", 26)
            t1 = time.perf_counter()
            cut = lib = 0.0
            for lesion, lbox in lesion_boxes(labels).items():
                t2 = time.perf_counter()
                block = lesion_block(
                    image.array,
                    labels,
                    lesion,
                    lbox,
                    image.spacing,
                    params.pad_mm,
                    [s.start for s in box],
                )
                im, ms, sp = resample_lesion(block[0], block[1], image.spacing, params)
                t3 = time.perf_counter()
                _radiomics(im, ms, sp, params)
                cut, lib = cut + t3 - t2, lib + time.perf_counter() - t3
            t_ids.append(t1 - t0)
            t_cut.append(cut)
            t_lib.append(lib)
        print(
            f"default feature step (medians): lesion ids {np.median(t_ids):.3f} s + cut & resample "
            f"{np.median(t_cut):.3f} s + PyRadiomics {np.median(t_lib):.3f} s"
        )

        def features(p: RadiomicsParams):
            return lambda: scan_features(image.array, raw.array, image.spacing, p)

        settings = {"default (7 classes, 1 mm B-spline)": params}
        settings |= {f"  {c} only": replace(params, feature_classes=(c,)) for c in FEATURE_CLASSES}
        no_shape = tuple(c for c in FEATURE_CLASSES if c != "shape")
        settings |= {
            "no resampling (native grid)": replace(params, resample_mm=None),
            "resampled to 2 mm": replace(params, resample_mm=(2.0, 2.0, 2.0)),
            "linear instead of B-spline": replace(params, interpolator="linear"),
            "without shape": replace(params, feature_classes=no_shape),
            "without shape, native grid": replace(
                params, feature_classes=no_shape, resample_mm=None
            ),
        }
        print(f"\nfeature step alone (median of {args.repeats}) and the ratio it gives with (a):")
        for name, p in settings.items():
            t = median_of(features(p), args.repeats)
            print(f"  {name:<36} {t:7.3f} s   ratio {(a_med + t) / a_med:5.2f}")


if __name__ == "__main__":
    main()
