"""The report's "Reporting checklist" (TRIPOD+AI 2024, CLAIM 2024), filled from the run files.

What the job folders record is filled in (cohort counts and prevalence per split, how the splits
were made, balancing, model and training settings from ``.hydra/config.yaml``, software versions,
seeds, the calibration and decision-curve figures); what they cannot know (ethics, clinical
context, acquisition, reference standard, …) is listed as such, for the authors to complete.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.evaluation.aggregate import level_tables
from crc_lightning.evaluation.results import Evaluation, Repeat

__all__ = ["checklist_markdown", "job_settings"]

SOFTWARE = ("crc-lightning", "torch", "lightning", "timm", "numpy", "scipy", "pandas",
            "scikit-learn", "statsmodels", "matplotlib")  # fmt: skip
SETTINGS = {  # shown name: dotted key of the job's resolved config
    "backbone": "model.backbone.name",
    "init": "model.backbone.weights",
    "attention": "model.attention",
    "resolution": "res",
    "optimizer": "model.optimizer._target_",
    "lr": "model.optimizer.lr",
    "momentum": "model.optimizer.momentum",
    "weight decay": "model.optimizer.weight_decay",
    "scheduler": "model.scheduler",
    "batch size": "datamodule.batch_size",
    "max epochs": "trainer.max_epochs",
    "early stopping / selection": "callbacks",
    "balancing": "datamodule.balance",
    "augmentation": "datamodule.augment",
    "CT window": "input.window",
    "normalisation": "input.normalize",
}
NOT_IN_RUN_FILES = [
    "Ethics approval, consent or its waiver, data-protection basis (TRIPOD+AI 9; CLAIM 7)",
    "Clinical context and intended use: where in the care pathway, which decision, which users "
    "(TRIPOD+AI 3a–b; CLAIM 3–4)",
    "Data source and eligibility: centres, recruitment dates, inclusion/exclusion, the flow of "
    "patients (TRIPOD+AI 5–6, 20a; CLAIM 7–9, 33)",
    "Participant characteristics: age, sex, primary-tumour site, treatment before imaging "
    "(TRIPOD+AI 20b; CLAIM 34)",
    "Image acquisition: scanners, protocols, contrast phase, slice thickness (CLAIM 10–11)",
    "Annotation: who segmented the lesions, experience, software, inter-reader agreement "
    "(CLAIM 16–18)",
    "Reference standard: how, when and on which tissue mutation status was determined "
    "(TRIPOD+AI 7; CLAIM 15)",
    "Missing data and its handling (TRIPOD+AI 8c; CLAIM 13)",
    "Fairness and subgroups: performance across sites, scanners, demographic groups "
    "(TRIPOD+AI 14, 23)",
    "External validation on an independent cohort (TRIPOD+AI 12; CLAIM 32)",
    "Code, model and data availability; funding and conflicts of interest "
    "(TRIPOD+AI 18, 21; CLAIM 41–44)",
    "Patient and public involvement (TRIPOD+AI 19)",
]


def _config(job_dir: Path) -> dict[str, Any] | None:
    """The job's ``.hydra/config.yaml`` (interpolations resolved where they can be)."""
    from omegaconf import OmegaConf

    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.load(path)
    except Exception:  # an unreadable config only leaves the settings row empty
        return None
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _short(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):
        if "_target_" in v and len(v) > 1:
            v = {k: x for k, x in v.items() if k not in ("_partial_",)}
        return json.dumps(v, sort_keys=True, default=str)[:160]
    return str(v)


def job_settings(job_dirs: Sequence[Path]) -> dict[str, str]:
    """Setting → value over these jobs' configs ("a | b" when they differ, "–" when unrecorded)."""
    configs = [c for c in (_config(Path(d)) for d in job_dirs) if c is not None]
    out = {}
    for name, key in SETTINGS.items():
        vals = list(dict.fromkeys(_short(_get(c, key)) for c in configs)) if configs else ["–"]
        out[name] = " | ".join(vals)
    return out


def _prev(df: pd.DataFrame, classes: Sequence[str]) -> str:
    return ", ".join(f"{c} {df[c].mean():.2f}" for c in classes)


def _cohort_lines(rep: Repeat) -> list[str]:
    classes = list(rep.classes)
    t = level_tables(rep.test, classes)
    lines = [
        f"test (all folds pooled): {t['patient']['patient_id'].nunique()} patients, "
        f"{len(t['lesion'])} lesions, {len(t['image'])} rows; prevalence per patient: "
        f"{_prev(t['patient'], classes)}; per lesion: {_prev(t['lesion'], classes)}"
    ]
    if rep.val is not None:
        v = level_tables(rep.val, classes)
        lines.append(
            f"validation (all folds): {v['patient']['patient_id'].nunique()} patient-folds, "
            f"{len(v['lesion'])} lesions; prevalence per patient: {_prev(v['patient'], classes)}"
        )
    sizes = pd.DataFrame(rep.folds.values())
    if len(sizes):
        rng = {
            c: f"{int(sizes[c].min())}–{int(sizes[c].max())}"
            for c in sizes
            if sizes[c].notna().all()
        }
        lines.append(
            f"per fold ({len(sizes)} folds): "
            + ", ".join(f"{k.removeprefix('n_')} {v} patients" for k, v in rng.items())
        )
    if rep.protocol == "cv":
        pt = t["patient"]
        for f in sorted(rep.folds):
            held = set(pt.loc[pt["fold"] == f, "patient_id"])
            if rep.val is not None:
                vp = level_tables(rep.val[rep.val["fold"] == f], classes)["patient"]
                held |= set(vp["patient_id"])
            train = pt[~pt["patient_id"].isin(held)]
            if len(train):
                lines.append(
                    f"fold {f} training side: {len(train)} patients; {_prev(train, classes)}"
                )
                break  # one fold as an example; every fold is stratified the same way
    return lines


