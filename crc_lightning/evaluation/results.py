"""Run job folders → repeats → the metric values behind every report cell.

The job folder contract (README "What each stage writes"): ``metrics.json``, ``predictions.csv``
(``patient_id,lesion,crop_id,slice,fold,<CLASS>...,p_<CLASS>...``; one row per test crop, or per
lesion for variants without crops), ``val_predictions.csv`` (the inner-validation rows of each fold,
predicted by that fold's best checkpoint) and ``splits.json``. Older hold-out jobs lack the
``protocol`` key (→ ``holdout``), the ``fold`` column (→ fold 0) and ``val_predictions.csv``
(→ no validation-chosen thresholds).

* A **group** is one (label set, variant, resolution, backbone init, protocol).
* A **repeat** is one seed (and ``split.repeat``) of a group: one ``cv`` job with its k folds, one
  ``holdout`` job, or the k ``kfold`` jobs of that seed, whose folds are pooled into one repeat.
* A **split** is one train/test partition: one fold of a repeat (a hold-out repeat has one).

For every repeat and level this module computes the metrics on the repeat's pooled out-of-fold
predictions (the cell's value) and on each split (what the corrected CI needs), at threshold 0.5
and at the per-class threshold chosen on the same fold's validation predictions.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.evaluation.aggregate import LEVELS, level_tables, prob_columns
from crc_lightning.evaluation.metrics import THRESHOLD, scores
from crc_lightning.evaluation.stats import bootstrap_weights, calibration, choose_threshold
from crc_lightning.io.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "GROUP",
    "METRICS",
    "Evaluation",
    "Job",
    "LevelData",
    "Repeat",
    "bootstrap_values",
    "build_repeats",
    "dedupe",
    "evaluate",
    "find_job_dirs",
    "focus_for",
    "load_job",
    "metric_values",
]

GROUP = ["labels", "variant", "res", "weights", "protocol"]
FOCUS_ALIASES = {"RAS": ("KRAS",)}  # five-class set: RAS → KRAS
PROTOCOLS = ("cv", "holdout", "kfold")
# metric: (label, higher is better, thresholded on validation)
METRICS: dict[str, tuple[str, bool]] = {
    "auc": ("AUC {focus}", True),
    "auc_weighted": ("AUC weighted", True),
    "f1": ("F1 {focus}", True),
    "f1_macro": ("F1 macro", True),
    "sensitivity": ("Sens {focus}", True),
    "specificity": ("Spec {focus}", True),
    "balanced_accuracy": ("Bal. acc. {focus}", True),
    "hamming": ("Hamming", False),
    "brier": ("Brier {focus}", False),
}
THRESHOLDED = ("f1", "f1_macro", "sensitivity", "specificity", "balanced_accuracy", "hamming")
for _m in THRESHOLDED:
    METRICS[f"{_m}@val"] = (METRICS[_m][0] + " @val-thr", METRICS[_m][1])


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
    protocol: str
    fold: int | None  # a kfold job's one fold; None for cv / holdout
    repeat: int
    metrics: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.csv"

    @property
    def val_predictions(self) -> Path:
        return self.path / "val_predictions.csv"

    @property
    def splits_file(self) -> Path:
        return self.path / "splits.json"

    @property
    def hydra_config(self) -> Path:
        return self.path / ".hydra" / "config.yaml"

    @property
    def group(self) -> tuple:
        return (self.labels, self.variant, self.res, self.weights, self.protocol)


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
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(path, f"cannot read metrics.json ({e})") from e
    missing = [k for k in ("variant", "res", "seed", "labels", "classes") if k not in m]
    if missing:
        raise InputError(path, f"not a run result: missing keys {missing}")
    split = m.get("split") or {}
    protocol = str(m.get("protocol") or ("kfold" if split.get("mode") == "kfold" else "holdout"))
    if protocol not in PROTOCOLS:
        raise InputError(path, f"unknown protocol {protocol!r} (expected one of {PROTOCOLS})")
    weights = m.get("weights")
    init = weights.get("init") if isinstance(weights, dict) else weights
    return Job(
        path=job_dir,
        variant=str(m["variant"]),
        res=int(m["res"]),
        seed=int(m["seed"]),
        labels=str(m["labels"]),
        classes=tuple(str(c) for c in m["classes"]),
        weights=str(init or "unknown"),
        protocol=protocol,
        fold=int(split.get("fold", 0)) if protocol == "kfold" else None,
        repeat=int(split.get("repeat", 0) or 0),
        metrics=m.get("metrics") or {},
        raw=m,
    )


def focus_for(classes: Sequence[str], focus: str = "RAS") -> str:
    """The class standing for ``focus`` in this label set (RAS → KRAS in the five-class set)."""
    if focus in classes:
        return focus
    for alias in FOCUS_ALIASES.get(focus, ()):
        if alias in classes:
            return alias
    raise ValueError(f"focus class {focus!r} is not in the label set {list(classes)}")


def dedupe(jobs: Iterable[Job]) -> list[Job]:
    """Drop repeated jobs: the key is the group, seed, split.repeat and (kfold) the fold, so the
    k fold jobs of one seed are all kept."""
    seen: dict[tuple, Job] = {}
    for j in jobs:
        key = (*j.group, j.seed, j.repeat, j.fold)
        if key in seen:
            log.warning("duplicate job %s (same as %s); keeping the first", j.path, seen[key].path)
            continue
        seen[key] = j
    return list(seen.values())


# ------------------------------------------------------------------------------ repeats
@dataclass
class Repeat:
    group: tuple
    seed: int
    repeat: int
    classes: tuple[str, ...]
    jobs: list[Job]
    test: pd.DataFrame  # out-of-fold test rows of every fold, with a ``fold`` column
    val: pd.DataFrame | None  # validation rows of every fold (None: not written)
    folds: dict[int, dict[str, int | None]]  # fold → n_train, n_val, n_test (patients)
    n_splits: int | None = None

    @property
    def protocol(self) -> str:
        return str(self.group[4])

    def test_train_ratio(self) -> float:
        """Mean over the repeat's splits of n_test / n_train (patients)."""
        r = [f["n_test"] / f["n_train"] for f in self.folds.values() if f.get("n_train")]
        return float(np.mean(r)) if r else float("nan")


