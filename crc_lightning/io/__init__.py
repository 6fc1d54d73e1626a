"""Reading and writing CT images and lesion masks as :class:`Volume` objects.

``read_image`` / ``read_mask`` dispatch on what the path is:

* a ``.nii`` / ``.nii.gz`` file → nibabel (RAS affine converted to the LPS ``Volume`` convention);
* a folder → a DICOM series (pydicom), slices ordered along their normal, values in HU;
* (masks only) a DICOM file → a DICOM SEG (highdicom), segments → instance values 1..n.

Anything else is refused with an :class:`InputError` naming the path. The writers
(:func:`write_nifti`, :func:`write_dicom_series`, :func:`write_dicom_seg`) give back exactly what the
readers read. Heavy libraries (nibabel, pydicom, highdicom) are imported inside the functions of
those modules, so ``import crc_lightning.io`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crc_lightning.io.dicom import (
    is_dicom_file,
    read_dicom_mask_series,
    read_dicom_series,
    write_dicom_series,
)
from crc_lightning.io.errors import InputError, ManifestError
from crc_lightning.io.nifti import is_nifti_path, read_nifti, write_nifti
from crc_lightning.io.seg import read_dicom_seg, write_dicom_seg
from crc_lightning.io.volume import Volume, check_same_grid

__all__ = [
    "InputError",
    "ManifestError",
    "Volume",
    "check_same_grid",
    "read_image",
    "read_mask",
    "write_dicom_seg",
    "write_dicom_series",
    "write_nifti",
]

ORIGIN_RTOL_VOXEL = 0.1  # a mask origin may differ from the image's by ≤ 0.1 voxel (rounding)

_EXPECTED = "expected a .nii/.nii.gz file or a DICOM series folder"


def read_image(path: str | Path) -> Volume:
    """Read a CT image (NIfTI file or DICOM series folder) as float32 HU on its grid."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "image not found")
    if path.is_dir():
        return read_dicom_series(path)
    if is_nifti_path(path):
        return read_nifti(path)
    if is_dicom_file(path):
        raise InputError(path, f"a single DICOM file; pass its series folder ({_EXPECTED})")
    raise InputError(path, f"unsupported image input ({_EXPECTED})")


def read_mask(path: str | Path, reference: Volume | None = None) -> Volume:
    """Read a lesion mask as int32 labels (0 = background), optionally checked against an image.

    NIfTI values are kept as they are (they must be whole numbers). A DICOM series folder of mask
    slices is binarised when its values are ⊆ {0, m} for one m > 0 (e.g. IRCADb's 0/255), else kept.
    A DICOM SEG gives instance values 1..n in segment-number order, placed on ``reference``'s grid
    when given. With ``reference``, the grid must match (:func:`check_same_grid`, plus the origin
    within 0.1 voxel).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "mask not found")
    if path.is_dir():
        mask = read_dicom_mask_series(path)
    elif is_nifti_path(path):
        mask = read_nifti(path, as_mask=True)
    elif is_dicom_file(path):
        mask = read_dicom_seg(path, reference=reference)
    else:
        raise InputError(
            path,
            "unsupported mask input (expected a .nii/.nii.gz file, a DICOM SEG file "
            "or a DICOM series folder)",
        )
    if reference is not None:
        check_same_grid(reference, mask)
        _check_same_origin(reference, mask)
    return mask


def _check_same_origin(image: Volume, mask: Volume) -> None:
    """Refuse a mask shifted against its image (check_same_grid compares shape/spacing/axes)."""
    tol = ORIGIN_RTOL_VOXEL * min(image.spacing)
    shift = np.asarray(mask.origin) - np.asarray(image.origin)
    if np.linalg.norm(shift) > tol:
        raise InputError(
            mask.source or None,
            f"mask origin {mask.origin} differs from image origin {image.origin} by "
            f"{np.linalg.norm(shift):.3f} mm (> {tol:.3f} mm) (image {image.source or 'image'})",
        )
