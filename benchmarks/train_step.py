"""Benchmark: what does the Lightning training loop cost over a bare PyTorch loop?

Same model (:class:`MutationClassifier`, EfficientNet-B0, 1 channel, ``weights=none``), same
optimizer (the paper's SGD), same in-memory data (random tensors, dict batches of 16 at res 64
through the same ``DataLoader``), same number of optimizer steps. Only steady-state steps are timed:
the first ``--warmup`` steps (allocator, oneDNN kernel selection) are excluded on both paths, and so
are Trainer setup/teardown. The paths alternate for ``--rounds`` rounds; the best round counts.

The Lightning path is configured lean, as a run can be: no progress bar, no logger, no checkpoint,
no model summary, no validation. Target: Lightning images/s ≥ 0.95 × bare images/s.

    .venv/bin/python benchmarks/train_step.py [--steps 20] [--warmup 5] [--rounds 3] [--res 64]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from crc_lightning.models.classifier import MutationClassifier

CLASSES = ["RAS", "PIK3CA_BRAF", "OTHER"]


class RandomBatches(Dataset):
    """``n`` fixed random images + multi-label targets, as the datamodule's dict samples."""

    def __init__(self, n: int, res: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, res, res, generator=g)
        self.y = (torch.rand(n, len(CLASSES), generator=g) > 0.5).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "target": self.y[i], "index": torch.tensor(i)}


def make_model(res: int) -> MutationClassifier:
    torch.manual_seed(0)
    opt = partial(torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    return MutationClassifier(CLASSES, backbone={"weights": "none"}, res=res, optimizer=opt)


def bare_loop(loader: DataLoader, res: int, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` optimizer steps after ``warmup`` steps, plain PyTorch."""
    model = make_model(res)
    model.train()
    opt = model.configure_optimizers()
    it = iter(loader)
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = next(it)
        loss = model.criterion(model(batch["image"]), batch["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


class StepTimer(L.Callback):
    """Time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0 = self.t1 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.t1 = time.perf_counter()


def lightning_loop(loader: DataLoader, res: int, warmup: int, steps: int) -> float:
    model = make_model(res)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=loader)
    return timer.t1 - timer.t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    n = args.batch * (args.warmup + args.steps)
    loader = DataLoader(RandomBatches(n, args.res), batch_size=args.batch, shuffle=False)
    images = args.batch * args.steps
    best = {"bare": float("inf"), "lightning": float("inf")}
    for r in range(args.rounds):
        for name, fn in (("bare", bare_loop), ("lightning", lightning_loop)):
            s = fn(loader, args.res, args.warmup, args.steps)
            best[name] = min(best[name], s)
            print(f"round {r}: {name:<9} {images / s:7.1f} images/s ({s:.2f} s)")
    bare, light = images / best["bare"], images / best["lightning"]
    print(
        f"\nEfficientNet-B0 1ch, batch {args.batch}, res {args.res}, {args.steps} steps "
        f"(+{args.warmup} warm-up), torch threads {torch.get_num_threads()}, best of {args.rounds}"
    )
    print(f"bare PyTorch : {bare:7.1f} images/s")
    print(f"Lightning    : {light:7.1f} images/s")
    print(f"ratio        : {light / bare:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
