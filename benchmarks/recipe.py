"""Benchmark: choose the training recipe on inner validation only (README "Training recipe").

One real ``python -m crc_lightning.run -m`` sweep on the synthetic cohort: a grid over the recipe
knobs — lr schedule (constant | cosine), BCE label smoothing (0 | 0.1), training sampling
(image | lesion) — for the random-init baseline (``variant=baseline model.backbone.weights=none``)
at res 32, each job a patient-grouped 3-fold cross-validation (``split=cv split.n_splits=3``),
repeated over seeds. Every other setting is the paper's (SGD lr 1e-3, momentum 0.9, weight decay
5e-4, batch 16, median balancing).

Selection uses **only** the inner-validation AUC: the sweep's ``selection.json``
(:class:`~crc_lightning.apps.callbacks.SweepSelectionCallback`, :func:`select_per_group`: a
setting's value = mean ``val/auc`` over its seeds, each the mean over its folds). The rule, fixed
before the run: a setting replaces the paper's as the default only if its paired val-AUC gain over
the paper's setting, over the folds × seeds validation sets, is positive with mean > 2 standard
errors. The pooled out-of-fold *test* lesion-level AUC is printed for information only; it played
no part in the choice.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe.py [--root /tmp/crc_recipe] \\
        [--seeds 0] [--epochs 4] [--folds 3] [--res 32] [--labels three]

Jobs resume: a second call with the same settings only prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

GRID = {
    "model.lr_schedule.name": ("constant", "cosine"),
    "model.label_smoothing": ("0.0", "0.1"),
    "datamodule.sampling": ("image", "lesion"),
}
PAPER = {"model.lr_schedule.name": "constant", "model.label_smoothing": "0.0",
         "datamodule.sampling": "image"}  # fmt: skip


def _setting(overrides: list[str]) -> dict[str, str]:
    """The grid knobs of a job's overrides; a knob at the paper's value may be left out by the
    selection (it lists only the overrides that tell settings apart), so fill the paper's in."""
    own = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in GRID)
    return {k: own.get(k, PAPER[k]) for k in GRID}


def _label(s: dict[str, str]) -> str:
    return (f"{s['model.lr_schedule.name']:<8} ls={float(s['model.label_smoothing']):.1f} "
            f"{s['datamodule.sampling']:<6}")  # fmt: skip


def _fold_vals(job: Path) -> dict[tuple[int, int], float]:
    m = json.loads((job / "metrics.json").read_text())
    return {(int(m["seed"]), int(f["fold"])): f["val"]["auc"] for f in m["folds"]
            if f["val"]["auc"] is not None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/crc_recipe")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--labels", default="three", choices=["three", "five"])
    ap.add_argument("--trainer", default="cpu")
    a = ap.parse_args()
    root = Path(a.root).resolve()
    sweep = root / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    grid = [f"{k}={','.join(v)}" for k, v in GRID.items()]
    cmd = [sys.executable, "-m", "crc_lightning.run", "-m", f"paths.root_dir={root}",
           f"res={a.res}", f"labels={a.labels}", "variant=baseline",
           "model.backbone.weights=none", "split=cv", f"split.n_splits={a.folds}",
           f"trainer={a.trainer}", f"trainer.max_epochs={a.epochs}",
           "trainer.enable_progress_bar=false", "logger=none", "print_metrics=false",
           "~hydra.callbacks.sweep_report",  # the report tables are not needed here
           *grid, f"seed={a.seeds}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            print(line, flush=True)
    if proc.returncode != 0:
        sys.exit(f"the sweep failed:\n{proc.stderr[-3000:]}")
    seconds = time.monotonic() - started

    selection = json.loads((sweep / "selection.json").read_text())
    (group,) = selection["groups"]  # one (labels, variant, res) group
    rows = []
    for cand in group["settings"]:  # best first, by mean val/auc over seeds
        jobs = [sweep / j for j in cand["jobs"]]
        setting = _setting(cand["setting"])
        tests = [json.loads((j / "metrics.json").read_text())["metrics"]["lesion"] for j in jobs]
        vals: dict[tuple[int, int], float] = {}
        for j in jobs:
            vals.update(_fold_vals(j))
        rows.append({"setting": setting, "val": cand["value"], "n": cand["n_jobs"],
                     "folds": vals,
                     "test_auc": sum(t["auc"] for t in tests) / len(tests),
                     "test_ras": sum(t["per_class"][next(iter(t["per_class"]))]["auc"]
                                     for t in tests) / len(tests)})  # fmt: skip
    paper = next(r for r in rows if r["setting"] == PAPER)
    print(
        f"\nrecipe grid: synthetic cohort, variant=baseline (random init), res {a.res}, "
        f"labels={a.labels}, split=cv k={a.folds}, {a.epochs} epochs, seeds {a.seeds}; "
        f"{len(rows)} settings, sweep {seconds:.0f} s\n"
        "selected on inner-validation AUC only (mean over seeds of the fold mean); Δ = paired "
        "gain over the paper's setting over the folds × seeds val sets (mean ± s.e., wins)\n"
    )
    first_class = next(iter(json.loads(
        (sweep / group["settings"][0]["jobs"][0] / "metrics.json").read_text()
    )["metrics"]["lesion"]["per_class"]))  # fmt: skip
    print(
        f"| rank | lr schedule | label smoothing | sampling | val AUC | Δ val AUC vs paper "
        f"| wins | *test lesion AUC (info only)* | *test lesion {first_class} AUC (info)* |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
    verdicts = []
    for i, r in enumerate(rows, 1):
        keys = sorted(set(r["folds"]) & set(paper["folds"]))
        diffs = [r["folds"][k] - paper["folds"][k] for k in keys]
        mean = sum(diffs) / len(diffs) if diffs else 0.0
        sd = (math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
              if len(diffs) > 1 else 0.0)  # fmt: skip
        se = sd / math.sqrt(len(diffs)) if diffs else 0.0
        wins = sum(d > 0 for d in diffs)
        is_paper = r["setting"] == PAPER
        clear = not is_paper and mean > 0 and mean > 2 * se and se > 0
        verdicts.append((r, clear, mean))
        s = r["setting"]
        delta = "(paper)" if is_paper else f"{mean:+.3f} ± {se:.3f}"
        print(f"| {i} | {s['model.lr_schedule.name']} | {s['model.label_smoothing']} | "
              f"{s['datamodule.sampling']} | {r['val']:.3f} | {delta} | "
              f"{'' if is_paper else f'{wins}/{len(diffs)}'} | {r['test_auc']:.3f} | "
              f"{r['test_ras']:.3f} |")  # fmt: skip
    best = rows[0]
    clear_best = next((r for r, clear, _ in verdicts if clear), None)
    print(f"\nbest on validation: {_label(best['setting'])} (val AUC {best['val']:.3f}; paper's "
          f"{paper['val']:.3f})")  # fmt: skip
    if clear_best is None:
        print("no setting beats the paper's by more than 2 s.e. of the paired val-AUC gain: "
              "keep the paper's recipe as the default")  # fmt: skip
    else:
        print(f"clearly better than the paper's on validation: {_label(clear_best['setting'])}")


if __name__ == "__main__":
    main()
