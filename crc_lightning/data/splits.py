"""Patient-grouped, label-stratified train/val/test splits (Perlo et al. 2024, Sec. IV.C).

Two rules from the paper drive everything here:

* **No patient on two sides.** Splits are made over *patients*, never over crops or lesions, so a
  model cannot score by recognising a patient it has seen in training.
* **Label distribution kept.** Each patient gets a label vector = OR over its lesions (crops) of the
  class matrix, and the patients are split by iterative multi-label stratification (Sechidis et al.
  2011, ``iterstrat``), so every side has about the cohort's prevalence of every class. K-fold
  keeps the best stratified of 8 seeded iterstrat partitions (:func:`_fold_assignment`).

Sizes: ``test_size`` and ``val_size`` are fractions of the *whole* cohort's patients (the paper's
90 % / 10 % train/test, and a validation set carved out of the training patients the same way). In
k-fold mode the test side is one fold (≈ 1/k of the patients) and ``val_size`` is again a fraction
of the whole cohort, taken from that fold's training patients.

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
``kfold_splits(..., seed=s)`` uses the fold assignment of seed ``s + r``, so a sweep over
``seed=0..4`` × ``split.fold=0..9`` is exactly the paper's multi-seeded 10-fold validation, and
``split.repeat`` is only an extra offset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit

__all__ = [
    "Split",
    "holdout_split",
    "kfold_splits",
    "patient_labels",
    "split_for",
]

PATIENT = "patient_id"


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


def split_for(
    cfg_split: Mapping[str, Any],
    patients_df: pd.DataFrame,
    seed: int,
    label_columns: Sequence[str] | None = None,
) -> Split:
    """The split a run asks for: ``conf/split/<holdout|kfold>.yaml`` + the run's seed.

    ``mode: holdout`` → :func:`holdout_split` (``test_size``, ``val_size``).
    ``mode: kfold`` → fold ``fold`` of the k-fold partition of seed ``seed + repeat``
    (``n_splits``, ``val_size``).
    """
    cfg = dict(cfg_split)
    mode = str(cfg.get("mode", "holdout"))
    val_size = float(cfg.get("val_size", 0.1))
    if mode == "holdout":
        return holdout_split(
            patients_df, seed, float(cfg.get("test_size", 0.1)), val_size, label_columns
        )
    if mode == "kfold":
        n_splits = int(cfg.get("n_splits", 10))
        fold, repeat = int(cfg.get("fold", 0)), int(cfg.get("repeat", 0))
        if not 0 <= fold < n_splits:
            raise ValueError(f"split.fold must be in 0..{n_splits - 1}, got {fold}")
        if repeat < 0:
            raise ValueError(f"split.repeat must be ≥ 0, got {repeat}")
        s = kfold_splits(patients_df, n_splits, 1, int(seed) + repeat, val_size, label_columns)[
            fold
        ]
        return Split(
            train=s.train,
            val=s.val,
            test=s.test,
            mode="kfold",
            fold=fold,
            repeat=repeat,
            seed=int(seed),
            meta=s.meta,
        )
    raise ValueError(f"split.mode must be 'holdout' or 'kfold', got {mode!r}")
