"""Benchmark: seconds per 512×512×200 patient for ``python -m crc_lightning.predict`` on this CPU.

A phantom patient (``crc_lightning.data.synthetic.make_phantom_case``: abdomen, liver, 3 lesions) is
written as NIfTI (.nii.gz image + instance mask); a randomly initialised classifier is exported with
``export_model`` and loaded back with ``load_model`` (timing does not depend on the weights). Each
repeat times, for that one patient:

  load        read_image + read_mask (grid checked) — decompression dominates;
  preprocess  lesion labels + Algorithm 1 (``preprocess_scan``) + window/resize/normalise (``model_inputs``);
  model       the classifier's forward pass over every included slice (sigmoid probabilities);
  saliency    one Grad-CAM / attention map + PNG per lesion (``saliency=true``, the default).

Best of ``--repeats``; also the one-off checkpoint load.

    .venv/bin/python benchmarks/predict.py [--repeats 2] [--slices 200] [--size 512] [--res 64]
        [--attention] [--threads N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from crc_lightning.inference.predictor import _probabilities, _write_saliency, model_inputs
from crc_lightning.io import read_image, read_mask, write_nifti
from crc_lightning.models.checkpoint import export_model, load_model
from crc_lightning.models.classifier import MutationClassifier
from crc_lightning.preprocessing.algorithm import PreprocessParams, preprocess_scan
from crc_lightning.sources.synthetic import make_phantom_case

CLASSES = ["KRAS", "NRAS", "BRAF", "PIK3CA", "OTHER"]


def make_inputs(workdir: Path, slices: int, size: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    image, mask = make_phantom_case(
        rng, {"KRAS": 1}, shape=(slices, size, size), spacing=(1.5, 0.75, 0.75), n_lesions=3
    )
    return (
        write_nifti(image, workdir / "ct.nii.gz"),
        write_nifti(mask, workdir / "lesions.nii.gz"),
    )


def make_checkpoint(workdir: Path, res: int, attention: bool) -> Path:
    torch.manual_seed(0)
    meta = {
        "variant": "bench",
        "window": {"width": 400.0, "level": 40.0},
        "normalize": {"mean": 0.449, "std": 0.226},
        "preprocess": PreprocessParams().to_dict(),
    }
    model = MutationClassifier(
        CLASSES, backbone={"weights": "none"}, attention=attention, res=res, meta=meta
    )
    return export_model(model, workdir / "model.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--attention", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        image_path, mask_path = make_inputs(work, args.slices, args.size)
        print(f"phantom {args.size}×{args.size}×{args.slices} written in {time.perf_counter() - t:.1f} s "
              f"({image_path.stat().st_size / 2**20:.0f} MiB .nii.gz)")  # fmt: skip
        ckpt = make_checkpoint(work, args.res, args.attention)
        t = time.perf_counter()
        model, card = load_model(ckpt)
        t_ckpt = time.perf_counter() - t

        best: dict[str, float] = {}
        n_crops = n_lesions = 0
        for _ in range(args.repeats):
            times = {}
            t = time.perf_counter()
            image = read_image(image_path)
            mask = read_mask(mask_path, reference=image)
            times["load"] = time.perf_counter() - t
            t = time.perf_counter()
            params = PreprocessParams.from_config(card["preprocess"])
            crops, stats = preprocess_scan(image.array, mask.array, image.spacing, params)
            x = model_inputs(crops, card)
            times["preprocess"] = time.perf_counter() - t
            del image, mask
            t = time.perf_counter()
            prob = _probabilities(model, x, 64)
            times["model"] = time.perf_counter() - t
            slices = pd.DataFrame(
                {
                    "patient_id": "bench",
                    "lesion": [c.lesion for c in crops],
                    "slice": [c.slice for c in crops],
                    "area_mm2": [c.area_mm2 for c in crops],
                }
            )
            pcols = [f"p_{c}" for c in CLASSES]
            for i, col in enumerate(pcols):
                slices[col] = prob[:, i]
            lesions = slices.groupby(["patient_id", "lesion"], as_index=False).agg(
                n_slices=("slice", "size"), **{c: (c, "mean") for c in pcols}
            )
            t = time.perf_counter()
            _write_saliency(model, card, crops, x, lesions, slices, work / "saliency", None)
            times["saliency"] = time.perf_counter() - t
            n_crops, n_lesions = len(crops), len(stats)
            for k, v in times.items():
                best[k] = min(best.get(k, float("inf")), v)

    total = sum(best.values())
    head = "+SA (attention map)" if args.attention else "plain (Grad-CAM)"
    print(
        f"model efficientnet_b0 {head}, res {args.res}, torch threads {torch.get_num_threads()}; "
        f"{n_lesions} lesions, {n_crops} included slices"
    )
    print(f"checkpoint load (once): {t_ckpt:.2f} s")
    print(f"{'step':<12}{'seconds':>9}{'share':>8}")
    for k, v in best.items():
        print(f"{k:<12}{v:>9.2f}{v / total:>8.0%}")
    print(f"{'total':<12}{total:>9.2f}   per patient (best of {args.repeats})")
    print(f"without saliency: {total - best['saliency']:.2f} s per patient")


if __name__ == "__main__":
    main()
