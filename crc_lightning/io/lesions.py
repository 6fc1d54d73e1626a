"""What the lesions of a mask are: the one definition of lesion ids, shared by every layer.

The manifest contract (README, "Your cohort") identifies a lesion by ``patient_id`` + ``lesion``,
where ``lesion`` is its value in an instance mask, or its component number in a binary mask. This
module is that rule, so manifest validation (sources), Algorithm 1's step 1 (preprocessing) and
``predict`` (inference) cannot disagree about which voxels form lesion 3.

* binary mask (values ⊆ {0, 1}, any dtype incl. bool) → the ``connectivity``-connected components
  (cc3d), numbered 1..n in C raster order ([z, y, x]) of their first voxel — the numbering
  ``scipy.ndimage.label`` gives, so a lesion's number is reproducible from the mask;
* instance mask (any other non-negative whole values) → kept as is.

Only the bounding box of the non-zero voxels is labelled (raster order of first voxels does not
change under a shift), so no full-size label map is allocated.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lesion_labels", "lesion_labels_in_box", "nonzero_box"]


def nonzero_box(array: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The bounding box of all non-zero voxels of a [z, y, x] array, or None if there are none.

    Three cheap ``any`` reductions (the second and third only over the occupied slab), so that
    labelling and ``find_objects`` can run on the small region holding the lesions.
    """
    z = np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1))
    if z.size == 0:
        return None
    slab = array[z[0] : z[-1] + 1]
    y = np.flatnonzero(slab.any(axis=(0, 2)))
    x = np.flatnonzero(slab.any(axis=(0, 1)))
    return tuple(slice(int(a[0]), int(a[-1]) + 1) for a in (z, y, x))  # type: ignore[return-value]


def lesion_labels(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Turn a raw lesion mask into a lesion label map (int32, 0 = background).

    * binary mask (values ⊆ {0, 1}, any dtype incl. bool) → the ``connectivity``-connected
      components (cc3d), numbered 1..n in C raster order ([z, y, x]) of their first voxel, the
      numbering ``scipy.ndimage.label`` gives — so a lesion's number is reproducible from the mask;
    * instance mask (any other non-negative whole values) → kept as is: the annotator's values are
      the lesion ids the manifest's ``lesion`` column refers to.

    Why cc3d: several times faster than ``scipy.ndimage.label``. Only the bounding box of the
    non-zero voxels is labelled (raster order of first voxels is unchanged by the shift), and
    min/max are taken there — ``np.unique`` would sort the whole volume.
    """
    inner, box = lesion_labels_in_box(mask, connectivity)
    if box is None:
        return np.zeros(np.shape(mask), np.int32)
    if inner.shape == np.shape(mask):
        return inner
    out = np.zeros(np.shape(mask), np.int32)
    out[box] = inner  # np.zeros is calloc: pages outside the box are never touched
    return out


def lesion_labels_in_box(
    mask: np.ndarray, connectivity: int = 26
) -> tuple[np.ndarray, tuple[slice, slice, slice] | None]:
    """:func:`lesion_labels` of the bounding box of all non-zero voxels only: (labels, box).

    ``labels`` is the int32 label map of ``mask[box]`` (a view for an int32 instance mask), so no
    full-size array is allocated; ``box`` is None (and ``labels`` empty) when the mask is empty.
    Component numbers equal those of the full volume: the raster order of first voxels does not
    change under a shift.
    """
    import cc3d

    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"lesion_labels expects a 3D mask, got shape {mask.shape}")
    if mask.dtype == bool:
        mask = mask.view(np.uint8)
    box = nonzero_box(mask) if mask.size else None
    if box is None:
        return np.zeros((0, 0, 0), np.int32), None
    inner = mask[box]
    if mask.dtype.kind == "f" and not np.array_equal(inner, np.round(inner)):
        raise ValueError("lesion_labels: mask values must be whole numbers")
    lo, hi = inner.min(), inner.max()
    if lo < 0:
        raise ValueError(f"lesion_labels: mask values must be non-negative (min {lo})")
    if hi > np.iinfo(np.int32).max:
        raise ValueError(f"lesion_labels: mask value {hi} does not fit int32")
    if hi > 1:
        return inner.astype(np.int32, copy=False), box
    # C-contiguous input → cc3d numbers components in the same raster order as scipy.
    binary = np.ascontiguousarray(inner, dtype=np.uint8)
    comps = cc3d.connected_components(binary, connectivity=connectivity, out_dtype=np.uint32)
    return comps.view(np.int32), box
