"""The experiment report of a sweep: Tables III/IV, 5-vs-3 classes, Hamming loss, significance, figures.

Input: job folders written by ``python -m crc_lightning.run`` (``metrics.json`` + ``predictions.csv``,
README "What each stage writes"). Output, in one folder: ``report.md``, one CSV per table, PNG figures.

Conventions (also written into report.md):

* a *group* is one (label set, variant, resolution, backbone init); its seeds are its repeats.
  Every number is mean ± 95% CI half-width over seeds (:func:`stats.mean_ci`), n shown, "n/a" for n=1;
* focus class: ``focus_class`` (default ``RAS``) when the label set has it; the five-class set has no
  RAS class, there ``RAS`` is read as ``KRAS`` (the larger RAS member; NRAS is a separate class);
* baselines come from the prevalence p of the focus class in the group's test sets at that level,
  pooled over seeds (Σ positives / Σ samples); a mean whose CI does not clear its baseline gets "†";
* significance: the patient-level permutation test of the group's lesion predictions pooled over
  seeds (:func:`stats.permutation_auc_test`), and paired tests of variants over shared seeds.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.evaluation.aggregate import LEVELS, lesion_level, patient_level
from crc_lightning.evaluation.html import write_report_html
from crc_lightning.evaluation.stats import (
    baselines,
    clears,
    mean_ci,
    paired_tests,
    permutation_auc_test,
)
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import write_atomic

log = logging.getLogger(__name__)

__all__ = [
    "Job",
    "find_job_dirs",
    "focus_for",
    "load_job",
    "make_report",
    "paired_table",
    "permutation_table",
    "report_from_jobs",
    "results_frame",
    "summarize",
]

GROUP = ["labels", "variant", "res", "weights"]
FOCUS_ALIASES = {"RAS": ("KRAS",)}  # five-class set: RAS → KRAS
# metric: (higher is better, baseline key, label)
METRICS: dict[str, tuple[bool, str, str]] = {
    "auc": (True, "auc", "AUC"),
    "auc_focus": (True, "auc", "AUC {focus}"),
    "f1": (True, "f1", "F1 {focus}"),
    "f1_macro": (True, "f1_macro", "F1 macro"),
    "specificity": (True, "specificity", "Spec {focus}"),
    "sensitivity": (True, "sensitivity", "Sens {focus}"),
    "hamming": (False, "hamming", "Hamming"),
}
TABLES: dict[str, tuple[str, list[str]]] = {
    "table3_auc_f1": ("Table III — AUC and focus-class F1", ["auc", "f1"]),
    "table4_spec_sens": (
        "Table IV — focus-class specificity and sensitivity",
        ["specificity", "sensitivity"],
    ),
    "table_classes": ("5 vs 3 classes — AUC, macro F1, focus-class F1", ["auc", "f1_macro", "f1"]),
    "table_hamming": ("Hamming loss (lower is better)", ["hamming"]),
}


# ------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class Job:
    path: Path
    variant: str
    res: int
    seed: int
    labels: str
    classes: tuple[str, ...]
    weights: str
    metrics: dict[str, Any]

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.csv"


def find_job_dirs(sweep: str | Path | Sequence[str | Path]) -> list[Path]:
    """Folders holding a ``metrics.json`` below each sweep dir (globs expanded), sorted, unique."""
    items = [sweep] if isinstance(sweep, (str, Path)) else list(sweep)
    roots: list[Path] = []
    for item in items:
        s = str(item)
        matches = sorted(glob.glob(s)) if glob.has_magic(s) else [s]
        if not matches or not all(Path(m).exists() for m in matches):
            raise InputError(s, "no such sweep folder (or the glob matches nothing)")
        roots += [Path(m) for m in matches]
    jobs = {
        p.parent.resolve() for r in roots for p in ([r] if r.is_file() else r.rglob("metrics.json"))
    }
    if not jobs:
        raise InputError(", ".join(map(str, roots)), "no metrics.json below this folder")
    return sorted(jobs)


def load_job(job_dir: str | Path) -> Job:
    """Read one job's metrics.json; a malformed file is an :class:`InputError` naming it."""
    job_dir = Path(job_dir)
    path = job_dir / "metrics.json"
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(path, f"cannot read metrics.json ({e})") from e
    missing = [k for k in ("variant", "res", "seed", "labels", "classes", "metrics") if k not in m]
    if missing:
        raise InputError(path, f"not a run result: missing keys {missing}")
    weights = (m.get("weights") or {}).get("init") or "unknown"
    return Job(
        path=job_dir,
        variant=str(m["variant"]),
        res=int(m["res"]),
        seed=int(m["seed"]),
        labels=str(m["labels"]),
        classes=tuple(str(c) for c in m["classes"]),
        weights=str(weights),
        metrics=m["metrics"],
    )


