"""Reading and writing CT images and lesion masks as :class:`Volume` objects.

``read_image`` / ``read_mask`` dispatch on what the path is:

* a ``.nii`` / ``.nii.gz`` file → nibabel (RAS affine converted to the LPS ``Volume`` convention);
* a folder → a DICOM series (pydicom; compressed transfer syntaxes through the pylibjpeg plug-ins),
  slices ordered along their normal, values in HU — or the one Enhanced CT file it holds;
* a multi-frame DICOM file → an Enhanced CT (highdicom), read like a series;
* (masks only) a DICOM SEG file → the named segments (highdicom), value = segment number.

Every volume comes out in the **canonical voxel order** (:mod:`crc_lightning.io.volume`: x towards
patient left, y posterior, z superior — the radiological view, what SimpleITK
``DICOMOrient(…, "LPS")`` gives), by axis permutation/flip only (views, no resampling), so one
anatomy gives one array whatever the file's own axis order. A mask read with ``reference`` must lie
on the image's grid up to that axis order: compared physically (shape, spacing, direction, origin);
another grid is refused naming both geometries, or resampled by nearest neighbour with
``ReadOptions.resample_mask``. :func:`read_image_grid` / :func:`read_mask_grid` give the same grids
from headers alone (manifest validation: a cohort with one bad file fails in seconds).

Anything else is refused with an :class:`InputError` naming the path. The writers
(:func:`write_nifti`, :func:`write_dicom_series`, :func:`write_dicom_seg`) give back exactly what the
readers read. Heavy libraries (nibabel, pydicom, highdicom, SimpleITK) are imported inside the
functions of those modules, so ``import crc_lightning.io`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from crc_lightning.io.dicom import (
    dicom_series_grid,
    enhanced_grid,
    is_dicom_file,
    read_dicom_mask_series,
    read_dicom_series,
    read_enhanced_ct,
    write_dicom_series,
)
from crc_lightning.io.errors import InputError, ManifestError
from crc_lightning.io.nifti import is_nifti_path, read_nifti, read_nifti_grid, write_nifti
from crc_lightning.io.seg import (
    OffGridError,
    SegmentSelector,
    check_seg_on_grid,
    read_dicom_seg,
    write_dicom_seg,
)
from crc_lightning.io.volume import (
    CANONICAL,
    ReadOptions,
    Volume,
    check_same_grid,
    describe_grid,
    same_grid,
)

__all__ = [
    "CANONICAL",
    "InputError",
    "ManifestError",
    "ReadOptions",
    "SegmentSelector",
    "Volume",
    "check_mask_grid",
    "check_same_grid",
    "describe_grid",
    "read_image",
    "read_image_grid",
    "read_mask",
    "read_mask_grid",
    "same_grid",
    "write_dicom_seg",
    "write_dicom_series",
    "write_nifti",
]

_EXPECTED = "expected a .nii/.nii.gz file, a DICOM series folder or an Enhanced CT file"
_MASK_EXPECTED = (
    "unsupported mask input (expected a .nii/.nii.gz file, a DICOM SEG file or a DICOM series "
    "folder)"
)
_RESAMPLE_HINT = "; set preprocess.resample_mask=true to resample the mask onto the image grid"


def _dicom_kind(path: Path) -> str:
    """``"seg"``, ``"multiframe"`` or ``"single"`` for a DICOM file (header only)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise InputError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if str(ds.get("Modality", "")).upper() == "SEG" or "SegmentSequence" in ds:
        return "seg"
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return "multiframe"
    return "single"


def _image_file_kind(path: Path) -> str:
    if is_nifti_path(path):
        return "nifti"
    if is_dicom_file(path):
        kind = _dicom_kind(path)
        if kind == "multiframe":
            return "enhanced"
        if kind == "seg":
            raise InputError(path, f"a DICOM SEG is a mask, not an image ({_EXPECTED})")
        raise InputError(path, f"a single DICOM slice; pass its series folder ({_EXPECTED})")
    raise InputError(path, f"unsupported image input ({_EXPECTED})")


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{what} not found")
    return path


def read_image(path: str | Path, options: ReadOptions | None = None) -> Volume:
    """Read a CT image as float32 HU in the canonical voxel order (module docstring)."""
    options = options or ReadOptions()
    path = _existing(path, "image")
    if path.is_dir():
        return read_dicom_series(path, options)
    kind = _image_file_kind(path)
    if kind == "nifti":
        return read_nifti(path, nonfinite=options.nonfinite_hu)
    from crc_lightning.io.volume import check_finite

    vol = read_enhanced_ct(path)
    return vol.with_array(check_finite(vol.array, path, options.nonfinite_hu))


