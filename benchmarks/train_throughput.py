"""Benchmark: classifier training images/s per resolution on one device, and the projected wall time
of ``experiment=paper_grid`` (run by ``benchmarks/gpu_check.sh``; any device).

For each ``--res`` and attention off/on (the baseline/oodp and *_sa variants), one Lightning fit
of the real configuration (``conf/run.yaml``: EfficientNet-B0, batch 16, median-balanced training
set, validation every epoch) on ``--store`` for ``--epochs`` epochs; the first epoch is warm-up
(cuDNN autotuning, allocator, page cache) and left out. Reports training images/s (training
batches only) and the seconds of a whole epoch (training + validation).

Projection: ``experiment=paper_grid`` is 120 jobs = 3 res × 40 (4 variants × 2 label sets × 5
seeds), half of them with attention; each job at most ``max_epochs`` (100) epochs — early stopping
(patience 10) usually ends it sooner, so this is an upper bound — plus the measured start-up of a
job (``--job-overhead``, seconds; gpu_check.sh measures it from its 2-job sweep). One device, jobs
one after another; divide by the number of GPUs a SLURM sweep runs at once. The epoch time is the
one of ``--store`` (the synthetic cohort unless given): scale by your cohort's crops.

    .venv/bin/python benchmarks/train_throughput.py --store DIR [--trainer gpu] [--res 32,64,128]
        [--epochs 3] [--num-workers 4] [--max-batches 0] [--job-overhead 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import compose_run  # benchmarks/memory.py

GRID_JOBS_PER_RES_AND_ATTENTION = 20  # 2 variants × 2 label sets × 5 seeds
MAX_EPOCHS = 100  # conf/trainer/default.yaml


def measure(store: Path, trainer: str, res: int, attention: bool, epochs: int, workers: int,
            max_batches: int) -> dict:  # fmt: skip
    import lightning as L
    import torch

    from crc_lightning.apps._hydra import instantiate

    L.seed_everything(0, workers=True)
    overrides = [f"res={res}", f"trainer={trainer}", f"model.attention={str(attention).lower()}",
                 f"datamodule.num_workers={workers}", f"trainer.max_epochs={epochs}",
                 "trainer.enable_progress_bar=false", "++trainer.enable_checkpointing=false"]  # fmt: skip
    if max_batches:
        overrides += [f"trainer.limit_train_batches={max_batches}",
                      f"trainer.limit_val_batches={max_batches}"]  # fmt: skip

    class Meter(L.Callback):
        def __init__(self) -> None:
            self.rows: list[list[float]] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.rows.append([time.perf_counter(), 0.0, 0.0, 0])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.rows[-1][3] += int(batch["image"].shape[0])

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            if self.rows and not self.rows[-1][1]:
                self._sync()
                self.rows[-1][1] = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self._sync()
            self.rows[-1][2] = time.perf_counter()

        @staticmethod
        def _sync() -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(store, Path(tmp), *overrides)
        dm = instantiate(cfg.datamodule)
        model = instantiate(cfg.model, meta={})
        meter = Meter()
        trainer_obj = instantiate(cfg.trainer, callbacks=[meter], logger=False)
        trainer_obj.fit(model, datamodule=dm)
    timed = meter.rows[1:] or meter.rows  # the first epoch is warm-up
    train_s = sum((r[1] or r[2]) - r[0] for r in timed)
    images = sum(r[3] for r in timed)
    return {
        "res": res,
        "attention": attention,
        "images_per_s": images / train_s,
        "epoch_s": sum(r[2] - r[0] for r in timed) / len(timed),
        "train_images": int(timed[-1][3]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--trainer", default="gpu", help="conf/trainer: gpu | cpu")
    ap.add_argument("--res", default="32,64,128")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--max-batches", type=int, default=0, help="0 = whole epochs")
    ap.add_argument("--job-overhead", type=float, default=0.0, help="seconds per job")
    a = ap.parse_args()
    rows = []
    print(f"trainer={a.trainer}, batch 16, {a.epochs} epochs (first left out), "
          f"num_workers {a.num_workers}, store {a.store}")  # fmt: skip
    print(f"{'res':>4} {'attention':>9} {'train img/s':>11} {'epoch s':>8} {'train images':>12}")
    for res in (int(r) for r in a.res.split(",")):
        for attention in (False, True):
            r = measure(a.store, a.trainer, res, attention, a.epochs, a.num_workers,
                        a.max_batches)  # fmt: skip
            rows.append(r)
            print(f"{res:>4} {attention!s:>9} {r['images_per_s']:>11.1f} {r['epoch_s']:>8.2f} "
                  f"{r['train_images']:>12}", flush=True)  # fmt: skip
    seconds = sum(
        GRID_JOBS_PER_RES_AND_ATTENTION * (MAX_EPOCHS * r["epoch_s"] + a.job_overhead) for r in rows
    )
    jobs = GRID_JOBS_PER_RES_AND_ATTENTION * len(rows)
    print(f"projected experiment=paper_grid ({jobs} jobs on this store, ≤ {MAX_EPOCHS} epochs "
          f"each, {a.job_overhead:.0f} s start-up per job): ≤ {seconds / 3600:.2f} h on one "
          f"device, one job after another")  # fmt: skip


if __name__ == "__main__":
    main()