def focus_for(classes: Sequence[str], focus: str = "RAS") -> str:
    """The class standing for ``focus`` in this label set (RAS → KRAS in the five-class set)."""
    if focus in classes:
        return focus
    for alias in FOCUS_ALIASES.get(focus, ()):
        if alias in classes:
            return alias
    raise ValueError(f"focus class {focus!r} is not in the label set {list(classes)}")


def _dedupe(jobs: list[Job]) -> list[Job]:
    seen: dict[tuple, Job] = {}
    for j in jobs:
        key = (j.labels, j.variant, j.res, j.weights, j.seed)
        if key in seen:
            log.warning("duplicate job %s (same as %s); keeping the first", j.path, seen[key].path)
            continue
        seen[key] = j
    return list(seen.values())


# ------------------------------------------------------------------------------ tables
def results_frame(
    jobs: Iterable[Job], focus: str = "RAS", levels: Sequence[str] = LEVELS
) -> pd.DataFrame:
    """One row per job × level: the report's metrics of that job (focus-class ones included)."""
    rows = []
    for j in jobs:
        fc = focus_for(j.classes, focus)
        for level in levels:
            if level not in j.metrics:
                raise InputError(j.path / "metrics.json", f"no {level!r} metrics")
            lm = j.metrics[level]
            pc = lm["per_class"][fc]
            rows.append(
                {
                    "labels": j.labels,
                    "variant": j.variant,
                    "res": j.res,
                    "weights": j.weights,
                    "seed": j.seed,
                    "level": level,
                    "focus": fc,
                    "n_samples": int(lm["n"]),
                    "auc": lm.get("auc"),
                    "f1_macro": lm.get("f1_macro"),
                    "hamming": lm.get("hamming"),
                    "auc_focus": pc.get("auc"),
                    "f1": pc.get("f1"),
                    "sensitivity": pc.get("sensitivity"),
                    "specificity": pc.get("specificity"),
                    "support_focus": int(pc["support"]),
                    "supports": tuple(int(lm["per_class"][c]["support"]) for c in j.classes),
                }
            )
    return pd.DataFrame(rows)


def _group_baselines(g: pd.DataFrame) -> dict[str, float]:
    total = float(g["n_samples"].sum())
    p = float(g["support_focus"].sum()) / total
    prev = np.sum(np.stack(g["supports"].map(np.asarray).tolist()), axis=0) / total
    b = baselines(p, prev.tolist())
    b["f1_macro"] = float(np.mean([baselines(q)["f1"] for q in prev]))
    b["prevalence"] = p
    return b


def summarize(results: pd.DataFrame, ci: float = 0.95) -> pd.DataFrame:
    """One row per group × level × metric: mean, CI half-width, n, baseline, prevalence, dagger."""
    rows = []
    for key, g in results.groupby([*GROUP, "level"], sort=True):
        b = _group_baselines(g)
        for metric, (higher, bkey, _) in METRICS.items():
            mean, half, n = mean_ci(g.sort_values("seed")[metric].tolist(), ci)
            rows.append(
                {
                    **dict(zip([*GROUP, "level"], key, strict=True)),
                    "focus": g["focus"].iloc[0],
                    "metric": metric,
                    "mean": mean,
                    "ci_half": half,
                    "n": n,
                    "seeds": " ".join(map(str, sorted(g["seed"]))),
                    "prevalence": b["prevalence"],
                    "baseline": b[bkey],
                    "dagger": not clears(mean, half, b[bkey], higher),
                }
            )
    return pd.DataFrame(rows)


