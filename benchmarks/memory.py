"""Benchmark: does the classifier's training memory grow with the cohort? (datamodule.cache)

The default synthetic cohort (48 patients, built once with the real preprocessing) is tiled into
crop stores of 1×, 4× and 16× its patients (copies of its case files under new patient ids, so a
16× store has 16× the files, crops and index rows). For each store and each ``datamodule.cache``
mode (``memory``: every crop pre-loaded; ``lazy``: read from the case files per batch) one fresh
process runs ONE training epoch of the real configuration (``conf/run.yaml``: EfficientNet-B0,
``res=128``, ``trainer=cpu``, median-balanced training set, batch 16, no validation) and reports
its peak resident memory (``ru_maxrss``) and the training images/s of that epoch (data loading
included: the lazy mode reads, windows and resizes every crop it trains on) — over the whole
epoch, and in the steady state (batch size / median batch-to-batch time after 2 warm-up batches,
robust to a shared machine) — plus the median time the loop waited for a batch (``data ms``).

Targets: the lazy mode's peak RSS grows by less than 1.5× from 1× to 16×, and its images/s stay
≥ 0.9× the memory mode's. Runs alternate the modes per store so both see the same machine load.

    .venv/bin/python benchmarks/memory.py [--scales 1,4,16] [--res 128] [--max-batches 0]
        [--num-workers 0] [--workdir DIR]

``--max-batches N`` stops each epoch after N batches (quick checks; the peak of the memory mode is
reached before the first batch, the lazy mode's after a few).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np

MODES = ("memory", "lazy")
COHORT = 48  # conf/data/synthetic.yaml: the default cohort
BATCH = 16  # conf/datamodule/default.yaml
WARMUP_BATCHES = 2  # left out of the steady-state figures (allocator, oneDNN kernel choice)


def base_store(workdir: Path) -> Path:
    """The default synthetic cohort's crop store, built once under ``workdir``."""
    from crc_lightning.cropstore.format import is_store
    from crc_lightning.cropstore.writer import build_crop_store
    from crc_lightning.sources.manifest import read_manifest
    from crc_lightning.sources.synthetic import ensure_synthetic_cohort

    store = workdir / "store_x1"
    if not is_store(store):
        csv = ensure_synthetic_cohort(workdir / "raw", COHORT, 2024, 0.25)
        build_crop_store(read_manifest(Path(csv), source="synthetic"), store, {}, progress=False)
    return store


def tiled_store(base: Path, k: int, workdir: Path) -> Path:
    """``base`` × ``k``: every patient ``k`` times (ids ``<id>x<j>``), each copy with its own case
    files, index rows and crop ids."""
    import pandas as pd

    from crc_lightning.cropstore.format import CASES_DIR, INDEX_FILE, META_FILE, is_store, read_meta
    from crc_lightning.io.files import write_atomic, write_json

    if k == 1:
        return base
    out = workdir / f"store_x{k}"
    if is_store(out):
        return out
    index = pd.read_parquet(base / INDEX_FILE)
    (out / CASES_DIR).mkdir(parents=True, exist_ok=True)
    frames = []
    for j in range(k):
        part = index.copy()
        pid = part["patient_id"].astype(str) + f"x{j:02d}"
        part["patient_id"] = pid
        part["lesion_uid"] = pid + "/" + part["lesion"].astype(str)
        part["crop_id"] = part["lesion_uid"] + "/" + part["slice"].astype(str)
        part["case_file"] = part["case_file"].astype(str).str.replace(".npz", f"_{j:02d}.npz")
        for src, dst in zip(index["case_file"].unique(), part["case_file"].unique()):
            shutil.copyfile(base / src, out / dst)
        frames.append(part)
    tiled = pd.concat(frames, ignore_index=True).astype(index.dtypes.to_dict())
    meta = read_meta(base)
    meta["summary"] = {**meta.get("summary", {}), "patients": COHORT * k, "crops": len(tiled)}
    write_atomic(out / INDEX_FILE, lambda f: tiled.to_parquet(f, index=False))
    write_json(out / META_FILE, meta)
    return out


