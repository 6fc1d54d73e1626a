"""Benchmark: batched device augmentation (SSLAugment) vs lightly's per-image SimCLRTransform.

Same images (``--n`` random HU crops, ``--res``²), this CPU. Lightly's path is what a per-image
pipeline costs: PIL images → ``SimCLRTransform(input_size=res)`` (two views each) in DataLoader
workers (``--workers``). Ours: the pre-loaded HU tensor → :class:`SSLAugment` on whole batches in
the main process (as ``on_after_batch_transfer`` runs it). Reported: augmented images/s (two views
= two images per crop) and the ratio (target ≥ 5×).

    .venv/bin/python benchmarks/augment.py [--n 2048] [--res 64] [--batch 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from crc_lightning.data.ssl import SSLAugment


class PILViews(Dataset):
    def __init__(self, images: list[Image.Image], transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i])


def lightly_rate(hu: np.ndarray, res: int, batch: int, workers: int) -> float:
    from lightly.transforms import SimCLRTransform

    grey = np.clip((hu + 160.0) / 400.0 * 255.0, 0, 255).astype(np.uint8)
    images = [Image.fromarray(g) for g in grey]
    loader = DataLoader(
        PILViews(images, SimCLRTransform(input_size=res)),
        batch_size=batch,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    for _ in loader:  # warm-up: worker start-up is not counted
        break
    t = time.perf_counter()
    n = 0
    for views in loader:
        n += sum(len(v) for v in views)
    return n / (time.perf_counter() - t)


def batched_rate(hu: np.ndarray, res: int, batch: int) -> float:
    x = torch.from_numpy(hu).float()[:, None]
    aug = SSLAugment(res, None, {"width": 400.0, "level": 40.0})  # conf/input/default.yaml
    aug(x[:batch])  # warm-up
    t = time.perf_counter()
    n = 0
    for i in range(0, len(x), batch):
        v0, v1 = aug(x[i : i + batch])
        n += len(v0) + len(v1)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)  # conf/pretrain.yaml batch_size
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    hu = (rng.normal(40, 80, size=(a.n, a.res, a.res))).astype(np.float32)
    ours = max(batched_rate(hu, a.res, a.batch) for _ in range(a.rounds))
    theirs = max(lightly_rate(hu, a.res, a.batch, a.workers) for _ in range(a.rounds))
    print(f"crops: {a.n} × {a.res}², threads: {torch.get_num_threads()}")
    print(f"lightly SimCLRTransform (PIL, {a.workers} workers): {theirs:9.1f} images/s")
    print(f"SSLAugment (batched, {a.batch}/batch, main process): {ours:9.1f} images/s")
    print(f"ratio: {ours / theirs:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
