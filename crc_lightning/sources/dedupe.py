"""Content de-duplication of scans across sources.

LiTS volumes 28–47 *are* 3D-IRCADb patients, re-saved as NIfTI and possibly flipped, so file hashes
cannot see it. The fingerprint is a histogram of the rounded HU values plus the sorted shape:
invariant to any voxel permutation (flips, axis swaps, file format), and different for different
scans in practice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from crc_lightning.io import ReadOptions, read_image
from crc_lightning.sources.case import Case

__all__ = ["content_fingerprint", "dedupe_by_content"]

log = logging.getLogger(__name__)

_HU_OFFSET = 32768  # int16 HU + offset >= 0 for np.bincount
_HU_BINS = 65536
_SLAB = 16  # slices per chunk when fingerprinting (bounded memory on 512² × 800 volumes)


def content_fingerprint(array: np.ndarray) -> str:
    """sha256 of (sorted shape, histogram of int16-rounded HU): unchanged by flips/transposes."""
    array = np.asarray(array)
    counts = np.zeros(_HU_BINS, dtype=np.int64)
    flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    for start in range(0, flat.shape[0], _SLAB):
        chunk = np.rint(flat[start : start + _SLAB].astype(np.float64, copy=False))
        chunk = np.clip(chunk, -_HU_OFFSET, _HU_OFFSET - 1).astype(np.int64) + _HU_OFFSET
        counts += np.bincount(chunk.ravel(), minlength=_HU_BINS)
    h = hashlib.sha256()
    h.update(np.asarray(sorted(array.shape), dtype="<i8").tobytes())
    h.update(counts.astype("<i8").tobytes())
    return h.hexdigest()


def dedupe_by_content(
    cases: Iterable[Case], options: ReadOptions | None = None
) -> tuple[list[Case], int]:
    """Drop cases whose image content repeats an earlier case's; ``(kept, n_dropped)``.

    First occurrence wins, in the order given (put the preferred source first). Each image is read
    and fingerprinted once (an image shared by several cases is read once).
    """
    kept: list[Case] = []
    seen: set[str] = set()
    by_image: dict[Path, str] = {}
    dropped: list[str] = []
    for case in cases:
        key = Path(case.image).resolve()
        if key not in by_image:
            by_image[key] = content_fingerprint(read_image(case.image, options).array)
        fp = by_image[key]
        if fp in seen:
            dropped.append(case.case_id)
            continue
        seen.add(fp)
        kept.append(case)
    log.info("dedupe_by_content: dropped %d of %d case(s)", len(dropped), len(kept) + len(dropped))
    if dropped:
        log.debug("content duplicates dropped: %s", dropped)
    return kept, len(dropped)
