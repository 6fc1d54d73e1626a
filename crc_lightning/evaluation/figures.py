"""Report figures (matplotlib, Agg backend; no patient ids anywhere in them).

* Fig 1 — label co-occurrence and correlation (phi) of the test truths, one lesion counted once;
* Fig 2 — sample crops per gene class (only with a crop store);
* Fig 3 — focus-class F1 and AUC per variant, 5 vs 3 classes, bars with CI error bars (one per res);
* Figs 4–5 — weighted AUC and Hamming loss by resolution per variant (one per label set);
* ROC curves per class at lesion level, predictions pooled over repeats;
* reliability diagrams per class (one per label set) and the RAS decision curve (patient level).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from crc_lightning.cropstore.format import GENES
from crc_lightning.cropstore.reader import CropStore
from crc_lightning.data.inputs import window
from crc_lightning.io.files import atomic_path

__all__ = [
    "bar_chart",
    "cooccurrence_figure",
    "decision_curve_figure",
    "reliability_figure",
    "report_figures",
    "roc_figure",
    "sample_crops_figure",
]

LABEL_NAMES = {
    "auc": "AUC (focus)",
    "auc_weighted": "AUC (weighted)",
    "f1": "F1 (focus)",
    "hamming": "Hamming loss",
    "f1_macro": "F1 macro",
}


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def bar_chart(
    summary: pd.DataFrame, metrics: Sequence[str], x: str, hue: str, path: Path, title: str
) -> Path:
    """One axes per metric; bars = each ``x`` value × each ``hue`` value, CIs as error bars.

    The CI is drawn as it is in the table (clipped, so possibly asymmetric); none for a cell
    without one. Each bar carries its *own* baseline as a dashed black segment across it (a
    five-class KRAS baseline is never drawn under three-class RAS bars).
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    xs = sorted(summary[x].unique(), key=str)
    hues = sorted(summary[hue].unique(), key=str)
    width = 0.8 / max(len(hues), 1)
    for ax, metric in zip(axes[0], metrics, strict=True):
        s = summary[summary["metric"] == metric]
        for i, h in enumerate(hues):
            vals, lo, hi, base = [], [], [], []
            for xv in xs:
                r = s[(s[x] == xv) & (s[hue] == h)]
                mean = r["mean"].iloc[0] if len(r) else None
                mean = np.nan if mean is None or pd.isna(mean) else float(mean)
                low = r["ci_low"].iloc[0] if len(r) else None
                high = r["ci_high"].iloc[0] if len(r) else None
                has = low is not None and not pd.isna(low) and np.isfinite(mean)
                vals.append(mean)
                lo.append(mean - float(low) if has else 0.0)
                hi.append(float(high) - mean if has else 0.0)
                base.append(float(r["baseline"].iloc[0]) if len(r) else np.nan)
            pos = np.arange(len(xs)) + (i - (len(hues) - 1) / 2) * width
            ax.bar(pos, vals, width, yerr=[lo, hi], capsize=3, label=f"{hue}={h}")
            ok = np.isfinite(base)
            ax.hlines(
                np.asarray(base)[ok],
                pos[ok] - width / 2,
                pos[ok] + width / 2,
                colors="k",
                linestyles="--",
                lw=1,
                label="baseline (per bar)" if i == 0 else None,
                gid="baseline",
            )
        ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs])
        ax.set_xlabel(x)
        ax.set_ylabel(LABEL_NAMES.get(metric, metric))
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def cooccurrence_figure(
    truth: pd.DataFrame, classes: Sequence[str], path: Path, title: str
) -> Path:
    """Co-occurrence counts and phi correlation of the class columns of ``truth`` (one row per lesion)."""
    y = truth[list(classes)].to_numpy(dtype=float)
    counts = y.T @ y
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(y.T) if len(y) > 1 else np.full((len(classes),) * 2, np.nan)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, mat, name, fmt in (
        (axes[0], counts, "co-occurrence (lesions)", "{:.0f}"),
        (axes[1], corr, "correlation (phi)", "{:.2f}"),
    ):
        im = ax.imshow(mat, cmap="viridis")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    fmt.format(mat[i, j]) if np.isfinite(mat[i, j]) else "–",
                    ha="center",
                    va="center",
                    color="w",
                    fontsize=8,
                )
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    return _save(fig, path)