def _read_rows(path: Path, classes: Sequence[str], fold: int | None) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"patient_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(path, f"cannot read ({e})") from e
    need = ["patient_id", "lesion", *classes, *prob_columns(classes)]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(path, f"lacks columns {missing}")
    if df.empty:
        raise InputError(path, "no rows")
    probs = df[prob_columns(classes)].to_numpy(dtype=float)
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise InputError(path, "p_<CLASS> columns must hold probabilities in [0, 1]")
    if "fold" not in df.columns:
        df["fold"] = 0 if fold is None else fold
    elif fold is not None and (df["fold"] != fold).any():
        raise InputError(path, f"fold column disagrees with the job's split.fold={fold}")
    df["fold"] = df["fold"].astype(int)
    return df


def _fold_sizes(job: Job) -> dict[int, dict[str, int | None]]:
    """fold → patient counts, from metrics.json ``folds``, else its ``split`` block, else
    splits.json."""
    m = job.raw
    if m.get("folds"):
        return {
            int(f["fold"]): {
                "n_train": f.get("n_train_patients"),
                "n_val": f.get("n_val_patients"),
                "n_test": f.get("n_test_patients"),
            }
            for f in m["folds"]
        }
    split = m.get("split") or {}
    if split.get("n_train_patients") and split.get("n_test_patients"):
        return {
            job.fold or 0: {
                "n_train": int(split["n_train_patients"]),
                "n_val": split.get("n_val_patients"),
                "n_test": int(split["n_test_patients"]),
            }
        }
    if job.splits_file.is_file():
        try:
            sp = json.loads(job.splits_file.read_text(encoding="utf-8"))
            return {
                int(f["fold"]): {
                    "n_train": len(f["train"]),
                    "n_val": len(f.get("val", [])),
                    "n_test": len(f["test"]),
                }
                for f in sp["folds"]
            }
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(job.splits_file, f"cannot read the folds ({e})") from e
    raise InputError(
        job.path / "metrics.json",
        "no split sizes (folds[].n_train_patients, split.n_train_patients or splits.json): "
        "the corrected CI needs n_test/n_train",
    )