def compose_run(store: Path, root: Path, *overrides: str):
    """``conf/run.yaml`` composed for a benchmark: ``store``, the random-init backbone, the
    explicit holdout split, no logger, every path under ``root``; then ``overrides``."""
    from hydra import compose, initialize_config_dir

    from crc_lightning.apps._hydra import CONF_DIR

    base = [
        f"data.store={store}", "model.backbone.weights=none", "split=holdout", "logger=none",
        f"paths.root_dir={root}", f"paths.output_dir={root / 'out'}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("run", overrides=[*base, *overrides])


def rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(store: Path, mode: str, res: int, max_batches: int, num_workers: int) -> dict:
    import torch

    from crc_lightning.apps._hydra import instantiate
    from crc_lightning.cropstore.reader import CropStore

    torch.set_flush_denormal(True)
    L.seed_everything(0, workers=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(Path(store), Path(tmp), f"res={res}", "trainer=cpu",
                          f"datamodule.cache={mode}", f"datamodule.num_workers={num_workers}")  # fmt: skip
        model = instantiate(cfg.model, meta={})
        dm = instantiate(cfg.datamodule)
        base = rss_mb()  # python + torch + model: what does not depend on the data
        t0 = time.perf_counter()
        dm.setup("fit")
        setup_s = time.perf_counter() - t0

        meter = Meter()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0,
            limit_train_batches=max_batches or 1.0, num_sanity_val_steps=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            deterministic=True, callbacks=[meter],
        )  # fmt: skip
        trainer.fit(model, datamodule=dm)
    epoch_s = meter.ends[-1] - meter.t0
    steady = np.diff(meter.ends)[WARMUP_BATCHES:]  # batch to batch, warm-up left out
    waits = (np.asarray(meter.starts[1:]) - np.asarray(meter.ends[:-1]))[WARMUP_BATCHES:]
    return {
        "mode": mode,
        "crops": len(CropStore(store)),
        "base_mb": round(base, 1),
        "peak_mb": round(rss_mb(), 1),
        "setup_s": round(setup_s, 2),
        "images": meter.images,
        "epoch_s": round(epoch_s, 2),
        "images_per_s": round(meter.images / epoch_s, 2),
        # steady state: batch size / median batch-to-batch time (robust to a shared machine)
        "steady_images_per_s": round(BATCH / float(np.median(steady)), 2) if len(steady) else None,
        "data_ms": round(1000 * float(np.median(waits)), 2) if len(waits) else None,
    }


class Meter(L.Callback):
    """Lightning callback: when each training batch starts (after it was loaded) and ends."""

    def __init__(self) -> None:
        self.t0, self.images = 0.0, 0
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.images += int(batch["image"].shape[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--max-batches", type=int, default=0, help="0 = the whole epoch")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the stores here (reused)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "STORE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, store = a.child
        print(json.dumps(run_child(Path(store), mode, a.res, a.max_batches, a.num_workers)))
        return

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="crc-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    scales = [int(s) for s in a.scales.split(",")]
    base = base_store(workdir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    print(f"res {a.res}, batch 16, EfficientNet-B0 (weights=none), trainer=cpu, "
          f"{torch_threads()} threads, num_workers {a.num_workers}, "
          f"{'whole epoch' if not a.max_batches else f'{a.max_batches} batches'}")  # fmt: skip
    print(f"{'scale':>5} {'crops':>6} {'mode':>6} {'base MB':>8} {'peak MB':>8} {'setup s':>8} "
          f"{'images':>7} {'epoch s':>8} {'img/s':>7} {'steady':>7} {'data ms':>8}")  # fmt: skip
    rows: dict[tuple[int, str], dict] = {}
    for k in scales:
        store = tiled_store(base, k, workdir)
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, str(store), "--res", str(a.res),
                   "--max-batches", str(a.max_batches), "--num-workers", str(a.num_workers)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"child {mode} x{k} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[k, mode] = r
            print(f"{k:>4}× {r['crops']:>6} {mode:>6} {r['base_mb']:>8.0f} {r['peak_mb']:>8.0f} "
                  f"{r['setup_s']:>8.2f} {r['images']:>7} {r['epoch_s']:>8.1f} "
                  f"{r['images_per_s']:>7.1f} {r['steady_images_per_s'] or 0:>7.1f} "
                  f"{r['data_ms'] or 0:>8.1f}", flush=True)  # fmt: skip
    lo, hi = min(scales), max(scales)
    for mode in MODES:
        growth = rows[hi, mode]["peak_mb"] / rows[lo, mode]["peak_mb"]
        target = " (target < 1.5)" if mode == "lazy" else ""
        print(f"{mode} peak RSS {hi}×/{lo}×: {growth:.2f}{target}")
    for k in scales:
        lazy, memory = rows[k, "lazy"], rows[k, "memory"]
        ratio = lazy["images_per_s"] / memory["images_per_s"]
        steady = (lazy["steady_images_per_s"] or 0) / (memory["steady_images_per_s"] or 1)
        print(f"lazy/memory images/s at {k}×: epoch {ratio:.2f}, steady state {steady:.2f} "
              f"(target ≥ 0.9); batch loading {lazy['data_ms']:.1f} vs {memory['data_ms']:.1f} ms")  # fmt: skip
    if a.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
