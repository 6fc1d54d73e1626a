"""Report figures (matplotlib, Agg backend; no patient ids anywhere in them).

* Fig 1 — label co-occurrence and correlation (phi) of the test truths, one lesion counted once;
* Fig 2 — sample crops per gene class (only with a crop store);
* Fig 3 — focus-class F1 and AUC per variant, 5 vs 3 classes, bars with CI error bars (one per res);
* Figs 4–5 — AUC and Hamming loss by resolution per variant (one per label set);
* ROC curves per class at lesion level, predictions pooled over seeds.
"""

from __future__ import annotations

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
    "report_figures",
    "roc_figure",
    "sample_crops_figure",
]

LABEL_NAMES = {"auc": "AUC", "f1": "F1 (focus)", "hamming": "Hamming loss", "f1_macro": "F1 macro"}


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
    """One axes per metric; bars = each ``x`` value × each ``hue`` value, CI half-widths as error bars.

    A missing CI (n = 1) draws no error bar; the baseline of the first bar group is a dashed line.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    xs = sorted(summary[x].unique(), key=str)
    hues = sorted(summary[hue].unique(), key=str)
    width = 0.8 / max(len(hues), 1)
    for ax, metric in zip(axes[0], metrics, strict=True):
        s = summary[summary["metric"] == metric]
        for i, h in enumerate(hues):
            vals, errs = [], []
            for xv in xs:
                r = s[(s[x] == xv) & (s[hue] == h)]
                mean = r["mean"].iloc[0] if len(r) else np.nan
                half = r["ci_half"].iloc[0] if len(r) else np.nan
                vals.append(np.nan if mean is None else mean)
                errs.append(0.0 if half is None or pd.isna(half) else half)
            pos = np.arange(len(xs)) + (i - (len(hues) - 1) / 2) * width
            ax.bar(pos, vals, width, yerr=errs, capsize=3, label=f"{hue}={h}")
        if len(s):
            ax.axhline(float(s["baseline"].iloc[0]), ls="--", color="grey", lw=1, label="baseline")
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


def report_figures(
    summary: pd.DataFrame,
    lesions: pd.DataFrame,
    jobs: Sequence[Any],
    out: Path,
    level: str = "lesion",
    store: str | Path | None = None,
    window_hu: tuple[float, float] | None = None,
) -> list[tuple[str, Path]]:
    """Every figure of the report, as ``(title, path)``."""
    figs: list[tuple[str, Path]] = []
    classes_of = {j.labels: list(j.classes) for j in jobs}
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
        t = f"Fig 4 — AUC by resolution ({labels}, {level} level)"
        figs.append(
            (t, bar_chart(sl, ["auc"], "res", "variant", out / f"fig4_auc_{labels}.png", t))
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
            t = f"ROC per class, lesion level, pooled over seeds ({labels})"
            figs.append((t, roc_figure(g, classes, out / f"roc_{labels}.png", t)))
    if store:
        if window_hu is None:
            raise ValueError("the sample-crops figure needs the CT window (window_hu)")
        p = sample_crops_figure(store, out / "fig2_sample_crops.png", window_hu)
        if p is not None:
            figs.append(("Fig 2 — sample crops per class", p))
    return figs