def build_repeats(jobs: Iterable[Job]) -> list[Repeat]:
    """Group jobs into repeats (kfold jobs of one seed pooled) and read their predictions."""
    by_key: dict[tuple, list[Job]] = {}
    for j in dedupe(jobs):
        by_key.setdefault((j.group, j.seed, j.repeat), []).append(j)
    out = []
    for (group, seed, repeat), members in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        members = sorted(members, key=lambda j: -1 if j.fold is None else j.fold)
        classes = members[0].classes
        if any(j.classes != classes for j in members):
            raise InputError(members[0].path, "jobs of one repeat disagree on the classes")
        tests, vals, folds = [], [], {}
        for j in members:
            if not j.predictions.is_file():
                raise InputError(
                    j.predictions, "missing: the report computes every metric from predictions"
                )
            tests.append(_read_rows(j.predictions, classes, j.fold))
            if j.val_predictions.is_file():
                vals.append(_read_rows(j.val_predictions, classes, j.fold))
            folds.update(_fold_sizes(j))
        test = pd.concat(tests, ignore_index=True)
        where = f"repeat seed={seed} of {members[0].variant} ({members[0].path.parent})"
        twice = test.groupby("patient_id")["fold"].nunique().gt(1)
        if twice.any():
            raise InputError(
                members[0].path, f"{where}: a patient is in the test side of two folds"
            )
        unknown = sorted(set(test["fold"]) - set(folds))
        if unknown:
            raise InputError(members[0].path, f"{where}: folds {unknown} have no split sizes")
        n_splits = (members[0].raw.get("split") or {}).get("n_splits")
        if members[0].protocol == "kfold" and n_splits and len(members) != int(n_splits):
            log.warning("%s: %d of %s kfold jobs found", where, len(members), n_splits)
        out.append(
            Repeat(
                group=group,
                seed=seed,
                repeat=repeat,
                classes=classes,
                jobs=members,
                test=test,
                val=pd.concat(vals, ignore_index=True) if len(vals) == len(members) else None,
                folds={f: folds[f] for f in sorted(set(test["fold"]))},
                n_splits=int(n_splits) if n_splits else None,
            )
        )
    return out


# ------------------------------------------------------------------------------ evaluation
@dataclass
class LevelData:
    """One repeat at one level: its test rows, thresholds and patient codes."""

    test: pd.DataFrame
    classes: tuple[str, ...]
    thresholds: np.ndarray  # [n_rows, C] validation-chosen (0.5 where none could be chosen)
    val_available: bool
    n_fallback: int  # (fold, class) pairs whose validation side lacked a class → 0.5

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = self.test[list(self.classes)].to_numpy(dtype=np.int64)
        p = self.test[prob_columns(self.classes)].to_numpy(dtype=float)
        codes = pd.factorize(self.test["patient_id"], sort=True)[0]
        return y, p, codes

    def patients(self) -> np.ndarray:
        """The patient ids in the order of the codes of :meth:`arrays`."""
        return np.asarray(pd.factorize(self.test["patient_id"], sort=True)[1])


def metric_values(
    sc: dict[str, np.ndarray], sc_val: dict[str, np.ndarray] | None, focus: int
) -> dict[str, np.ndarray]:
    """The report's metrics (arrays over the resamples of :func:`metrics.scores`)."""
    out = {
        "auc": sc["auc"][:, focus],
        "auc_weighted": sc["auc_weighted"],
        "f1_macro": sc["f1_macro"],
        "hamming": sc["hamming"],
        **{m: sc[m][:, focus] for m in ("f1", "sensitivity", "specificity", "balanced_accuracy")},
        "brier": sc["brier"][:, focus],
    }
    for m in THRESHOLDED:
        if sc_val is None:
            out[f"{m}@val"] = np.full_like(out["auc"], np.nan)
        else:
            out[f"{m}@val"] = sc_val[m][:, focus] if sc_val[m].ndim == 2 else sc_val[m]
    return out


def _level_data(rep: Repeat, test: pd.DataFrame, val: pd.DataFrame | None, rule: str) -> LevelData:
    classes = list(rep.classes)
    test = test.reset_index(drop=True)
    thr = np.full((len(test), len(classes)), THRESHOLD)
    fallback = 0
    if val is not None:
        vf = val["fold"].to_numpy()
        vy = val[classes].to_numpy(dtype=np.int64)
        vp = val[prob_columns(classes)].to_numpy(dtype=float)
        tf = test["fold"].to_numpy()
        for f in rep.folds:
            v, rows = vf == f, tf == f
            for k in range(len(classes)):
                t = choose_threshold(vy[v, k], vp[v, k], rule)
                if t is None:
                    fallback += 1
                else:
                    thr[rows, k] = t
    return LevelData(test, tuple(classes), thr, val is not None, fallback)


