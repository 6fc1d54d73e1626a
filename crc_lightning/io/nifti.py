"""NIfTI reading and writing (nibabel), converted to the :class:`Volume` convention.

NIfTI stores ``data[i, j, k]`` with an affine ``A`` mapping voxel indices to **RAS** millimetres:
``ras = A @ [i, j, k, 1]``. ``Volume`` keeps ``array[z, y, x]`` in **LPS** (the DICOM/ITK space), so

* ``array = data.transpose(2, 1, 0)`` (``i`` is ``x``, ``j`` is ``y``, ``k`` is ``z``);
* ``lps = F @ ras`` with ``F = diag(-1, -1, 1)``: the x and y *rows* of the affine change sign
  (RAS→LPS flips the first two patient axes; the voxel axes are untouched);
* ``spacing[axis] = |column of F @ A[:3, :3]|``, ``direction`` = those columns normalised
  (reordered to x, y, z = i, j, k), ``origin = F @ A[:3, 3]``.

This is what ITK/SimpleITK do when they read NIfTI, so a file read here and by SimpleITK gives the
same origin, spacing and direction. The readers then bring the array into the canonical voxel order
(:meth:`~crc_lightning.io.volume.Volume.canonical`, axis permutation/flip only), so a RAS, LAS or
LPS file of one scan gives one array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crc_lightning.io.errors import InputError
from crc_lightning.io.files import atomic_path
from crc_lightning.io.volume import Volume, check_finite, is_orthonormal

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def affine_to_geometry(
    affine: np.ndarray,
) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """Split a NIfTI (RAS) affine into ``(spacing zyx, origin LPS, direction LPS columns xyz)``."""
    m = RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3, :3]  # columns: i(x), j(y), k(z) in LPS
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms <= 0) or not np.all(np.isfinite(norms)):
        raise ValueError(f"degenerate affine {affine.tolist()}")
    direction = m / norms
    origin = RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3, 3]
    spacing = (float(norms[2]), float(norms[1]), float(norms[0]))
    return spacing, (float(origin[0]), float(origin[1]), float(origin[2])), direction


def geometry_to_affine(volume: Volume) -> np.ndarray:
    """The NIfTI (RAS) affine of a volume's grid: inverse of :func:`affine_to_geometry`."""
    sz, sy, sx = volume.spacing
    affine = np.eye(4)
    affine[:3, :3] = RAS_TO_LPS @ (volume.direction @ np.diag([sx, sy, sz]))
    affine[:3, 3] = RAS_TO_LPS @ np.asarray(volume.origin, dtype=float)
    return affine


def _load(path: Path):  # -> nibabel image, header parsed, data not read
    import nibabel as nib

    if not path.is_file():
        raise InputError(path, "NIfTI file not found")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many kinds for truncated/corrupt files
        raise InputError(path, f"cannot read NIfTI file ({type(exc).__name__}: {exc})") from exc


def _geometry(path: Path, img) -> tuple:
    """(spacing, origin, direction) of a loaded image; a sheared affine is refused."""
    try:
        spacing, origin, direction = affine_to_geometry(img.affine)
    except ValueError as exc:
        raise InputError(path, str(exc)) from exc
    if not is_orthonormal(direction):
        raise InputError(
            path,
            "the affine is sheared (its axes are not perpendicular: a gantry-tilted scan saved "
            "without correction?); resample it onto an orthogonal grid first",
        )
    return spacing, origin, direction


def _shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D NIfTI volume, got shape {tuple(shape)}")
    return int(shape[2]), int(shape[1]), int(shape[0])


def read_nifti_grid(path: str | Path) -> Volume:
    """The canonical grid of a NIfTI file from its header alone (nothing decompressed beyond it):
    a zero-memory volume, for validation."""
    path = Path(path)
    img = _load(path)
    shape = _shape(path, img.shape)
    spacing, origin, direction = _geometry(path, img)
    grid = np.broadcast_to(np.zeros((), np.uint8), shape)
    return Volume(grid, spacing, origin, direction, source=str(path)).canonical()


def read_nifti(
    path: str | Path, *, as_mask: bool = False, nonfinite: float | None = None
) -> Volume:
    """Read a NIfTI file in the canonical voxel order (:mod:`crc_lightning.io.volume`):
    float32 values (scaling applied), or int32 labels when ``as_mask``.

    Labels must be whole numbers; a mask file holding fractional values is refused rather than
    silently truncated. An image holding NaN/±inf is refused with the count (or those voxels set to
    ``nonfinite``). The reorientation is a view; the one copy is the conversion to float32/int32,
    made after it, so the array comes out C-contiguous in canonical order.
    """
    path = Path(path)
    img = _load(path)
    _shape(path, img.shape)
    spacing, origin, direction = _geometry(path, img)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI data ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4:
        data = data[..., 0]
    raw = Volume(data.transpose(2, 1, 0), spacing, origin, direction, source=str(path))
    vol = raw.canonical()
    if as_mask:
        return vol.with_array(_to_labels(vol.array, path))
    array = vol.array
    if array.dtype != np.float32:
        array = array.astype(np.float32, order="C")
    return vol.with_array(check_finite(array, path, nonfinite))


def _to_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer label array (int32), refusing fractional or non-finite values."""
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array if array.dtype == np.int32 else array.astype(np.int32, order="C")
    if not np.all(np.isfinite(array)):
        raise InputError(path, "mask contains NaN or infinite values")
    rounded = np.rint(array)
    if not np.allclose(array, rounded, atol=1e-3):
        raise InputError(path, "mask contains non-integer values; expected integer labels")
    return rounded.astype(np.int32)


def nifti_dtype(array: np.ndarray) -> np.dtype:
    """On-disk type: labels as uint8/int16/int32, HU as int16 when exact, else float32.

    Integer (or boolean) arrays are labels or integer HU and are stored in the smallest signed or
    unsigned type that holds them; float arrays whose values are all whole numbers in the int16
    range are stored as int16 (exact, half the size); any other float array as float32.
    """
    if array.size == 0:
        return np.dtype(np.float32)
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        for dt in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dt)
        raise ValueError(f"label values {lo}..{hi} do not fit in int32")
    finite = np.all(np.isfinite(array))
    if finite and np.array_equal(array, np.rint(array)):
        info = np.iinfo(np.int16)
        if info.min <= array.min() and array.max() <= info.max:
            return np.dtype(np.int16)
    return np.dtype(np.float32)


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write ``volume`` as a NIfTI file (``.nii`` or ``.nii.gz``) that :func:`read_nifti` reads back
    exactly (values, spacing, origin, direction).

    Written atomically (:func:`crc_lightning.io.files.atomic_path`). Both qform and sform carry the affine (code 1,
    scanner), so readers that prefer either agree.
    """
    import nibabel as nib

    path = Path(path)
    if not is_nifti_path(path):
        raise InputError(path, "NIfTI output must end in .nii or .nii.gz")
    try:
        dtype = nifti_dtype(volume.array)
    except ValueError as exc:
        raise InputError(path, str(exc)) from exc
    data = np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0)).astype(dtype)
    affine = geometry_to_affine(volume)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units(xyz="mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
