"""Hand-made run job folders in the contract the report reads (no training).

``write_jobs`` writes, for each seed, what ``python -m crc_lightning.run`` writes: ``metrics.json``
(protocol, split, folds with their sizes), ``predictions.csv`` (every test row with its ``fold``),
``val_predictions.csv`` (each fold's validation rows), ``splits.json`` and ``.hydra/config.yaml``.
Truths come from a cohort table (one row per lesion, gene columns); the probabilities come from a
caller's ``score`` function, so every test knows the numbers it feeds in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

GENES = ("KRAS", "NRAS", "BRAF", "PIK3CA")
LABELS = {
    "three": {"RAS": ("KRAS", "NRAS"), "PIK3CA_BRAF": ("PIK3CA", "BRAF"), "OTHER": ()},
    "five": {"KRAS": ("KRAS",), "NRAS": ("NRAS",), "BRAF": ("BRAF",), "PIK3CA": ("PIK3CA",),
             "OTHER": ()},
}  # fmt: skip
# score(rows, rng, seed, fold, side) -> probabilities [len(rows), C]; rows carry the class columns
Score = Callable[[pd.DataFrame, np.random.Generator, int, int, str], np.ndarray]


def classes_of(labels: str) -> list[str]:
    return list(LABELS[labels])


def class_truth(cohort: pd.DataFrame, labels: str) -> pd.DataFrame:
    """Class columns of a label set from gene columns (OTHER = no gene)."""
    out = pd.DataFrame(index=cohort.index)
    for c, genes in LABELS[labels].items():
        out[c] = (
            cohort[list(genes)].max(axis=1).astype(int)
            if genes
            else (cohort[list(GENES)].sum(axis=1) == 0).astype(int)
        )
    return out


def cohort(
    n_patients: int = 30,
    seed: int = 0,
    max_lesions: int = 3,
    prevalence: Sequence[float] = (0.45, 0.1, 0.1, 0.2),
) -> pd.DataFrame:
    """One row per lesion: patient_id, lesion, KRAS, NRAS, BRAF, PIK3CA. A patient's lesions
    share its genes (lesion 1 of every third patient differs: mixed patients exist)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        genes = (rng.random(4) < np.asarray(prevalence)).astype(int)
        for les in range(1, int(rng.integers(1, max_lesions + 1)) + 1):
            g = genes.copy()
            if i % 3 == 0 and les == 2:
                g = np.zeros(4, int)
            rows.append({"patient_id": f"P{i:03d}", "lesion": les, **dict(zip(GENES, g.tolist()))})
    return pd.DataFrame(rows)


def _folds(patients: list[str], k: int, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(1000 + seed)
    order = rng.permutation(len(patients))
    return {patients[j]: int(i % k) for i, j in enumerate(order)}


def _rows(cohort: pd.DataFrame, labels: str, slices: int) -> pd.DataFrame:
    truth = pd.concat([cohort[["patient_id", "lesion"]], class_truth(cohort, labels)], axis=1)
    reps = truth.loc[truth.index.repeat(slices)].reset_index(drop=True)
    reps["slice"] = reps.groupby(["patient_id", "lesion"]).cumcount()
    reps["crop_id"] = [f"c{i}" for i in range(len(reps))]
    return reps


def _frame(rows: pd.DataFrame, classes: list[str], probs: np.ndarray, fold: int) -> pd.DataFrame:
    out = rows[["patient_id", "lesion", "crop_id", "slice"]].copy()
    out["fold"] = fold
    for c in classes:
        out[c] = rows[c].to_numpy()
    for i, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, i]
    return out