def _splits_text(ev: Evaluation) -> list[str]:
    out = []
    for rep in {r.group[4]: r for r in ev.repeats}.values():
        j = rep.jobs[0]
        strat = None
        if j.splits_file.is_file():
            try:
                strat = json.loads(j.splits_file.read_text(encoding="utf-8")).get("stratified_on")
            except (OSError, json.JSONDecodeError):
                strat = None
        split = j.raw.get("split") or {}
        k = split.get("n_splits") if rep.protocol != "holdout" else None
        out.append(
            f"`{rep.protocol}`: patient-grouped (no patient on two sides), iterative multi-label "
            f"stratification{' on ' + ', '.join(strat) if strat else ''}"
            + (f", k = {k} folds" if k else f", test {split.get('test_size', '?')} / val "
               f"{split.get('val_size', '?')} of the patients")
            + "; split files: `splits.json` in each job folder"
            + ("" if j.splits_file.is_file() else " (not written by these jobs)")
        )  # fmt: skip
    return out


def _versions() -> str:
    found = []
    for name in SOFTWARE:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return f"Python {platform.python_version()}; " + ", ".join(found)


def checklist_markdown(
    ev: Evaluation, summary: pd.DataFrame, figures: Sequence[tuple[str, Path]], ci: float = 0.95
) -> str:
    """The "Reporting checklist" section of report.md."""
    jobs = [j for r in ev.repeats for j in r.jobs]
    md = [
        "## Reporting checklist (TRIPOD+AI 2024 / CLAIM 2024)\n",
        "Filled from the run files; the items the run cannot know are listed at the end for the "
        "authors to complete.\n",
    ]
    md.append("**Participants and outcome per split** (first repeat of each label set):\n")
    for rep in {r.group[0]: r for r in ev.repeats}.values():
        md.append(f"- labels `{rep.group[0]}` (classes {', '.join(rep.classes)}):")
        md += [f"  - {line}" for line in _cohort_lines(rep)]
    data = sorted({json.dumps(j.raw.get("data"), sort_keys=True) for j in jobs})
    md.append(f"\n**Data** (metrics.json `data`): {'; '.join(data)}\n")
    md.append("**How the splits were made:**\n")
    md += [f"- {s}" for s in _splits_text(ev)]
    md.append("\n**Model and training settings** (from the jobs' `.hydra/config.yaml`):\n")
    settings = job_settings([j.path for j in jobs])
    md.append(_kv_table(settings))
    best = [f.get("best_epoch") for j in jobs for f in (j.raw.get("folds") or [j.raw])]
    best = [int(b) for b in best if b is not None]
    if best:
        md.append(
            f"\nBest epoch (selected on inner-validation loss/AUC): median {int(np.median(best))}, "
            f"range {min(best)}–{max(best)} over {len(best)} trainings.\n"
        )
    seeds = {}
    for r in ev.repeats:
        seeds.setdefault(f"{r.group[1]} {r.group[0]} {r.group[2]}px {r.group[4]}", []).append(
            r.seed
        )
    md.append("**Seeds** (one repeat each): " + "; ".join(
        f"{k}: {' '.join(map(str, sorted(v)))}" for k, v in sorted(seeds.items())) + "\n")  # fmt: skip
    versions = sorted(
        {str(j.raw.get("package_version")) for j in jobs if j.raw.get("package_version")}
    )
    hashes = sorted({str(j.raw.get("config_hash")) for j in jobs if j.raw.get("config_hash")})
    md.append(
        f"**Software:** jobs ran crc-lightning {', '.join(versions) or '(version not recorded)'}"
        f"{'; config hashes ' + ', '.join(h[:12] for h in hashes) if hashes else ''}. "
        f"Report made with {_versions()}.\n"
    )
    md.append(
        f"**Performance measures:** every table cell has a {ci:.0%} CI (Nadeau–Bengio corrected t "
        "over splits, or a patient bootstrap for a single hold-out repeat), the image-blind "
        "baseline and the numbers of test patients and lesions; thresholds are chosen on inner "
        f"validation ({ev.threshold_rule}); patient aggregation `{ev.aggregation}`.\n"
    )
    fig_names = {p.name for _, p in figures}
    cal = sorted(n for n in fig_names if n.startswith("reliability_"))
    dca = sorted(n for n in fig_names if n.startswith("decision_curve_"))
    md.append(
        "**Calibration:** Brier, calibration slope and intercept (section Calibration, "
        f"`calibration.csv`); reliability diagrams: {', '.join(f'`{n}`' for n in cal) or 'none'}.\n"
    )
    md.append(
        "**Clinical utility:** decision curve for withholding anti-EGFR therapy while the biopsy "
        f"is pending: {', '.join(f'`{n}`' for n in dca) or 'none (no RAS class)'} "
        "(`decision_curve.csv`).\n"
    )
    md.append("**Not in the run files — to be completed by the authors:**\n")
    md += [f"- [ ] {item}" for item in NOT_IN_RUN_FILES]
    return "\n".join(md) + "\n"


def _kv_table(d: dict[str, str]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in d.items()]
    return "\n".join(lines) + "\n"