def roc_figure(lesions: pd.DataFrame, classes: Sequence[str], path: Path, title: str) -> Path:
    """Grid rows = variant, cols = res; one ROC curve per class, lesion predictions pooled over seeds."""
    from sklearn.metrics import roc_auc_score, roc_curve

    variants = sorted(lesions["variant"].unique())
    resolutions = sorted(lesions["res"].unique())
    fig, axes = plt.subplots(
        len(variants),
        len(resolutions),
        figsize=(4 * len(resolutions), 3.6 * len(variants)),
        squeeze=False,
    )
    for (i, v), (j, r) in ((a, b) for a in enumerate(variants) for b in enumerate(resolutions)):
        ax = axes[i][j]
        g = lesions[(lesions["variant"] == v) & (lesions["res"] == r)]
        for c in classes:
            y, p = g[c].to_numpy(), g[f"p_{c}"].to_numpy()
            if len(g) and 0 < y.sum() < len(y):
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, label=f"{c} ({roc_auc_score(y, p):.2f})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set_title(f"{v}, {r}px (seeds {g['seed'].nunique()})", fontsize=9)
        ax.set_xlabel("1 − specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def sample_crops_figure(
    store: str | Path,
    path: Path,
    window_hu: tuple[float, float],
    per_class: int = 4,
    seed: int = 0,
) -> Path | None:
    """A few crops per gene (and OTHER = no gene) from the crop store, shown through the CT window
    ``window_hu`` = (width, level); None if the store is unlabelled."""
    cs = CropStore(store)
    idx = cs.index
    genes = [g for g in GENES if g in idx.columns]
    idx = idx.dropna(subset=genes)
    if idx.empty:
        return None
    gene_mat = idx[genes].astype(int)
    groups = {g: idx[gene_mat[g] == 1] for g in genes}
    groups["OTHER"] = idx[gene_mat.sum(axis=1) == 0]
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(
        len(groups), per_class, figsize=(2 * per_class, 2 * len(groups)), squeeze=False
    )
    for i, (name, g) in enumerate(groups.items()):
        pick = g.iloc[rng.permutation(len(g))[:per_class]] if len(g) else g
        for j in range(per_class):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(pick):
                hu = cs.load(pick["crop_id"].iloc[j])
                ax.imshow(window(hu, *window_hu), cmap="gray", vmin=0, vmax=255)
        axes[i][0].set_title(name, fontsize=9, loc="left")
    width, level = window_hu
    fig.suptitle(f"Fig 2 — sample crops per class (W{width:g}/L{level:g})")
    return _save(fig, path)


def _arm(r: Any) -> str:
    extra = "" if r.protocol == "cv" else f" {r.protocol}"
    return f"{r.variant} ({r.weights}) {r.res}px{extra}"


def reliability_figure(rows: pd.DataFrame, classes: Sequence[str], path: Path, title: str) -> Path:
    """One axes per class: observed event rate against mean predicted probability in quantile
    bins (``sklearn.calibration.calibration_curve``), one line per variant × res, rows of all
    repeats pooled; the diagonal is perfect calibration."""
    from sklearn.calibration import calibration_curve

    fig, axes = plt.subplots(1, len(classes), figsize=(3.6 * len(classes), 3.6), squeeze=False)
    arms = rows.assign(arm=[_arm(r) for r in rows.itertuples()])
    for ax, c in zip(axes[0], classes, strict=True):
        for arm, g in arms.groupby("arm", sort=True):
            y, p = g[c].to_numpy(int), g[f"p_{c}"].to_numpy(float)
            if 0 < y.sum() < len(y):
                frac, mean = calibration_curve(y, p, n_bins=10 if len(y) >= 100 else 5,
                                               strategy="quantile")  # fmt: skip
                ax.plot(mean, frac, marker="o", ms=3, label=arm)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed fraction")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=6, loc="lower right")
    fig.suptitle(title)
    return _save(fig, path)