def write_jobs(
    root: Path,
    cohort: pd.DataFrame,
    score: Score,
    *,
    variant: str = "baseline",
    labels: str = "three",
    seeds: Sequence[int] = (0, 1, 2),
    protocol: str = "cv",
    k: int = 5,
    res: int = 64,
    init: str = "imagenet",
    slices: int = 2,
    test_size: float = 0.2,
    with_val: bool = True,
    legacy: bool = False,
    holdout_test: Sequence[str] | None = None,
) -> list[Path]:
    """Job folders of one group; returns them. ``protocol``: ``cv`` (one job per seed, k folds),
    ``kfold`` (one job per seed and fold) or ``holdout`` (one job per seed, one test set).
    ``legacy=True`` writes today's hold-out job (no protocol key, no fold column, no
    val_predictions.csv, no splits.json); ``holdout_test`` fixes the hold-out test patients."""
    classes = classes_of(labels)
    rows = _rows(cohort, labels, slices)
    patients = sorted(cohort["patient_id"].unique())
    written = []
    for seed in seeds:
        rng = np.random.default_rng(seed * 7919 + len(variant) + 31 * res)
        if protocol == "holdout":
            order = np.random.default_rng(2000 + seed).permutation(patients)
            n_test = max(1, round(test_size * len(patients)))
            fold_of = {p: (0 if i < n_test else -1) for i, p in enumerate(order)}
            if holdout_test is not None:
                fold_of = {p: (0 if p in holdout_test else -1) for p in patients}
            folds = [0]
        else:
            fold_of = _folds(patients, k, seed)
            folds = list(range(k))
        split_folds, tests, vals, fold_meta = [], [], [], []
        for f in folds:
            test_p = sorted(p for p in patients if fold_of[p] == f)
            rest = [p for p in patients if p not in test_p]
            nv = max(1, len(rest) // 5)
            val_p = sorted(np.random.default_rng(3000 + 10 * seed + f).permutation(rest)[:nv])
            train_p = sorted(set(rest) - set(val_p))
            split_folds.append({"fold": f, "train": train_p, "val": val_p, "test": test_p})
            fold_meta.append({
                "fold": f, "best_epoch": 3, "val": {"loss": 0.6, "auc": 0.5},
                "n_train_patients": len(train_p), "n_val_patients": len(val_p),
                "n_test_patients": len(test_p),
            })  # fmt: skip
            t = rows[rows["patient_id"].isin(test_p)]
            tests.append(_frame(t, classes, score(t, rng, seed, f, "test"), f))
            v = rows[rows["patient_id"].isin(val_p)]
            vals.append(_frame(v, classes, score(v, rng, seed, f, "val"), f))
        jobs = [(None, tests, vals, fold_meta)] if protocol != "kfold" else [
            (f, [tests[f]], [vals[f]], [fold_meta[f]]) for f in folds
        ]  # fmt: skip
        for f, t_list, v_list, meta in jobs:
            name = f"{variant}_{labels}_{res}_{init}_{protocol}_s{seed}" + (
                "" if f is None else f"_f{f}"
            )
            d = root / name
            (d / ".hydra").mkdir(parents=True, exist_ok=True)
            test = pd.concat(t_list, ignore_index=True)
            split = {
                "mode": protocol if protocol != "cv" else "cv",
                "n_splits": k if protocol != "holdout" else 1,
                "seed": seed,
                "repeat": 0,
                "n_patients": len(patients),
                "n_test_patients": int(test["patient_id"].nunique()),
                "test_size": test_size,
                "val_size": 0.2,
            }
            if f is not None:
                split["fold"] = f
            if protocol != "cv":  # one split per job: its sizes in the split block too
                split["n_train_patients"] = meta[0]["n_train_patients"]
                split["n_val_patients"] = meta[0]["n_val_patients"]
            m = {
                "variant": variant, "res": res, "seed": seed, "labels": labels,
                "classes": classes, "split": split,
                "weights": {"init": init, "file": None, "sha256": None},
                "data": {"name": "synthetic", "store_hash": "abc"},
                "best_epoch": 3, "val": {"loss": 0.6, "auc": 0.5}, "metrics": {},
                "protocol": protocol, "folds": meta, "config_hash": "f00d" * 4,
                "package_version": "0.2.0",
            }  # fmt: skip
            if legacy:
                for key in ("protocol", "folds", "config_hash", "package_version"):
                    m.pop(key)
                m["split"] = {"mode": "holdout", "fold": 0, "repeat": 0, "seed": seed,
                              "n_train_patients": meta[0]["n_train_patients"],
                              "n_val_patients": meta[0]["n_val_patients"],
                              "n_test_patients": meta[0]["n_test_patients"]}  # fmt: skip
                test = test.drop(columns=["fold"])
            (d / "metrics.json").write_text(json.dumps(m))
            test.to_csv(d / "predictions.csv", index=False)
            if with_val and not legacy:
                pd.concat(v_list, ignore_index=True).to_csv(d / "val_predictions.csv", index=False)
            if not legacy:
                sp = {"protocol": protocol, "seed": seed, "n_splits": split["n_splits"],
                      "stratified_on": list(GENES),
                      "folds": [s for s in split_folds if f is None or s["fold"] == f]}  # fmt: skip
                (d / "splits.json").write_text(json.dumps(sp))
            (d / ".hydra" / "config.yaml").write_text(
                f"res: {res}\nseed: {seed}\nlogger: {{}}\nmodel:\n  backbone:\n    name: efficientnet_b0\n"
                f"    weights: {init}\n  attention: false\n  optimizer:\n    _target_: torch.optim.SGD\n"
                "    lr: 0.001\ndatamodule:\n  batch_size: 16\n  balance: true\ntrainer:\n  max_epochs: 5\n"
            )
            written.append(d)
    return written


ALL_CLASSES = {c for classes in LABELS.values() for c in classes}


def truth_of(rows: pd.DataFrame) -> np.ndarray:
    """The class columns of score rows, in the label set's order, as [n, C]."""
    return rows[[c for c in rows.columns if c in ALL_CLASSES]].to_numpy(float)


def noise_score(
    rows: pd.DataFrame, rng: np.random.Generator, seed: int, fold: int, side: str
) -> np.ndarray:
    """Probabilities independent of the truth."""
    return rng.random(truth_of(rows).shape)


def constant_score(value: float = 0.7) -> Score:
    """The same probability for every class of every row (an image-blind model)."""

    def score(rows, rng, seed, fold, side):
        return np.full(truth_of(rows).shape, value)

    return score


def signal_score(strength: float = 0.35) -> Score:
    """Probabilities that lean toward the truth by ``strength``."""

    def score(rows, rng, seed, fold, side):
        y = truth_of(rows)
        return np.clip((1 - strength) * rng.random(y.shape) + strength * y, 0, 1)

    return score
