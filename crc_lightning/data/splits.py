"""Patient-grouped, label-stratified train/val/test splits, and the folds a ``run`` job trains.

Two rules from the paper drive everything here:

* **No patient on two sides.** Splits are made over *patients*, never over crops or lesions, so a
  model cannot score by recognising a patient it has seen in training.
* **Label distribution kept.** Each patient gets a label vector = OR over its lesions (crops) of the
  class matrix, and the patients are split by iterative multi-label stratification (Sechidis et al.
  2011, ``iterstrat``), so every side has about the cohort's prevalence of every class. K-fold
  keeps the best stratified of 8 seeded iterstrat partitions (:func:`_fold_assignment`).

What a job is stratified on: the **five-gene matrix** (KRAS, NRAS, BRAF, PIK3CA, OTHER = none of
them; :func:`gene_matrix`), whatever label set the job trains, so a five-class and a three-class job
of one seed test exactly the same patients (paired comparisons).

Protocols (``conf/split/<cv|holdout|kfold>.yaml``; :func:`plan_folds` → :class:`FoldPlan`):

* ``cv`` (default): one job trains the ``n_splits`` folds of the stratified k-fold partition of
  seed ``seed + repeat``; every patient is tested exactly once, out of fold, so ``seed=0..4`` is
  five repeats of a k-fold cross-validation;
* ``holdout``: the paper's protocol, one stratified 90 % / 10 % split per seed;
* ``kfold``: fold ``fold`` of the same partition as ``cv`` (one fold per job, for clusters):
  ``split=kfold split.fold=0..4`` trains exactly the folds of one ``split=cv`` job.

``split.file=<splits.json>`` gives back the folds a job wrote (:func:`read_splits_file`), checked
against the store's patients.

Sizes: ``test_size`` and ``val_size`` are fractions of the *whole* cohort's patients (the paper's
90 % / 10 % train/test, and a validation set carved out of the training patients the same way). In
k-fold mode the test side is one fold (≈ 1/k of the patients) and ``val_size`` is again a fraction
of the whole cohort, taken from that fold's training patients (inner validation for early stopping).

Sizes are exact: iterative stratification only approximates the requested count, so the result
is corrected one patient at a time, each move keeping the side's label prevalence closest to the
pool's (:func:`_fix_size`). K-fold fold sizes are left as stratification makes them (⌊P/k⌋ or
⌈P/k⌉, sometimes ±1 more).

Small cohorts: every side gets at least one patient. Fractions round to the nearest count but never
below 1 (so 5 patients at 10 % still give 1 test and 1 val patient, and 3 patients give 1/1/1), and
if k-fold stratification ever leaves a fold empty, one patient of the largest fold is moved into
it, chosen by the seeded generator. Fewer than 3 patients, or fewer than ``n_splits + 1`` in k-fold
mode, is an error: there is no honest split.

Seeds: a hold-out split is a pure function of (patients, labels, seed). K-fold repeat ``r`` of
``kfold_splits(..., seed=s)`` uses the fold assignment of seed ``s + r``; ``split.repeat`` is an
extra offset on the job's seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit

from crc_lightning.cropstore.format import GENES
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import sha256_file

__all__ = [
    "PROTOCOLS",
    "STRATIFY_CLASSES",
    "FoldPlan",
    "Split",
    "gene_matrix",
    "holdout_split",
    "kfold_splits",
    "patient_labels",
    "plan_folds",
    "read_splits_file",
    "split_for",
]

PATIENT = "patient_id"
PROTOCOLS = ("cv", "holdout", "kfold")
# what every split is stratified on: the four genes of the manifest and OTHER (none of them)
STRATIFY_CLASSES = (*GENES, "OTHER")


@dataclass(frozen=True)
class Split:
    """Patient ids of each side (sorted, disjoint) and where the split came from."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mode: str = "holdout"
    fold: int = 0
    repeat: int = 0
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def side_of(self, patient_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """``"train"|"val"|"test"|""`` for each patient id (``""`` = in no side, e.g. excluded)."""
        ids = np.asarray(patient_ids).astype(str)
        out = np.full(ids.shape, "", dtype=object)
        for name in ("train", "val", "test"):
            out[np.isin(ids, getattr(self, name).astype(str))] = name
        return out

    def summary(self) -> dict[str, Any]:
        """The ``split`` block of ``metrics.json``."""
        return {
            "mode": self.mode,
            "fold": int(self.fold),
            "repeat": int(self.repeat),
            "seed": int(self.seed),
            "n_train_patients": len(self.train),
            "n_val_patients": len(self.val),
            "n_test_patients": len(self.test),
        }


def patient_labels(
    patients_df: pd.DataFrame, label_columns: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique patient ids, patient label matrix [P, C] as bool).

    ``patients_df`` has a ``patient_id`` column and 0/1 label columns (default: every other column);
    it may hold several rows per patient (one per lesion or crop): a patient is positive for a class
    when any of its rows is, which is the patient-level truth used in the metrics too.
    """
    if PATIENT not in patients_df.columns:
        raise ValueError(f"patients_df needs a {PATIENT!r} column, got {list(patients_df.columns)}")
    cols = (
        list(label_columns)
        if label_columns is not None
        else [c for c in patients_df.columns if c != PATIENT]
    )
    if not cols:
        raise ValueError("patients_df has no label columns to stratify on")
    if len(patients_df) == 0:
        raise ValueError("patients_df is empty: no patients to split")
    labels = patients_df[cols]
    if labels.isna().any().any():
        raise ValueError("patients_df has missing labels; drop unlabelled rows before splitting")
    grouped = labels.astype(np.int64).astype(bool).groupby(patients_df[PATIENT].astype(str)).any()
    grouped = grouped.sort_index()
    return grouped.index.to_numpy(dtype=object), grouped.to_numpy(dtype=bool)


def _stratify_target(y: np.ndarray) -> np.ndarray:
    """``iterstrat`` wants a multilabel indicator with ≥ 2 columns; one class → add its complement."""
    y = np.asarray(y, dtype=bool)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[1] == 1:
        y = np.concatenate([y, ~y], axis=1)
    return y.astype(np.int64)


def _count(fraction: float, n: int, name: str) -> int:
    """Fraction of ``n`` patients → a count, rounded, at least 1."""
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1), got {fraction}")
    return max(1, round(float(fraction) * n))


def _ensure_nonempty(side: np.ndarray, n_sides: int, rng: np.random.Generator) -> np.ndarray:
    """Move one random member of the largest side into each empty side (small-cohort fallback)."""
    side = side.copy()
    for s in range(n_sides):
        if not np.any(side == s):
            sizes = np.bincount(side, minlength=n_sides)
            donor = int(np.argmax(sizes))
            if sizes[donor] < 2:
                raise ValueError(f"cannot give every one of {n_sides} sides a patient")
            side[rng.choice(np.flatnonzero(side == donor))] = s
    return side


def _stratified_take(y: np.ndarray, n_take: int, seed: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of about ``n_take`` of the rows of ``y``, stratified; both parts non-empty."""
    n = len(y)
    if n < 2 or not 1 <= n_take < n:
        raise ValueError(f"cannot take {n_take} of {n} patients leaving both parts non-empty")
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_take, random_state=seed)
    _, taken = next(splitter.split(np.zeros((n, 1)), _stratify_target(y)))
    mask = np.zeros(n, dtype=bool)
    mask[taken] = True
    return _fix_size(mask, np.asarray(y, dtype=float).reshape(n, -1), n_take, rng)


