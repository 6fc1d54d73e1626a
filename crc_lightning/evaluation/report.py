"""The experiment report of a sweep: tables with corrected CIs and image-blind baselines, thresholds
chosen on validation, calibration, a decision curve, significance with Holm, figures, and a
reporting checklist.

Input: job folders written by ``python -m crc_lightning.run`` (contract in :mod:`results`).
Output, in one folder: ``report.md`` (self-describing; figures referenced by file name), one CSV
per table, PNG figures. How every number is made is written into report.md itself (``METHODS``).
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.evaluation.aggregate import LEVELS
from crc_lightning.evaluation.html import write_report_html
from crc_lightning.evaluation.results import (
    GROUP,
    METRICS,
    Evaluation,
    Job,
    bootstrap_values,
    build_repeats,
    evaluate,
    find_job_dirs,
    focus_for,
    load_job,
)
from crc_lightning.evaluation.stats import (
    MIN_WILCOXON,
    TOLERANCE,
    baselines,
    beats,
    block_permutation_test,
    corrected_paired_t,
    corrected_t,
    holm,
    net_benefit,
    percentile_interval,
    treat_all_net_benefit,
    wilcoxon_paired,
)
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import write_atomic

log = logging.getLogger(__name__)

__all__ = [
    "Job",
    "decision_curves",
    "default_out_dir",
    "find_job_dirs",
    "focus_for",
    "format_cell",
    "load_job",
    "make_report",
    "paired_table",
    "permutation_table",
    "report_from_jobs",
    "summarize",
]

TABLES: dict[str, tuple[str, list[str], bool]] = {  # name: (title, metrics, one table per label set)
    "table3_auc_f1": ("Table III — AUC and focus-class F1", ["auc", "auc_weighted", "f1"], True),
    "table4_spec_sens": (
        "Table IV — focus-class sensitivity, specificity and balanced accuracy (threshold 0.5)",
        ["sensitivity", "specificity", "balanced_accuracy"],
        True,
    ),
    "table_thresholds": (
        "Thresholds chosen on inner validation — F1, sensitivity, specificity, balanced accuracy",
        ["f1@val", "sensitivity@val", "specificity@val", "balanced_accuracy@val"],
        True,
    ),
    "table_classes": ("5 vs 3 classes — weighted AUC, macro F1, focus-class F1", ["auc_weighted", "f1_macro", "f1"], False),
    "table_hamming": ("Hamming loss and Brier score (lower is better)", ["hamming", "hamming@val", "brier"], True),
}  # fmt: skip
PERMUTATION_LEVELS = ("patient", "lesion")
PAIRED_METRICS = ("auc", "f1", "balanced_accuracy")
DCA_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


# ------------------------------------------------------------------------------ summary
def _prevalences(rep_rows: pd.DataFrame) -> np.ndarray:
    sup = np.sum(np.stack(rep_rows["supports"].map(np.asarray).tolist()), axis=0)
    return sup / float(rep_rows["n_rows"].sum())


def _span(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return str(lo) if lo == hi else f"{lo}–{hi}"


def summarize(
    ev: Evaluation,
    ci: float = 0.95,
    tolerance: float = TOLERANCE,
    margin: float = 0.0,
    bootstrap: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per group × level × metric: the mean of the repeats' pooled values, its CI
    (corrected t over splits; patient bootstrap for a single hold-out repeat), baseline, †."""
    res = ev.results
    rows = []
    if res.empty:
        return pd.DataFrame(rows)
    for key, g in res.groupby([*GROUP, "level"], sort=True):
        reps = g[g["scope"] == "repeat"].sort_values(["seed", "repeat"])
        folds = g[g["scope"] == "fold"]
        focus = str(reps["focus"].iloc[0])
        classes = next(r.classes for r in ev.repeats if r.group == tuple(key[:-1]))
        prev = _prevalences(reps)
        base = baselines(prev.tolist(), list(classes).index(focus))
        ratio = float(np.nanmean((folds["n_test"] / folds["n_train"]).to_numpy(dtype=float)))
        boot = None
        for metric, (_, higher) in METRICS.items():
            values = reps[metric].to_numpy(dtype=float)
            ok = values[np.isfinite(values)]
            center = float(ok.mean()) if ok.size else None
            interval = corrected_t(folds[metric].tolist(), ratio, ci, center)
            if interval.low is None and len(reps) == 1 and bootstrap > 0 and center is not None:
                if boot is None:
                    r0 = reps.iloc[0]
                    ld = ev.data[(tuple(key[:-1]), int(r0["seed"]), int(r0["repeat"]), key[-1])]
                    boot = bootstrap_values(ld, list(classes).index(focus), bootstrap, seed)
                interval = percentile_interval(boot[metric], center, ci)
            b = base[metric.split("@")[0]]
            won = beats(interval.low, interval.high, b, higher, tolerance, margin)
            rows.append(
                {
                    **dict(zip([*GROUP, "level"], key, strict=True)),
                    "focus": focus,
                    "metric": metric,
                    "mean": center,
                    "ci_low": interval.low,
                    "ci_high": interval.high,
                    "ci_half": interval.half,
                    "ci_method": interval.method,
                    "n": int(ok.size),  # repeats with a value
                    "n_splits": int(np.isfinite(folds[metric].to_numpy(dtype=float)).sum()),
                    "test_train_ratio": ratio,
                    "patients": _span(reps["n_patients"]),
                    "lesions": _span(reps["n_lesions"]),
                    "seeds": " ".join(map(str, reps["seed"])),
                    "prevalence": float(prev[list(classes).index(focus)]),
                    "baseline": b,
                    "beats_baseline": won,
                    "dagger": not won,
                }
            )
    return pd.DataFrame(rows)


