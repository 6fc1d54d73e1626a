"""Benchmark: radiomics vs random-init deep vs SimCLR-init deep vs fusion on the same folds.

Runs the real ``python -m crc_lightning.run`` (one job per variant and seed, the default
cross-validation protocol: every patient tested once, out of fold) on the synthetic cohort, then
prints the lesion-level AUC of every class with the report's CI (Nadeau–Bengio corrected t over
the folds × seeds, :func:`crc_lightning.evaluation.report.summarize`):

* ``radiomics`` — ``variant=radiomics`` (IBSI features + tuned logistic regression);
* ``deep (random init)`` — ``variant=baseline model.backbone.weights=none``;
* ``deep (SimCLR init)`` — ``variant=oodp`` (pretrained first, briefly, on the synthetic OOD pool
  with ``python -m crc_lightning.pretrain`` when ``simclr_res<res>.ckpt`` is missing);
* ``fusion`` — ``variant=fusion`` (the OODp member + radiomics, ``w`` chosen on validation).

The defaults (res 64, 5 folds, one seed, few epochs, CPU) fit in about a quarter of an hour on two
cores; ``--seeds 0,1,2 --epochs 30 --pretrain-epochs 200 --trainer gpu`` for numbers worth quoting.
Jobs resume: a second call with the same settings only prints the table.

    .venv/bin/python benchmarks/compare_models.py [--root /tmp/crc_compare] [--res 64] \\
        [--folds 5] [--seeds 0] [--epochs 3] [--pretrain-epochs 5] [--labels three]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# arm: (job folder, overrides)
ARMS = {
    "radiomics": ("radiomics", ["variant=radiomics"]),
    "deep (random init)": ("baseline_none", ["variant=baseline", "model.backbone.weights=none"]),
    "deep (SimCLR init)": ("oodp", ["variant=oodp"]),
    "fusion": ("fusion", ["variant=fusion"]),
}


def _call(args: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/crc_compare")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--folds", type=int, default=5, help="cv folds per job (split.n_splits)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (repeats of the cv)")
    ap.add_argument("--epochs", type=int, default=3, help="deep training epochs per fold")
    ap.add_argument("--pretrain-epochs", type=int, default=5)
    ap.add_argument("--labels", default="three", choices=["three", "five"])
    ap.add_argument("--trainer", default="cpu")
    ap.add_argument("--n-patients", type=int, default=48, help="synthetic cohort size")
    a = ap.parse_args()
    root = Path(a.root).resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    common = [f"paths.root_dir={root}", f"res={a.res}", "logger=none",
              f"data.synthetic.n_patients={a.n_patients}"]  # fmt: skip

    weights = root / "weights" / f"simclr_res{a.res}.ckpt"
    if not weights.is_file():
        seconds = _call(["crc_lightning.pretrain", *common[:3], f"epochs={a.pretrain_epochs}",
                         "batch_size=64", "model.warmup_epochs=1", f"trainer={a.trainer}",
                         "trainer.enable_progress_bar=false",
                         f"hydra.run.dir={root / 'pretrain'}"], env)  # fmt: skip
        print(f"pretrained SimCLR ({a.pretrain_epochs} epochs) in {seconds:.0f} s", flush=True)

    jobs = root / "jobs"
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    for arm, (folder, overrides) in ARMS.items():
        for seed in seeds:
            out = jobs / folder / f"seed{seed}"
            seconds = _call(["crc_lightning.run", *common, *overrides, f"seed={seed}",
                             f"labels={a.labels}", f"split.n_splits={a.folds}",
                             f"trainer={a.trainer}", f"trainer.max_epochs={a.epochs}",
                             "trainer.enable_progress_bar=false", "radiomics.progress=false",
                             "print_metrics=false", f"hydra.run.dir={out}"], env)  # fmt: skip
            print(f"{arm:<20} seed {seed}: {seconds:6.0f} s", flush=True)

    from crc_lightning.evaluation.report import summarize
    from crc_lightning.evaluation.results import build_repeats, evaluate, find_job_dirs, load_job

    repeats = build_repeats(load_job(p) for p in find_job_dirs(jobs))
    classes = list(repeats[0].classes)
    names = {"radiomics": "radiomics", "baseline": "deep (random init)",
             "oodp": "deep (SimCLR init)", "fusion": "fusion"}  # fmt: skip
    cells: dict[str, dict[str, str]] = {}
    for c in classes:
        ev = evaluate(repeats, levels=["lesion"], focus=c, with_calibration=False)
        s = summarize(ev, bootstrap=0)
        for _, r in s[s["metric"] == "auc"].iterrows():
            lo, hi = r["ci_low"], r["ci_high"]
            ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and lo == lo else ""
            cells.setdefault(names.get(r["variant"], r["variant"]), {})[c] = f"{r['mean']:.2f}{ci}"
    print(
        f"\nlesion-level AUC (mean over {len(seeds)} seed(s) of the pooled out-of-fold "
        f"predictions, 95 % corrected-t CI over {a.folds} folds × {len(seeds)} seed(s)); "
        f"synthetic cohort {a.n_patients} patients, res {a.res}, {a.epochs} epochs, "
        f"SimCLR {a.pretrain_epochs} epochs"
    )
    print("| model | " + " | ".join(classes) + " |")
    print("|---|" + "---|" * len(classes))
    for arm in ARMS:
        row = cells.get(arm, {})
        print(f"| {arm} | " + " | ".join(row.get(c, "–") for c in classes) + " |")


if __name__ == "__main__":
    main()