def decision_curve_figure(dca: pd.DataFrame, path: Path, title: str) -> Path:
    """Net benefit against threshold probability per variant × res, with act-for-all and
    act-for-none."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    arms = dca.assign(arm=[_arm(r) for r in dca.itertuples()])
    for arm, g in arms.groupby("arm", sort=True):
        ax.plot(g["threshold"], g["net_benefit"], lw=1.5, label=arm)
    first = arms[arms["arm"] == arms["arm"].iloc[0]]
    ax.plot(first["threshold"], first["treat_all"], color="grey", lw=1, label="withhold for all")
    ax.axhline(0.0, color="k", lw=1, label="withhold for none")
    top = float(max(dca["treat_all"].max(), dca["net_benefit"].max()))
    ax.set_ylim(-0.05, max(top, 0.05) + 0.05)
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold probability of RAS mutation")
    ax.set_ylabel("net benefit")
    ax.legend(fontsize=7)
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)  # long: two lines
    return _save(fig, path)


def report_figures(
    summary: pd.DataFrame,
    lesions: pd.DataFrame,
    level_rows: pd.DataFrame,
    dca: pd.DataFrame,
    classes_of: dict[str, list[str]],
    out: Path,
    level: str = "lesion",
    store: str | Path | None = None,
    window_hu: tuple[float, float] | None = None,
) -> list[tuple[str, Path]]:
    """Every figure of the report, as ``(title, path)``.

    ``lesions``: lesion-level test rows of every repeat (ROC, co-occurrence); ``level_rows``: the
    same at ``level`` (reliability); ``dca``: :func:`report.decision_curves`."""
    figs: list[tuple[str, Path]] = []
    s = summary[summary["level"] == level]
    for res in sorted(s["res"].unique()):
        t = f"Fig 3 — focus F1 and AUC per variant, 5 vs 3 classes ({res}px, {level} level)"
        figs.append(
            (
                t,
                bar_chart(
                    s[s["res"] == res],
                    ["f1", "auc"],
                    "variant",
                    "labels",
                    out / f"fig3_f1_auc_res{res}.png",
                    t,
                ),
            )
        )
    for labels in sorted(s["labels"].unique()):
        sl = s[s["labels"] == labels]
        t = f"Fig 4 — weighted AUC by resolution ({labels}, {level} level)"
        figs.append(
            (
                t,
                bar_chart(
                    sl, ["auc_weighted"], "res", "variant", out / f"fig4_auc_{labels}.png", t
                ),
            )
        )
        t = f"Fig 5 — Hamming loss by resolution ({labels}, {level} level)"
        figs.append(
            (t, bar_chart(sl, ["hamming"], "res", "variant", out / f"fig5_hamming_{labels}.png", t))
        )
    if not lesions.empty:
        for labels, g in lesions.groupby("labels"):
            classes = classes_of[labels]
            uniq = g.drop_duplicates(["patient_id", "lesion"])
            t = f"Fig 1 — label co-occurrence in the test truths ({labels}, {len(uniq)} lesions)"
            figs.append(
                (t, cooccurrence_figure(uniq, classes, out / f"fig1_cooccurrence_{labels}.png", t))
            )
            t = f"ROC per class, lesion level, pooled over repeats ({labels})"
            figs.append((t, roc_figure(g, classes, out / f"roc_{labels}.png", t)))
    if not level_rows.empty:
        for labels, g in level_rows.groupby("labels"):
            t = f"Reliability diagram per class ({labels}, {level} level, repeats pooled)"
            figs.append(
                (t, reliability_figure(g, classes_of[labels], out / f"reliability_{labels}.png", t))
            )
    if not dca.empty:
        for labels, g in dca.groupby("labels"):
            t = (
                f"Decision curve — withhold anti-EGFR therapy while the biopsy is pending "
                f"(RAS, patient level, {labels})"
            )
            figs.append((t, decision_curve_figure(g, out / f"decision_curve_{labels}.png", t)))
    if store:
        if window_hu is None:
            raise ValueError("the sample-crops figure needs the CT window (window_hu)")
        p = sample_crops_figure(store, out / "fig2_sample_crops.png", window_hu)
        if p is not None:
            figs.append(("Fig 2 — sample crops per class", p))
    return figs