def _fix_size(mask: np.ndarray, y: np.ndarray, n_take: int, rng: np.random.Generator) -> np.ndarray:
    """Make exactly ``n_take`` rows taken, moving one patient at a time.

    Iterative stratification only approximates the requested size (50 patients at 10 % can give 4
    or 6). Each move takes (or gives back) the patient that keeps the taken part's label
    prevalence closest to the pool's (L1 over classes; ties broken by ``rng``), so stratification
    survives and sizes are exact, which also guarantees both parts are non-empty.
    """
    mask = mask.copy()
    overall = y.mean(axis=0)
    while mask.sum() != n_take:
        add = mask.sum() < n_take
        candidates = np.flatnonzero(~mask if add else mask)
        k = mask.sum() + (1 if add else -1)
        base = y[mask].sum(axis=0)
        after = (base[None, :] + (y[candidates] if add else -y[candidates])) / k
        cost = np.abs(after - overall[None, :]).sum(axis=1)
        best = candidates[np.isclose(cost, cost.min())]
        mask[rng.choice(best)] = add
    return mask


def _carve_val(
    ids: np.ndarray,
    y: np.ndarray,
    train_mask: np.ndarray,
    n_val: int,
    seed: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Split the training patients into (train ids, val ids), stratified."""
    pool = np.flatnonzero(train_mask)
    n_val = min(n_val, len(pool) - 1)
    val_in_pool = _stratified_take(y[pool], n_val, seed, rng)
    return np.sort(ids[pool[~val_in_pool]]), np.sort(ids[pool[val_in_pool]])


def _seed32(*parts: int) -> int:
    """A 32-bit random_state for sklearn from (seed, purpose, ...), stable across runs."""
    return int(np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(1)[0])


def holdout_split(
    patients_df: pd.DataFrame,
    seed: int,
    test_size: float = 0.1,
    val_size: float = 0.1,
    label_columns: Sequence[str] | None = None,
) -> Split:
    """One stratified train/val/test split of the patients for ``seed``.

    Test = exactly ``round(test_size · P)`` patients (≥ 1) drawn from all patients, then val =
    ``round(val_size · P)`` (≥ 1, and leaving ≥ 1 train patient) drawn from the rest; both draws
    are iterative multi-label stratifications of the patients' OR-ed label vectors.
    """
    ids, y = patient_labels(patients_df, label_columns)
    n = len(ids)
    if n < 3:
        raise ValueError(f"a train/val/test split needs at least 3 patients, got {n}")
    n_test = min(_count(test_size, n, "test_size"), n - 2)
    n_val = min(_count(val_size, n, "val_size"), n - n_test - 1)
    rng = np.random.default_rng(_seed32(seed, 1))
    test_mask = _stratified_take(y, n_test, _seed32(seed, 2), rng)
    train, val = _carve_val(ids, y, ~test_mask, n_val, _seed32(seed, 3), rng)
    return Split(
        train=train,
        val=val,
        test=np.sort(ids[test_mask]),
        mode="holdout",
        seed=int(seed),
        meta={"test_size": float(test_size), "val_size": float(val_size)},
    )


def _fold_cost(y: np.ndarray, fold_of: np.ndarray, n_splits: int) -> float:
    """Σ over folds and classes of |fold prevalence − cohort prevalence|, weighted by fold size."""
    overall = y.mean(axis=0)
    return float(
        sum(
            np.abs(y[fold_of == f].mean(axis=0) - overall).sum() * np.sum(fold_of == f)
            for f in range(n_splits)
            if np.any(fold_of == f)
        )
    )


def _fold_assignment(y: np.ndarray, n_splits: int, seed: int, candidates: int = 8) -> np.ndarray:
    """Fold number (0..k-1) of each patient: stratified k-fold, every fold non-empty.

    Iterative stratification is greedy (rarest label first), so the most common class is the
    least well balanced on small folds. ``candidates`` partitions are drawn from seeds derived
    from ``seed`` and the best stratified one is kept (lowest :func:`_fold_cost`; the first on
    ties), which roughly halves the excess deviation of the common classes on ~50 patients.
    """
    y = np.asarray(y, dtype=float).reshape(len(y), -1)
    best, best_cost = None, np.inf
    for c in range(candidates):
        kf = MultilabelStratifiedKFold(
            n_splits=n_splits, shuffle=True, random_state=_seed32(seed, 4, c)
        )
        fold_of = np.empty(len(y), dtype=np.int64)
        for f, (_, test) in enumerate(kf.split(np.zeros((len(y), 1)), _stratify_target(y))):
            fold_of[test] = f
        fold_of = _ensure_nonempty(fold_of, n_splits, np.random.default_rng(_seed32(seed, 5, c)))
        cost = _fold_cost(y, fold_of, n_splits)
        if cost < best_cost - 1e-12:
            best, best_cost = fold_of, cost
    assert best is not None
    return best


def kfold_splits(
    patients_df: pd.DataFrame,
    n_splits: int = 10,
    n_repeats: int = 1,
    seed: int = 0,
    val_size: float = 0.1,
    label_columns: Sequence[str] | None = None,
) -> list[Split]:
    """Repeated stratified group k-fold: ``n_repeats · n_splits`` splits, repeat-major.

    In each repeat every patient is in the test side of exactly one fold. Repeat ``r`` is the
    partition of seed ``seed + r`` (so ``kfold_splits(seed=s, n_repeats=R)[r·k + f]`` equals
    ``kfold_splits(seed=s + r)[f]``). Each fold's validation patients are a stratified
    ``round(val_size · P)`` (≥ 1) of its training patients.
    """
    ids, y = patient_labels(patients_df, label_columns)
    n = len(ids)
    if n_splits < 2:
        raise ValueError(f"n_splits must be ≥ 2, got {n_splits}")
    if n < n_splits + 1:
        raise ValueError(f"{n_splits}-fold needs at least {n_splits + 1} patients, got {n}")
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be ≥ 1, got {n_repeats}")
    n_val = _count(val_size, n, "val_size")
    out: list[Split] = []
    for r in range(n_repeats):
        rep_seed = int(seed) + r
        fold_of = _fold_assignment(y, n_splits, rep_seed)
        for f in range(n_splits):
            test_mask = fold_of == f
            rng = np.random.default_rng(_seed32(rep_seed, 6, f))
            train, val = _carve_val(ids, y, ~test_mask, n_val, _seed32(rep_seed, 7, f), rng)
            out.append(
                Split(
                    train=train,
                    val=val,
                    test=np.sort(ids[test_mask]),
                    mode="kfold",
                    fold=f,
                    repeat=r,
                    seed=int(seed),
                    meta={"n_splits": int(n_splits), "val_size": float(val_size)},
                )
            )
    return out


def _one_fold(cfg: Mapping[str, Any], n_splits: int) -> tuple[int, int]:
    fold, repeat = int(cfg.get("fold", 0)), int(cfg.get("repeat", 0))
    if not 0 <= fold < n_splits:
        raise ValueError(f"split.fold must be in 0..{n_splits - 1}, got {fold}")
    if repeat < 0:
        raise ValueError(f"split.repeat must be ≥ 0, got {repeat}")
    return fold, repeat


def split_for(
    cfg_split: Mapping[str, Any],
    patients_df: pd.DataFrame,
    seed: int,
    label_columns: Sequence[str] | None = None,
) -> Split:
    """One split of a config: ``mode: holdout`` → :func:`holdout_split` (``test_size``,
    ``val_size``); ``mode: kfold`` or ``cv`` → fold ``fold`` of the k-fold partition of seed
    ``seed + repeat`` (``n_splits``, ``val_size``). A ``cv`` job trains every fold of that
    partition (:func:`plan_folds`); this function gives one of them.
    """
    cfg = dict(cfg_split)
    mode = str(cfg.get("mode", "holdout"))
    val_size = float(cfg.get("val_size", 0.1))
    if mode == "holdout":
        return holdout_split(
            patients_df, seed, float(cfg.get("test_size", 0.1)), val_size, label_columns
        )
    if mode in ("kfold", "cv"):
        n_splits = int(cfg.get("n_splits", 5))
        fold, repeat = _one_fold(cfg, n_splits)
        s = kfold_splits(patients_df, n_splits, 1, int(seed) + repeat, val_size, label_columns)[
            fold
        ]
        return Split(
            train=s.train,
            val=s.val,
            test=s.test,
            mode=mode,
            fold=fold,
            repeat=repeat,
            seed=int(seed),
            meta=s.meta,
        )
    raise ValueError(f"split.mode must be one of {', '.join(PROTOCOLS)}, got {mode!r}")


# ------------------------------------------------------------------------------ a job's folds
def gene_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """``patient_id`` + the five-gene matrix (KRAS, NRAS, BRAF, PIK3CA, OTHER = none of the four)
    of each crop row: what every split is stratified on, whatever label set the job trains.

    ``rows`` needs ``patient_id`` and the four gene columns, all present (labelled rows).
    """
    missing = [c for c in (PATIENT, *GENES) if c not in rows.columns]
    if missing:
        raise ValueError(f"crop rows lack columns {missing} needed to stratify the split")
    genes = rows[list(GENES)]
    if genes.isna().any().any():
        raise ValueError(
            "crop rows have missing gene labels; drop unlabelled rows before splitting"
        )
    g = genes.astype(np.int64).to_numpy().astype(bool)
    out = pd.DataFrame(g.astype(np.int64), columns=list(GENES))
    out["OTHER"] = (~g.any(axis=1)).astype(np.int64)
    out.insert(0, PATIENT, rows[PATIENT].astype(str).to_numpy())
    return out


def _fold_doc(s: Split, fold: int) -> dict[str, Any]:
    return {
        "fold": int(fold),
        "train": [str(p) for p in s.train],
        "val": [str(p) for p in s.val],
        "test": [str(p) for p in s.test],
    }


@dataclass(frozen=True)
class FoldPlan:
    """The folds of one ``run`` job: the whole partition (``partition``; holdout: one split) and
    which of its folds this job trains (``trained``: every fold for cv and holdout, one for kfold).

    ``document()`` is ``splits.json``; ``summary()`` the ``split`` block of ``metrics.json`` (counts
    and a hash only, never a patient id).
    """

    protocol: str
    seed: int
    partition: tuple[Split, ...]
    trained: tuple[int, ...]
    repeat: int = 0
    stratified_on: tuple[str, ...] = STRATIFY_CLASSES
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def folds(self) -> list[tuple[int, Split]]:
        """``(fold number, split)`` of every fold this job trains."""
        return [(f, self.partition[f]) for f in self.trained]

    @property
    def n_splits(self) -> int:
        return len(self.partition)

    def patients(self) -> list[str]:
        s = self.partition[0]
        return sorted({str(p) for side in (s.train, s.val, s.test) for p in side})

    def test_patients(self) -> list[str]:
        """Every patient a trained fold tests (sorted union)."""
        return sorted({str(p) for _, s in self.folds for p in s.test})

    def document(self) -> dict[str, Any]:
        """``splits.json``: one list of patient ids per side and fold (nnU-Net's splits_final.json,
        with train/val/test); a local file only, never sent to a logger."""
        return {
            "protocol": self.protocol,
            "seed": int(self.seed),
            "repeat": int(self.repeat),
            "n_splits": self.n_splits,
            "stratified_on": list(self.stratified_on),
            **{k: v for k, v in self.meta.items() if k in ("val_size", "test_size")},
            "folds": [_fold_doc(s, f) for f, s in enumerate(self.partition)],
        }

    def partition_hash(self) -> str:
        """sha256 of the partition (every fold's sides): equal across jobs ⇔ same patients on the
        same sides, e.g. the five- and three-class jobs of one seed, or the kfold jobs of one cv."""
        folds = [_fold_doc(s, f) for f, s in enumerate(self.partition)]
        return hashlib.sha256(json.dumps(folds, sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.protocol,
            "n_splits": self.n_splits,
            "seed": int(self.seed),
            "repeat": int(self.repeat),
            "source": str(self.meta.get("source", "computed")),
            "stratified_on": list(self.stratified_on),
            **{k: v for k, v in self.meta.items() if k in ("val_size", "test_size")},
            "n_patients": len(self.patients()),
            "n_test_patients": len(self.test_patients()),
            "folds_trained": list(self.trained),
            "partition_hash": self.partition_hash(),
        }
        if len(self.trained) == 1:  # holdout and kfold: the sides of the one trained fold
            s = self.partition[self.trained[0]]
            out["fold"] = int(self.trained[0])
            out["n_train_patients"] = len(s.train)
            out["n_val_patients"] = len(s.val)
        return out


def plan_folds(cfg_split: Mapping[str, Any], patients_df: pd.DataFrame, seed: int) -> FoldPlan:
    """The folds a ``run`` job trains (module docstring, "Protocols").

    ``patients_df``: ``patient_id`` + the columns to stratify on, one row per crop
    (:func:`gene_matrix` of the job's labelled rows). ``cfg_split``: ``mode`` (cv | holdout |
    kfold), ``n_splits``, ``fold`` (kfold), ``repeat``, ``test_size`` (holdout), ``val_size`` and
    ``file`` (a ``splits.json`` to reuse: its folds replace the computed ones; ``mode: kfold``
    then trains its fold ``fold``).
    """
    cfg = dict(cfg_split)
    mode = str(cfg.get("mode", "cv"))
    if mode not in PROTOCOLS:
        raise ValueError(f"split.mode must be one of {', '.join(PROTOCOLS)}, got {mode!r}")
    seed = int(seed)
    if cfg.get("file"):
        ids = sorted(patients_df[PATIENT].astype(str).unique())
        return _plan_from_file(Path(str(cfg["file"])), ids, mode, cfg, seed)
    stratify = tuple(c for c in patients_df.columns if c != PATIENT)
    val_size = float(cfg.get("val_size", 0.1))
    if mode == "holdout":
        test_size = float(cfg.get("test_size", 0.1))
        s = holdout_split(patients_df, seed, test_size, val_size)
        meta = {"val_size": val_size, "test_size": test_size}
        return FoldPlan("holdout", seed, (s,), (0,), 0, stratify, meta)
    n_splits = int(cfg.get("n_splits", 5))
    fold, repeat = _one_fold(cfg, n_splits)
    partition = kfold_splits(patients_df, n_splits, 1, seed + repeat, val_size)
    partition = [
        Split(s.train, s.val, s.test, mode, s.fold, repeat, seed, s.meta) for s in partition
    ]
    trained = (fold,) if mode == "kfold" else tuple(range(n_splits))
    meta = {"val_size": val_size}
    return FoldPlan(mode, seed, tuple(partition), trained, repeat, stratify, meta)


def _id_list(value: Any) -> list[str] | None:
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        return None
    return [str(v) for v in value]


def read_splits_file(path: str | Path, patient_ids: Iterable[str]) -> dict[str, Any]:
    """A ``splits.json`` (:meth:`FoldPlan.document`), checked against the cohort's patients:
    every fold's train/val/test are non-empty, disjoint and hold exactly ``patient_ids``; with
    several folds, the test sides are a partition of them (each patient tested once). Any problem
    is an :class:`InputError` naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(path, "split.file: no such splits file (a job's splits.json)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"not a splits file: {err}") from err
    folds = doc.get("folds") if isinstance(doc, dict) else None
    if not isinstance(folds, list) or not folds:
        raise InputError(path, "not a splits file: no 'folds' list")
    cohort = {str(p) for p in patient_ids}
    tested: list[str] = []
    for i, fold in enumerate(folds):
        sides = {k: _id_list(fold.get(k)) if isinstance(fold, dict) else None
                 for k in ("train", "val", "test")}  # fmt: skip
        bad = [k for k, v in sides.items() if not v]
        if bad:
            raise InputError(path, f"fold {i}: {'/'.join(bad)} missing or empty")
        if isinstance(fold.get("fold"), int) and fold["fold"] != i:
            raise InputError(path, f"fold {i} is numbered {fold['fold']}: folds must be in order")
        listed = [p for v in sides.values() for p in v]  # type: ignore[union-attr]
        if len(set(listed)) != len(listed):
            raise InputError(path, f"fold {i}: a patient is listed twice (or on two sides)")
        unknown, absent = set(listed) - cohort, cohort - set(listed)
        if unknown:
            raise InputError(
                path,
                f"fold {i}: {len(unknown)} patient(s) are not labelled patients of this crop "
                "store (another cohort, or excluded by datamodule.exclude_patients?)",
            )
        if absent:
            raise InputError(
                path,
                f"fold {i}: {len(absent)} labelled patient(s) of this crop store are on no side "
                "(the store has patients the split did not have)",
            )
        tested += sides["test"]  # type: ignore[operator]
    if len(folds) > 1 and (len(set(tested)) != len(tested) or set(tested) != cohort):
        raise InputError(
            path, "the folds' test sides are not a partition of the patients (each tested once)"
        )
    return doc


def _plan_from_file(
    path: Path, patient_ids: list[str], mode: str, cfg: Mapping[str, Any], seed: int
) -> FoldPlan:
    """A :class:`FoldPlan` over the folds of a splits file; ``mode: kfold`` trains fold ``fold``
    of it, any other mode every fold (one fold = holdout, more = cv)."""
    doc = read_splits_file(path, patient_ids)
    n = len(doc["folds"])
    protocol = "kfold" if mode == "kfold" else ("holdout" if n == 1 else "cv")
    partition = tuple(
        Split(
            train=np.array(sorted(map(str, f["train"])), dtype=object),
            val=np.array(sorted(map(str, f["val"])), dtype=object),
            test=np.array(sorted(map(str, f["test"])), dtype=object),
            mode=protocol,
            fold=i,
            seed=seed,
        )
        for i, f in enumerate(doc["folds"])
    )
    trained = (_one_fold(cfg, n)[0],) if protocol == "kfold" else tuple(range(n))
    meta = {
        "source": "file",
        "file_sha256": sha256_file(path),
        "file_seed": doc.get("seed"),
        **{k: doc[k] for k in ("val_size", "test_size") if k in doc},
    }
    stratified = tuple(str(c) for c in doc.get("stratified_on") or ())
    return FoldPlan(protocol, seed, partition, trained, int(doc.get("repeat", 0)), stratified, meta)