def bootstrap_values(
    ld: LevelData, focus: int, n_boot: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Every report metric on ``n_boot`` patient-clustered bootstrap resamples of ``ld`` (a
    patient is drawn with all its rows; thresholds stay those chosen on validation)."""
    y, p, codes = ld.arrays()
    w = bootstrap_weights(int(codes.max()) + 1, n_boot, seed)
    sc = scores(y, p, THRESHOLD, codes, w)
    sv = scores(y, p, ld.thresholds, codes, w) if ld.val_available else None
    return metric_values(sc, sv, focus)


@dataclass
class Evaluation:
    repeats: list[Repeat]
    results: pd.DataFrame  # one row per repeat × level × scope (repeat = pooled | fold)
    calibration: pd.DataFrame  # one row per repeat × level × class
    data: dict[tuple, LevelData]  # (group, seed, repeat, level) → LevelData
    focus: str
    aggregation: str
    threshold_rule: str

    def focus_of(self, classes: Sequence[str]) -> str:
        return focus_for(classes, self.focus)

    def data_levels(self) -> set[str]:
        return {k[3] for k in self.data}


def evaluate(
    repeats: Sequence[Repeat],
    levels: Sequence[str] = LEVELS,
    focus: str = "RAS",
    aggregation: str = "max",
    threshold_rule: str = "youden",
    with_calibration: bool = True,
) -> Evaluation:
    """Metrics of every repeat (pooled out-of-fold) and split (fold), at every level
    (``with_calibration``: also the per-class calibration fits, the slow part)."""
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ValueError(f"unknown levels {unknown}; choose from {list(LEVELS)}")
    rows, cal_rows, data = [], [], {}
    for rep in repeats:
        classes = list(rep.classes)
        fc = focus_for(classes, focus)
        fi = classes.index(fc)
        head = {
            **dict(zip(GROUP, rep.group, strict=True)),
            "seed": rep.seed,
            "repeat": rep.repeat,
            "focus": fc,
        }
        lesions_of = rep.test.groupby("patient_id")["lesion"].nunique()
        try:
            tests = level_tables(rep.test, classes, aggregation)
            vals = None if rep.val is None else level_tables(rep.val, classes, aggregation)
        except ValueError as e:
            raise InputError(rep.jobs[0].path, str(e)) from e
        for level in levels:
            ld = _level_data(
                rep, tests[level], None if vals is None else vals[level], threshold_rule
            )
            data[(rep.group, rep.seed, rep.repeat, level)] = ld
            y, p, codes = ld.arrays()
            lesions = lesions_of.reindex(ld.patients()).to_numpy(dtype=float)
            folds = ld.test["fold"].to_numpy()
            scopes: list[tuple[str, int | None, np.ndarray]] = [
                ("repeat", None, np.ones(len(y), bool))
            ]
            scopes += [("fold", int(f), folds == f) for f in rep.folds]
            for scope, fold, m in scopes:
                if not m.any():
                    continue
                sc = scores(y[m], p[m], THRESHOLD)
                sv = scores(y[m], p[m], ld.thresholds[m]) if ld.val_available else None
                values = {k: float(v[0]) for k, v in metric_values(sc, sv, fi).items()}
                sizes = rep.folds[fold] if fold is not None else {}
                present = np.unique(codes[m])
                rows.append(
                    {
                        **head,
                        "level": level,
                        "scope": scope,
                        "fold": fold,
                        "n_patients": int(present.size),
                        "n_lesions": int(lesions[present].sum()),
                        "n_rows": int(m.sum()),
                        "n_train": sizes.get("n_train"),
                        "n_test": sizes.get("n_test"),
                        "ratio": rep.test_train_ratio(),
                        "supports": tuple(int(s) for s in sc["support"][0]),
                        **values,
                    }
                )
            for k, c in enumerate(classes if with_calibration else []):
                cal = calibration(y[:, k], p[:, k])
                cal_rows.append(
                    {
                        **head,
                        "level": level,
                        "class": c,
                        "n": len(y),
                        "prevalence": float(y[:, k].mean()),
                        "brier": float(np.mean((p[:, k] - y[:, k]) ** 2)),
                        "slope": cal["slope"],
                        "intercept": cal["intercept"],
                    }
                )
    return Evaluation(
        repeats=list(repeats),
        results=pd.DataFrame(rows),
        calibration=pd.DataFrame(cal_rows),
        data=data,
        focus=focus,
        aggregation=aggregation,
        threshold_rule=threshold_rule,
    )