def format_cell(row: pd.Series | dict[str, Any], digits: int = 2) -> str:
    """``0.62 [0.48, 0.75]† (base 0.50; r=5, J=25; 50 pt, 80 les)`` — "–" without a value."""
    if row["mean"] is None or pd.isna(row["mean"]):
        return "–"
    if row["ci_low"] is None or pd.isna(row["ci_low"]):
        interval = "[n/a]"
    else:
        interval = f"[{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"
    mark = "†" if row["dagger"] else ""
    return (
        f"{row['mean']:.{digits}f} {interval}{mark} (base {row['baseline']:.{digits}f}; "
        f"r={row['n']}, J={row['n_splits']}; {row['patients']} pt, {row['lesions']} les)"
    )


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.tolist()) + " |")
    return "\n".join(lines)


def table_markdown(summary: pd.DataFrame, metrics: Sequence[str], by_labels: bool = True) -> str:
    """Per level (and label set): rows = variant × init × protocol, columns = resolution × metric."""
    out = []
    s = summary[summary["metric"].isin(metrics)].copy()
    if s.empty:
        return "(no values)\n"
    s["cell"] = s.apply(format_cell, axis=1)
    split = ["level", "labels"] if by_labels else ["level"]
    for key, g in s.groupby(split, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        title = ", ".join(f"{k}={v}" for k, v in zip(split, key, strict=True))
        focus = ", ".join(sorted(set(g["focus"])))
        g = g.assign(
            col=[
                f"{r.res}px {'' if by_labels else r.labels + ' '}"
                f"{METRICS[r.metric][0].format(focus=r.focus)}"
                for r in g.itertuples()
            ]
        )
        pivot = g.pivot_table(
            index=["variant", "weights", "protocol"],
            columns="col",
            values="cell",
            aggfunc="first",
            sort=False,
        )
        order = list(dict.fromkeys(g.sort_values(["res", "labels"], kind="stable")["col"]))
        pivot = pivot.reindex(columns=order).fillna("–").reset_index()
        pivot = pivot.rename(columns={"weights": "init"})
        out.append(f"**{title}** (focus: {focus})\n\n{_md_table(pivot)}\n")
    return "\n".join(out)


# ------------------------------------------------------------------------------ significance
def _blocks(ev: Evaluation, group: tuple, level: str, focus: str):
    """Patient truth blocks and per-repeat (patient code, position, score) of one group/level."""
    reps = [r for r in ev.repeats if r.group == group]
    lds = [ev.data[(group, r.seed, r.repeat, level)] for r in reps]
    blocks: dict[str, tuple] = {}
    for ld in lds:
        t = ld.test.sort_values(["patient_id", "lesion"] if level != "patient" else ["patient_id"])
        for pid, g in t.groupby("patient_id", sort=True):
            block = tuple(int(v) for v in g[focus])
            if blocks.setdefault(str(pid), block) != block:
                raise ValueError(
                    f"a patient has different {focus} truths in two repeats of {group[1]}"
                )
    order = sorted(blocks)
    code = {p: i for i, p in enumerate(order)}
    pats, poss, scs = [], [], []
    for ld in lds:
        t = ld.test
        keys = ["patient_id", "lesion"] if level != "patient" else ["patient_id"]
        pos = t.sort_values(keys).groupby("patient_id").cumcount().reindex(t.index)
        pats.append(t["patient_id"].astype(str).map(code).to_numpy())
        poss.append(pos.to_numpy())
        scs.append(t[f"p_{focus}"].to_numpy(dtype=float))
    return [list(blocks[p]) for p in order], pats, poss, scs


def permutation_table(
    ev: Evaluation, levels: Sequence[str], permutations: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per group and level (patient, lesion): the permutation test of the focus-class AUC cell."""
    rows = []
    for rep in {r.group: r for r in ev.repeats}.values():
        focus = ev.focus_of(rep.classes)
        for level in [lv for lv in PERMUTATION_LEVELS if lv in levels]:
            blocks, pats, poss, scs = _blocks(ev, rep.group, level, focus)
            res = block_permutation_test(pats, poss, scs, blocks, permutations, seed)
            rows.append(
                {
                    **dict(zip(GROUP, rep.group, strict=True)),
                    "level": level,
                    "focus": focus,
                    "n_repeats": len(pats),
                    "n_patients": res.n_patients,
                    "n_rows": res.n_rows,
                    "n_fixed_patients": res.n_fixed,
                    "auc_mean": res.statistic,
                    "p_value": res.p_value,
                    "method": "exact" if res.exact else "monte-carlo",
                    "n_permutations": res.n_permutations,
                }
            )
    return pd.DataFrame(rows).sort_values([*GROUP, "level"]) if rows else pd.DataFrame(rows)


def _fold_patients(ev: Evaluation, group: tuple) -> dict[tuple, dict[int, frozenset]]:
    return {
        (r.seed, r.repeat): {
            int(f): frozenset(g["patient_id"].astype(str))
            for f, g in r.test.groupby("fold", sort=True)
        }
        for r in ev.repeats
        if r.group == group
    }


def paired_table(ev: Evaluation, metrics: Sequence[str] = PAIRED_METRICS) -> pd.DataFrame:
    """Every pair of variants (same label set, res, protocol, level) on the same splits: the
    corrected paired t on split-wise differences; Wilcoxon on the repeats' differences (n ≥ 6)."""
    res = ev.results
    rows = []
    if res.empty:
        return pd.DataFrame(rows)
    for (labels, r, protocol, level), g in res.groupby(
        ["labels", "res", "protocol", "level"], sort=True
    ):
        arms = sorted({(v, w) for v, w in zip(g["variant"], g["weights"], strict=True)})
        for a, b in itertools.combinations(arms, 2):
            ga = (labels, a[0], r, a[1], protocol)
            gb = (labels, b[0], r, b[1], protocol)
            pa, pb = _fold_patients(ev, ga), _fold_patients(ev, gb)
            shared = sorted(set(pa) & set(pb))
            same = [k for k in shared if pa[k] == pb[k]]
            if len(same) < len(shared):
                log.warning("%s vs %s: %d repeats differ in their splits; left out", ga, gb,
                            len(shared) - len(same))  # fmt: skip
            if not same:
                continue
            key = ["seed", "repeat", "fold"]
            sa = g[(g["variant"] == a[0]) & (g["weights"] == a[1])].set_index(key)
            sb = g[(g["variant"] == b[0]) & (g["weights"] == b[1])].set_index(key)
            folds_a = sa[sa["scope"] == "fold"]
            folds_b = sb[sb["scope"] == "fold"]
            keep = [i for i in folds_a.index.intersection(folds_b.index) if i[:2] in same]
            reps_a = sa[sa["scope"] == "repeat"].droplevel("fold")
            reps_b = sb[sb["scope"] == "repeat"].droplevel("fold")
            rk = [k for k in same if k in reps_a.index and k in reps_b.index]
            ratio = float(np.nanmean(folds_a.loc[keep, "n_test"] / folds_a.loc[keep, "n_train"]))
            for metric in metrics:
                d = folds_a.loc[keep, metric] - folds_b.loc[keep, metric]
                t = corrected_paired_t(d.tolist(), ratio)
                va = reps_a.loc[rk, metric].to_numpy(dtype=float)
                vb = reps_b.loc[rk, metric].to_numpy(dtype=float)
                ok = np.isfinite(va) & np.isfinite(vb)
                w = wilcoxon_paired(va[ok], vb[ok])
                rows.append(
                    {
                        "labels": labels,
                        "res": r,
                        "protocol": protocol,
                        "level": level,
                        "metric": metric,
                        "variant_a": f"{a[0]} ({a[1]})",
                        "variant_b": f"{b[0]} ({b[1]})",
                        "n_repeats": int(ok.sum()),
                        "n_splits": t["n_splits"],
                        "mean_diff": float(np.mean(va[ok] - vb[ok])) if ok.any() else None,
                        "t_corrected": t["t"],
                        "p_value": t["p"],
                        "w": w["w"],
                        "p_wilcoxon": w["p"],
                    }
                )
    return pd.DataFrame(rows)


def apply_holm(perm: pd.DataFrame, paired: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Holm over one family: every permutation test and every corrected paired t of the report."""
    pv = [*(perm["p_value"] if len(perm) else []), *(paired["p_value"] if len(paired) else [])]
    pv = [None if v is None or pd.isna(v) else float(v) for v in pv]
    adj = holm(pv)
    perm, paired = perm.copy(), paired.copy()
    if len(perm):
        perm["p_holm"] = adj[: len(perm)]
    if len(paired):
        paired["p_holm"] = adj[len(perm) :]
    return perm, paired, sum(v is not None for v in pv)


# ------------------------------------------------------------------------------ calibration, DCA
def calibration_table(ev: Evaluation) -> pd.DataFrame:
    """Per group × level × class: Brier, calibration slope and intercept, mean over repeats."""
    c = ev.calibration
    if c.empty:
        return c
    agg = c.groupby([*GROUP, "level", "class"], sort=True).agg(
        n_repeats=("seed", "size"),
        prevalence=("prevalence", "mean"),
        brier=("brier", "mean"),
        slope=("slope", "mean"),
        slope_min=("slope", "min"),
        slope_max=("slope", "max"),
        intercept=("intercept", "mean"),
        intercept_min=("intercept", "min"),
        intercept_max=("intercept", "max"),
    )
    return agg.reset_index()


def _ras(test: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Patient RAS truth and score: the RAS class, or KRAS ∨ NRAS (score 1 − (1−p_K)(1−p_N))."""
    if "RAS" in classes:
        return test["RAS"].to_numpy(int), test["p_RAS"].to_numpy(float)
    genes = [g for g in ("KRAS", "NRAS") if g in classes]
    if not genes:
        return None
    y = test[genes].max(axis=1).to_numpy(int)
    p = 1.0 - np.prod(1.0 - test[[f"p_{g}" for g in genes]].to_numpy(float), axis=1)
    return y, p


def decision_curves(
    ev: Evaluation, level: str = "patient", thresholds: Sequence[float] = DCA_THRESHOLDS
) -> pd.DataFrame:
    """Net benefit of withholding anti-EGFR therapy when the RAS score ≥ t, mean over repeats."""
    rows = []
    for group in dict.fromkeys(r.group for r in ev.repeats):
        nbs, alls = [], []
        for r in [r for r in ev.repeats if r.group == group]:
            ld = ev.data.get((group, r.seed, r.repeat, level))
            got = None if ld is None else _ras(ld.test, r.classes)
            if got is None:
                break
            y, p = got
            nbs.append(net_benefit(y, p, thresholds))
            alls.append(treat_all_net_benefit(float(y.mean()), thresholds))
        else:
            if not nbs:
                continue
            nb, al = np.mean(nbs, axis=0), np.mean(alls, axis=0)
            for t, a, b in zip(thresholds, nb, al, strict=True):
                rows.append(
                    {
                        **dict(zip(GROUP, group, strict=True)),
                        "level": level,
                        "threshold": float(t),
                        "net_benefit": float(a),
                        "treat_all": float(b),
                        "treat_none": 0.0,
                        "n_repeats": len(nbs),
                    }
                )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ the report
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    return f"{x:.{digits}f}" if isinstance(x, (float, np.floating)) else str(x)


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    return write_atomic(path, df.to_csv(index=False))


METHODS = """\
## How to read this report

**Unit of a cell.** A *group* is one (label set, variant, resolution, backbone init, protocol);
its *repeats* are its seeds. In the `cv` protocol one repeat trains the k folds of a
patient-grouped, label-stratified k-fold, so its out-of-fold predictions test every labelled
patient exactly once; `kfold` jobs (one fold per job) of one seed are pooled into one repeat the
same way; a `holdout` repeat tests one held-out set. Every metric is computed on a repeat's
**pooled out-of-fold predictions**, and the cell shows the **mean over repeats**.

**Cell.** `m [lo, hi]† (base b; r=R, J=J; P pt, L les)`: mean m; its {ci:.0%} confidence interval;
b the image-blind baseline; R repeats and J train/test splits behind it; P test patients and
L test lesions per repeat (a range when repeats differ). **†** = the interval does not clear b
by more than {tol:g}{margin_text} — the value is not distinguishable from a rule that ignores the
image. Intervals are clipped to [0, 1].

**Confidence intervals: Nadeau–Bengio corrected resampled t.** Repeats and folds share most of
their training patients (and cv repeats test the same patients), so their values are not
independent and a plain t-interval over seeds is far too narrow. The interval is
m ± t_{{(1+c)/2, J−1}} · sqrt((1/J + n_test/n_train) · s²), with s² the variance of the metric
over the J splits (folds of every repeat; one split per hold-out repeat) and n_test/n_train the
splits' mean ratio of test to training patients — 1/(k−1) in k-fold (Bouckaert & Frank 2004),
n_test/n_train in a hold-out (Nadeau & Bengio 2003). The spread is taken over *splits*, not over
the repeats' pooled values: pooled repeats test the same patients, so their spread misses the
test-sample variance (`benchmarks/null_calibration.py`: a corrected t over repeats claims to beat
chance in up to 41 % of no-signal sweeps; over splits ≤ 0.9 %). A single hold-out repeat has
one split: its interval is the percentile interval of a patient-clustered bootstrap
({boot} resamples of patients, each with all its lesions and crops).

**Baselines: the best image-blind rule on the same test sets** (class prevalence p at that level,
pooled over repeats): AUC 0.5 and balanced accuracy 0.5 (every image-blind rule);
sensitivity 1.0 (always-positive); specificity 1.0 (always-negative) — so sensitivity or
specificity alone never clears its baseline, read them with balanced accuracy; F1 2p/(1+p)
(always-positive beats prevalence-random p); macro F1 the mean of the classes' 2p/(1+p); Hamming
loss the mean over classes of min(p, 1−p) (per-class majority); Brier p(1−p) (the constant p).

**Thresholds.** Sensitivity, specificity, F1, balanced accuracy and Hamming loss are shown at 0.5
and at a per-class threshold chosen on the **inner-validation predictions of the same fold**
(`val_predictions.csv`, that fold's best checkpoint; never the test side) by maximising
{rule_text}; a fold whose validation side lacks a class keeps 0.5. Jobs without
`val_predictions.csv` have no "@val-thr" values.

**Levels.** image = one row per crop (or per lesion for variants without crops); lesion = mean of
its rows; patient: truth of a gene class = OR over its lesions, OTHER only when **every** lesion
is wild-type; patient score = **{agg}** over lesions ({agg_text}). Focus class `{focus}`; the
five-class set has no RAS class, there RAS is read as KRAS.
"""

AGG_TEXT = {
    "max": "a gene's score is its most suspicious lesion's, OTHER's the least wild-type lesion's",
    "noisy_or": "1 − Π(1 − p) over lesions for a gene, Π p for OTHER",
    "mean": "the mean lesion probability for every class",
}
RULE_TEXT = {"youden": "Youden's J (sensitivity + specificity − 1)", "f1": "F1"}

SIGNIFICANCE = """\
**Permutation test of the AUC cell** (per group, patient and lesion level). Statistic = the
table's value: the mean over repeats of the pooled focus-class AUC. Null: scores independent of
the mutation status. The patient is the exchangeable unit: each patient's truth block (one value
at patient level, one per lesion at lesion level) is given to another patient, the same
permutation in every repeat; at lesion level only patients with the same number of lesions
exchange blocks (`n_fixed_patients` have no partner and stay). Exact when every block is one value
and all C(N, k) assignments fit in {perm}; otherwise {perm} random permutations,
p = (b+1)/(m+1). One-sided (AUC above chance). The image level is not tested: its rows per
patient differ too much for whole-patient blocks to move.

**Paired comparisons** of two variants of the same label set, resolution and protocol, on the
same splits (same seed = same split; checked patient by patient, repeats whose folds differ are
left out): the Nadeau–Bengio corrected paired t on the split-wise differences (two-sided,
df = J − 1), and `scipy.stats.wilcoxon` on the repeats' differences only from n ≥ {minw} repeats
(below that its smallest two-sided p is ≥ 0.0625); Wilcoxon ignores the overlap of training sets
and is shown for reference, outside the family.

**Multiplicity: Holm** (`statsmodels.stats.multitest.multipletests`) over one family: {family}.
"""


def _reliability_inputs(ev: Evaluation, level: str) -> pd.DataFrame:
    frames = []
    for r in ev.repeats:
        ld = ev.data.get((r.group, r.seed, r.repeat, level))
        if ld is not None:
            frames.append(ld.test.assign(**dict(zip(GROUP, r.group, strict=True)), seed=r.seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


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
    patient_aggregation: str = "max",
    threshold_rule: str = "youden",
    bootstrap: int = 2000,
    tolerance: float = TOLERANCE,
    margin: float = 0.0,
) -> Path:
    """Write report.md, the table CSVs and figures of these job folders into ``out_dir``.

    ``window`` = (width, level) of the CT window for the sample-crops figure (with ``store``).
    """
    from crc_lightning.evaluation import figures
    from crc_lightning.evaluation.checklist import checklist_markdown

    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ValueError(f"unknown levels {unknown}; choose from {list(LEVELS)}")
    jobs = [load_job(d) for d in job_dirs]
    if not jobs:
        raise InputError(str(out_dir), "no jobs to report")
    repeats = build_repeats(jobs)
    eval_levels = list(dict.fromkeys([*levels, "patient"]))  # the decision curve is per patient
    ev = evaluate(repeats, eval_levels, focus_class, patient_aggregation, threshold_rule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_all = summarize(ev, ci, tolerance, margin, bootstrap, seed)
    summary = summary_all[summary_all["level"].isin(levels)]
    perm = permutation_table(ev, levels, permutations, seed)
    paired = paired_table(ev)
    paired = paired[paired["level"].isin(levels)] if len(paired) else paired
    perm, paired, n_family = apply_holm(perm, paired)
    calib = calibration_table(ev)
    calib = calib[calib["level"].isin(levels)] if len(calib) else calib
    dca = decision_curves(ev)

    n_jobs = len({j.path for rep in repeats for j in rep.jobs})
    md = [
        "# Experiment report\n",
        f"{n_jobs} jobs, {len(repeats)} repeats in {len({r.group for r in repeats})} groups; "
        f"levels {', '.join(levels)}.\n",
    ]
    init_none = sorted({r.group[1] for r in repeats if r.group[3] == "none"})
    if init_none:
        md.append(
            f"> **Random-init backbones** (weights.init = none) in: {', '.join(init_none)} — "
            "demo numbers, not results.\n"
        )
    margin_text = f" + margin {margin:g}" if margin else ""
    md.append(
        METHODS.format(
            ci=ci,
            tol=tolerance,
            margin_text=margin_text,
            boot=bootstrap,
            rule_text=RULE_TEXT[threshold_rule],
            agg=patient_aggregation,
            agg_text=AGG_TEXT[patient_aggregation],
            focus=focus_class,
        )
    )
    _write_csv(summary, out / "summary.csv")
    _write_csv(ev.results.drop(columns=["supports"]), out / "per_repeat.csv")
    for name, (title, metrics, by_labels) in TABLES.items():
        _write_csv(summary[summary["metric"].isin(metrics)], out / f"{name}.csv")
        md.append(f"## {title}\n\n{table_markdown(summary, metrics, by_labels)}")

    md.append("## Calibration\n")
    md.append(
        "Per class, on each repeat's pooled out-of-fold predictions, then averaged over repeats "
        "(range over repeats in `calibration.csv`): Brier score; calibration slope b and "
        "intercept a by logistic recalibration with `statsmodels` GLM (binomial): "
        "logit P(y) = a' + b·logit(p) for the slope (ideal 1; < 1 = too extreme), "
        "logit P(y) = a + logit(p) for calibration-in-the-large (ideal 0; > 0 = risks too low). "
        "statsmodels fits the unpenalised MLE and takes the offset, which sklearn's "
        "LogisticRegression does not. Descriptive (no CI): rows of one patient are correlated. "
        "'–' = undefined (one class only, or perfect separation).\n"
    )
    if len(calib):
        _write_csv(calib, out / "calibration.csv")
        show = calib[calib["level"] == figure_level] if figure_level in levels else calib
        show = show[[*GROUP, "level", "class", "n_repeats", "prevalence", "brier", "slope",
                     "intercept"]].copy()  # fmt: skip
        for c in ("prevalence", "brier", "slope", "intercept"):
            show[c] = show[c].map(_fmt)
        md.append(_md_table(show) + "\n")

    md.append("## Significance\n")
    family = (
        f"m = {n_family} tests — {len(perm)} permutation tests (groups × levels) and "
        f"{len(paired)} corrected paired t-tests (variant pairs × levels × metrics "
        f"{', '.join(PAIRED_METRICS)}); `p_holm` is the adjusted p"
    )
    md.append(SIGNIFICANCE.format(perm=permutations, minw=MIN_WILCOXON, family=family))
    if len(perm):
        _write_csv(perm, out / "permutation_tests.csv")
        show = perm.copy()
        for c in ("auc_mean", "p_value", "p_holm"):
            show[c] = show[c].map(_fmt)
        md.append(_md_table(show) + "\n")
    if len(paired):
        _write_csv(paired, out / "paired_tests.csv")
        show = paired.copy()
        for c in ("mean_diff", "t_corrected", "p_value", "p_holm", "w", "p_wilcoxon"):
            show[c] = show[c].map(_fmt)
        md.append(_md_table(show) + "\n")
    else:
        md.append("(no pair of variants shares a split)\n")

    if len(dca):
        _write_csv(dca, out / "decision_curve.csv")
    fig_level = figure_level if figure_level in levels else levels[0]
    figs = figures.report_figures(
        summary,
        _reliability_inputs(ev, "lesion") if "lesion" in ev.data_levels() else pd.DataFrame(),
        _reliability_inputs(ev, fig_level),
        dca,
        {r.group[0]: list(r.classes) for r in repeats},
        out,
        level=fig_level,
        store=store,
        window_hu=window,
    )
    md.append("## Figures\n")
    for title, path in figs:
        md.append(f"### {title}\n\n![{title}]({path.name})\n")
    md.append(checklist_markdown(ev, summary, figs, ci=ci))
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