def format_cell(row: pd.Series | dict[str, Any], digits: int = 2) -> str:
    """``0.53 ± 0.05† (n=5; base 0.50)`` — "n/a" half-width for n = 1, "–" without a value."""
    if row["mean"] is None or pd.isna(row["mean"]):
        return "–"
    half = (
        "n/a"
        if row["ci_half"] is None or pd.isna(row["ci_half"])
        else f"{row['ci_half']:.{digits}f}"
    )
    mark = "†" if row["dagger"] else ""
    return (
        f"{row['mean']:.{digits}f} ± {half}{mark} (n={row['n']}; base {row['baseline']:.{digits}f})"
    )


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.tolist()) + " |")
    return "\n".join(lines)


def table_markdown(summary: pd.DataFrame, metrics: Sequence[str], by_labels: bool = True) -> str:
    """Per level (and label set): rows = variant (backbone init), columns = resolution × metric."""
    out = []
    s = summary[summary["metric"].isin(metrics)].copy()
    s["cell"] = s.apply(format_cell, axis=1)
    split = ["level", "labels"] if by_labels else ["level"]
    for key, g in s.groupby(split, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        title = ", ".join(f"{k}={v}" for k, v in zip(split, key, strict=True))
        focus = ", ".join(sorted(set(g["focus"])))
        g = g.assign(
            col=[
                f"{r.res}px {'' if by_labels else r.labels + ' '}"
                f"{METRICS[r.metric][2].format(focus=r.focus)}"
                for r in g.itertuples()
            ]
        )
        pivot = g.pivot_table(
            index=["variant", "weights"], columns="col", values="cell", aggfunc="first", sort=False
        )
        order = [c for c in dict.fromkeys(g.sort_values(["res", "labels"], kind="stable")["col"])]
        pivot = pivot.reindex(columns=order).fillna("–").reset_index()
        pivot = pivot.rename(columns={"weights": "init"})
        out.append(f"**{title}** (focus: {focus})\n\n{_md_table(pivot)}\n")
    return "\n".join(out)


# ------------------------------------------------------------------------------ predictions
def lesion_predictions(jobs: Iterable[Job]) -> pd.DataFrame:
    """Lesion-level rows of every job (``aggregate.lesion_level``) with the job's group and seed."""
    frames = []
    for j in jobs:
        if not j.predictions.is_file():
            log.warning("%s: no predictions.csv; left out of permutation tests and ROC", j.path)
            continue
        try:
            pred = pd.read_csv(j.predictions, dtype={"patient_id": str})
            les = lesion_level(pred, j.classes)
        except (ValueError, pd.errors.ParserError) as e:
            raise InputError(j.predictions, str(e)) from e
        les = les.assign(
            labels=j.labels, variant=j.variant, res=j.res, weights=j.weights, seed=j.seed
        )
        frames.append(les)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _patient_truth(les: pd.DataFrame, focus: str) -> dict[str, int]:
    """Patient truth (OR over lesions, per seed's test set); the same patient must agree across seeds."""
    truth: dict[str, int] = {}
    for _, g in les.groupby("seed"):
        pt = patient_level(g, [focus])
        for pid, t in zip(pt["patient_id"], pt[focus], strict=True):
            if truth.setdefault(str(pid), int(t)) != int(t):
                raise ValueError(
                    f"a patient has different {focus} truth in different seeds' test sets"
                )
    return truth


def permutation_table(
    lesions: pd.DataFrame, focus: str = "RAS", permutations: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per group: the patient-level permutation test of the pooled lesion focus-class AUC."""
    rows = []
    if lesions.empty:
        return pd.DataFrame(rows)
    for key, g in lesions.groupby(GROUP, sort=True):
        classes = [c[2:] for c in g.columns if c.startswith("p_") and g[c].notna().all()]
        fc = focus_for(classes, focus)
        g = g.dropna(axis=1, how="all")
        res = permutation_auc_test(
            g["patient_id"].astype(str).tolist(),
            g[f"p_{fc}"].to_numpy(),
            _patient_truth(g, fc),
            permutations,
            seed,
        )
        rows.append(
            {
                **dict(zip(GROUP, key, strict=True)),
                "focus": fc,
                "n_seeds": int(g["seed"].nunique()),
                "n_patients": res.n_patients,
                "n_lesions": res.n_lesions,
                "auc_pooled": res.auc,
                "p_value": res.p_value,
                "method": "exact" if res.exact else "monte-carlo",
                "n_permutations": res.n_permutations,
            }
        )
    return pd.DataFrame(rows)


def paired_table(results: pd.DataFrame, metrics: Sequence[str] = ("auc", "f1")) -> pd.DataFrame:
    """Every pair of variants (same label set, res, level) on their shared seeds: paired tests."""
    rows = []
    for (labels, res, level), g in results.groupby(["labels", "res", "level"], sort=True):
        variants = sorted(g["variant"].unique())
        for va, vb in itertools.combinations(variants, 2):
            a = g[g["variant"] == va].set_index("seed")
            b = g[g["variant"] == vb].set_index("seed")
            for metric in metrics:
                both = (
                    a[[metric]].join(b[[metric]], lsuffix="_a", rsuffix="_b", how="inner").dropna()
                )
                if both.empty:
                    continue
                t = paired_tests(both[f"{metric}_a"].tolist(), both[f"{metric}_b"].tolist())
                rows.append(
                    {
                        "labels": labels,
                        "res": res,
                        "level": level,
                        "metric": metric,
                        "variant_a": va,
                        "variant_b": vb,
                        **t,
                    }
                )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ the report
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, (float, np.floating)) else str(x)


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    return write_atomic(path, df.to_csv(index=False))


LEGEND = """\
**How to read the tables.** Each cell is `mean ± h† (n=k; base b)`: the mean over the k seeds
(= k different patient splits) of the group, h the half-width of its {ci:.0%} Student-t confidence
interval (t_{{(1+ci)/2, k−1}} · s / √k, s with ddof 1; "n/a" when k = 1), b the image-blind baseline
for that metric computed from the prevalence p of the focus class in the group's test sets at that
level (pooled over seeds): AUC 0.5; F1 max(always-positive 2p/(1+p), prevalence-random p) =
2p/(1+p); macro F1 the mean of the classes' always-positive F1; sensitivity p and specificity 1−p
(prevalence-random classifier); Hamming loss the mean over classes of 2p_c(1−p_c)
(prevalence-random). **†** = the confidence interval does not clear the baseline (for Hamming:
its upper end is not below it) — the number is not distinguishable from a classifier that ignores
the image. Focus class: `{focus}`; in the five-class set, which has no RAS class, RAS is read as
KRAS. `init` = the backbone initialisation recorded in metrics.json (`weights.init`); `none` means
random initialisation (a demo, not a result).
"""

PERM_TEXT = """\
**Patient-level permutation test.** For each group the lesion-level test predictions of all its
seeds are pooled. Each patient's focus-class truth is the OR over its lesions (the patient level
of the run results); every pooled lesion row carries its patient's truth, and the statistic is the
AUC of the lesions' focus-class probabilities against it. Under the null (probabilities independent
of mutation status) the patients' truths are exchangeable: they are permuted among the patients
(the patient, not the lesion, is the unit, since lesions of one patient are correlated) and each
lesion takes its patient's permuted truth. With k positive patients among N there are C(N, k)
distinct assignments; when C(N, k) ≤ {perm} all are enumerated (exact p = share of assignments with
AUC ≥ observed, the identity included), otherwise {perm} random permutations give
p = (b+1)/(m+1). One-sided (AUC above chance).
"""


def report_from_jobs(
    job_dirs: Sequence[str | Path],
    out_dir: str | Path,
    levels: Sequence[str] = LEVELS,
    ci: float = 0.95,
    permutations: int = 2000,
    seed: int = 0,
    focus_class: str = "RAS",
    store: str | Path | None = None,
    figure_level: str = "lesion",
    window: tuple[float, float] | None = None,
) -> Path:
    """Write report.md, the table CSVs and figures of these job folders into ``out_dir``.

    ``window`` = (width, level) of the CT window for the sample-crops figure (with ``store``).
    """
    from crc_lightning.evaluation import figures

    jobs = _dedupe([load_job(d) for d in job_dirs])
    if not jobs:
        raise InputError(str(out_dir), "no jobs to report")
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ValueError(f"unknown levels {unknown}; choose from {list(LEVELS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = results_frame(jobs, focus_class, levels)
    summary = summarize(results, ci)
    lesions = lesion_predictions(jobs)
    perm = permutation_table(lesions, focus_class, permutations, seed)
    paired = paired_table(results)

    md = [f"# Experiment report\n\n{len(jobs)} jobs; levels {', '.join(levels)}.\n"]
    init_none = sorted({f"{j.variant}" for j in jobs if j.weights == "none"})
    if init_none:
        md.append(
            f"> **Random-init backbones** (weights.init = none) in: {', '.join(init_none)} — "
            "demo numbers, not results.\n"
        )
    md.append(LEGEND.format(ci=ci, focus=focus_class))
    _write_csv(summary, out / "summary.csv")
    csvs = {}
    for name, (title, metrics) in TABLES.items():
        sub = summary[summary["metric"].isin(metrics)]
        csvs[name] = _write_csv(sub.drop(columns=[]), out / f"{name}.csv")
        md.append(
            f"## {title}\n\n{table_markdown(summary, metrics, by_labels=name != 'table_classes')}"
        )
    md.append("## Significance\n\n" + PERM_TEXT.format(perm=permutations))
    if not perm.empty:
        _write_csv(perm, out / "permutation_tests.csv")
        show = perm.copy()
        for c in ("auc_pooled", "p_value"):
            show[c] = show[c].map(_fmt)
        md.append(_md_table(show) + "\n")
    md.append(
        "**Paired comparison of variants** (same seed = same split; two-sided `scipy.stats.ttest_rel`,"
        " plus `scipy.stats.wilcoxon` when n ≥ 5; metric = the job's value at that level: `auc` "
        "weighted one-vs-rest, `f1` focus class).\n"
    )
    if not paired.empty:
        _write_csv(paired, out / "paired_tests.csv")
        show = paired.copy()
        for c in ("mean_diff", "t", "p_ttest", "w", "p_wilcoxon"):
            show[c] = show[c].map(_fmt)
        md.append(_md_table(show) + "\n")
    else:
        md.append("(no pair of variants shares a seed)\n")

    figs = figures.report_figures(
        summary,
        lesions,
        jobs,
        out,
        level=figure_level if figure_level in levels else levels[0],
        store=store,
        window_hu=window,
    )
    md.append("## Figures\n")
    for title, path in figs:
        md.append(f"### {title}\n\n![{title}]({path.name})\n")
    report = write_atomic(out / "report.md", "\n".join(md))
    write_report_html(report)  # report.html beside it, rendered from report.md
    return report


def default_out_dir(job_dirs: Sequence[Path], sweeps: Sequence[str | Path]) -> Path:
    """The sweep folder itself, or the common parent of several matched sweep folders."""
    roots = []
    for s in sweeps:
        s = str(s)
        roots += [Path(m) for m in sorted(glob.glob(s))] if glob.has_magic(s) else [Path(s)]
    roots = [r if r.is_dir() else r.parent for r in roots]
    if len(roots) == 1:
        return roots[0]
    return Path(os.path.commonpath([str(r.resolve()) for r in roots]))


def make_report(
    sweep: str | Path | Sequence[str | Path],
    out_dir: str | Path | None = None,
    **kwargs: Any,
) -> Path:
    """Find every metrics.json below ``sweep`` (folder(s) or glob(s)) and write the report.

    Output goes to ``out_dir`` or, by default, into the sweep folder. Keyword arguments are those of
    :func:`report_from_jobs`. Returns the path of report.md.
    """
    jobs = find_job_dirs(sweep)
    sweeps = [sweep] if isinstance(sweep, (str, Path)) else list(sweep)
    out = Path(out_dir) if out_dir else default_out_dir(jobs, sweeps)
    return report_from_jobs(jobs, out, **kwargs)