def read_image_grid(path: str | Path, options: ReadOptions | None = None) -> Volume:
    """The canonical grid :func:`read_image` would return, from headers only (zero-memory
    volume); every refusal the reader makes from headers (layout, geometry, tilt) happens here."""
    path = _existing(path, "image")
    if path.is_dir():
        return dicom_series_grid(path, options or ReadOptions())
    kind = _image_file_kind(path)
    return read_nifti_grid(path) if kind == "nifti" else enhanced_grid(path)


def read_mask(
    path: str | Path,
    reference: Volume | None = None,
    options: ReadOptions | None = None,
    segments: SegmentSelector = None,
) -> Volume:
    """Read a lesion mask as int32 labels (0 = background) in the canonical voxel order.

    Values are kept as they are (whole, non-negative numbers; a 0/255 mask stays 0/255): which
    voxels form which lesion is the lesion rule's job (:mod:`crc_lightning.io.lesions`). A DICOM
    SEG gives the segment number of the ``segments`` it is asked for (all by default). With
    ``reference`` (the image, or its grid) the mask is checked against — and for a SEG placed on —
    the image grid: another axis order is accepted, another grid is refused naming both
    geometries, or resampled (nearest neighbour) with ``options.resample_mask``.
    """
    options = options or ReadOptions()
    path = _existing(path, "mask")
    if path.is_dir():
        mask = read_dicom_mask_series(path, options)
    elif is_nifti_path(path):
        mask = read_nifti(path, as_mask=True)
    elif is_dicom_file(path) and _dicom_kind(path) == "seg":
        return read_dicom_seg(path, reference, segments, resample=options.resample_mask)
    elif is_dicom_file(path):
        raise InputError(path, "a DICOM file that is not a DICOM SEG; " + _MASK_EXPECTED)
    else:
        raise InputError(path, _MASK_EXPECTED)
    if reference is None:
        return mask
    return fit_mask(mask, reference, options)


def fit_mask(mask: Volume, reference: Volume, options: ReadOptions) -> Volume:
    """``mask`` in ``reference``'s axis order when the grids coincide physically; resampled onto it
    with ``options.resample_mask``; refused (both geometries named) otherwise."""
    moved = mask.reoriented_like(reference)
    if same_grid(reference, moved):
        return moved
    if not options.resample_mask:
        check_same_grid(reference, moved, _RESAMPLE_HINT)
    from crc_lightning.io.resample import resample_mask

    out = resample_mask(moved, reference)
    if moved.array.any() and not out.array.any():
        raise InputError(
            mask.source or None,
            f"no annotated voxel falls inside the image {reference.source or ''} after "
            "resampling the mask onto its grid (do they cover the same body region?)",
        )
    return out


def read_mask_grid(path: str | Path, options: ReadOptions | None = None) -> Volume | None:
    """The canonical grid of a NIfTI or DICOM-series mask from headers only; ``None`` for a DICOM
    SEG (it has no grid of its own: :func:`check_mask_grid` checks its frames instead)."""
    path = _existing(path, "mask")
    if path.is_dir():
        return dicom_series_grid(path, options)
    if is_nifti_path(path):
        return read_nifti_grid(path)
    if is_dicom_file(path) and _dicom_kind(path) == "seg":
        return None
    raise InputError(path, _MASK_EXPECTED)


def check_mask_grid(
    path: str | Path,
    image_grid: Volume,
    options: ReadOptions | None = None,
    segments: SegmentSelector = None,
) -> bool:
    """Header-only check that a mask fits its image's grid (the cheap part of :func:`read_mask`):
    raises the reader's :class:`InputError`; returns True when the mask will be resampled."""
    options = options or ReadOptions()
    path = Path(path)
    grid = read_mask_grid(path, options)
    if grid is None:
        try:
            check_seg_on_grid(path, image_grid, segments)
        except OffGridError:
            if options.resample_mask:
                return True
            raise
        return False
    moved = grid.reoriented_like(image_grid)
    if same_grid(image_grid, moved):
        return False
    if not options.resample_mask:
        check_same_grid(image_grid, moved, _RESAMPLE_HINT)
    return True
