"""Median class balancing of the training images (Perlo et al. 2024, Sec. IV.C).

The paper: "at the beginning of the training phase, train-set images are re-sampled or sub-sampled
in relation to their mutation. We use the label distribution median in order to equalize the number
of samples for each mutation." Made precise for multi-label images:

1. **Target** ``m`` = median of the per-class positive image counts over the classes that have at
   least one positive image (a class with no image cannot be re-sampled, and counting it would drag
   the median to 0). With an even number of classes the median is rounded half up.
2. **Assignment.** Each image is assigned to exactly one sampling group: its *rarest* positive class
   (smallest positive count; ties → lower class index). Assigning multi-label images to their rarest
   class protects rare mutations: a BRAF+PIK3CA image is sampled as BRAF, not lost among PIK3CA.
   Images with no positive class (only possible with a label set without an ``OTHER`` class) form
   one extra group, balanced to ``m`` like a class.
3. **Sampling.** A group larger than ``m`` is sub-sampled without replacement to ``m``; a smaller one
   keeps every image once and draws the missing ``m - n`` with replacement. A class whose images
   are all assigned to rarer classes has no group of its own and is left as those groups make it.

So the result holds exactly ``m`` images of every non-empty group (the "assigned class"), and the
per-class positive counts (which also count secondary labels) are close to, not exactly, ``m``.
Only ever applied to the training set; validation and test keep their natural distribution.

**Lesion-level sampling** (``datamodule.sampling=lesion``, :func:`lesion_weights`) composes with it:
the balancing still sets *how many draws each sampling group gets* per epoch (``m`` per non-empty
group, the same epoch length as the balanced set), and the lesion weights decide *how a group's
draws are spread*: equally over the group's lesions, each lesion's share split equally over its
slices — instead of in proportion to slice count. So a lesion with 30 slices and one with 3 in the
same group are drawn equally often (``m / L_g`` expected draws each, ``L_g`` the group's lesions),
and no lesion is left out of an epoch's *distribution* by sub-sampling (draws are with replacement
from every training row). Without balancing (``balance=false``) the whole training set is one group
of ``n`` draws: every lesion gets ``n / L`` expected draws.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NO_CLASS", "assign_groups", "lesion_weights", "median_balance", "median_target"]

NO_CLASS = -1  # group of images with no positive class


def _as_matrix(class_matrix: np.ndarray) -> np.ndarray:
    y = np.asarray(class_matrix)
    if y.ndim != 2:
        raise ValueError(f"class_matrix must be [n, C], got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("class_matrix must hold 0/1 values")
    return y.astype(bool)


def median_target(class_matrix: np.ndarray) -> int:
    """Median of the per-class positive counts over classes with ≥ 1 positive (round half up)."""
    counts = _as_matrix(class_matrix).sum(axis=0)
    counts = counts[counts > 0]
    if counts.size == 0:
        return 0
    return int(np.floor(np.median(counts) + 0.5))


def assign_groups(class_matrix: np.ndarray) -> np.ndarray:
    """Sampling group of each image: its rarest positive class, or :data:`NO_CLASS`."""
    y = _as_matrix(class_matrix)
    counts = y.sum(axis=0)
    # rank classes by (count, index); an image's group = its positive class of lowest rank
    rank = np.empty(y.shape[1], dtype=np.int64)
    rank[np.lexsort((np.arange(y.shape[1]), counts))] = np.arange(y.shape[1])
    masked = np.where(y, rank[None, :], y.shape[1])
    best = np.argmin(masked, axis=1)
    return np.where(y.any(axis=1), best, NO_CLASS).astype(np.int64)


def median_balance(class_matrix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted, with repeats) of a median-balanced resampling of the rows of ``class_matrix``.

    Every non-empty sampling group (see :func:`assign_groups`) contributes exactly
    :func:`median_target` rows: sub-sampled without replacement when larger, all rows plus draws
    with replacement when smaller.
    """
    y = _as_matrix(class_matrix)
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    target = median_target(y)
    if target == 0:  # no positive anywhere: nothing to balance on, keep the set as it is
        return np.arange(len(y), dtype=np.int64)
    groups = assign_groups(y)
    picked: list[np.ndarray] = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if len(members) >= target:
            picked.append(rng.choice(members, size=target, replace=False))
        else:
            extra = rng.choice(members, size=target - len(members), replace=True)
            picked.append(np.concatenate([members, extra]))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def lesion_weights(
    class_matrix: np.ndarray, lesion_ids: np.ndarray, balance: bool = True
) -> np.ndarray:
    """Expected draws per epoch of every row for lesion-level sampling (module docstring).

    Rows are grouped as :func:`median_balance` groups them (``balance``; else one group), each
    group's budget is what :func:`median_balance` would give it (``m``; else ``n``), and within a
    group every lesion (``lesion_ids``: one id per row) gets an equal share of the budget, split
    equally over its rows. The weights sum to the epoch length (``len(median_balance(...))``, or
    ``n``): pass them to :class:`torch.utils.data.WeightedRandomSampler` with
    ``num_samples = round(sum)`` and ``replacement=True``.
    """
    y = _as_matrix(class_matrix)
    lesions = np.asarray(lesion_ids)
    if lesions.shape != (len(y),):
        raise ValueError(f"lesion_ids must hold one id per row ({len(y)}), got {lesions.shape}")
    if len(y) == 0:
        return np.zeros(0, dtype=np.float64)
    target = median_target(y) if balance else 0
    if target == 0:  # no balancing (or nothing to balance on): one group of n draws
        groups, budget = np.zeros(len(y), dtype=np.int64), float(len(y))
    else:
        groups, budget = assign_groups(y), float(target)
    _, unit = np.unique(np.stack([groups.astype(str), lesions.astype(str)]), axis=1,
                        return_inverse=True)  # fmt: skip
    unit = unit.reshape(-1)
    rows_per_unit = np.bincount(unit)
    weights = np.empty(len(y), dtype=np.float64)
    for g in np.unique(groups):
        members = groups == g
        n_lesions = len(np.unique(unit[members]))
        weights[members] = budget / n_lesions / rows_per_unit[unit[members]]
    return weights
