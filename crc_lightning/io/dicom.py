"""DICOM series folders (pydicom): a CT series → :class:`Volume` in HU, and back.

Reading rules (why: file names and InstanceNumber are not reliable slice orders in the wild):

* every regular file in the folder is tried; files that are not DICOM, and DICOM objects without
  pixel data (e.g. ``DICOMDIR``), are skipped; a folder with no image slice is refused;
* slices are ordered by their position along the slice normal,
  ``normal = row_cosine × col_cosine`` (from ImageOrientationPatient) and
  ``position = ImagePositionPatient · normal``;
* values go through pydicom's modality LUT (RescaleSlope/Intercept), so images are in HU;
* ``spacing = (sz, sy, sx)`` with ``sy, sx = PixelSpacing`` (row spacing, column spacing) and ``sz``
  the median step between consecutive slice positions; ``origin`` is the first slice's
  ImagePositionPatient; ``direction`` columns are (row cosine, column cosine, normal).

Refused, with an :class:`InputError` naming the folder and the problem: several SeriesInstanceUIDs,
two slices at one position, slices whose orientation / size / pixel spacing differ, a stack not
perpendicular to its slices (gantry tilt), uneven slice steps and missing slices. Tolerance for a
step: ``max(SLICE_ATOL_MM, SLICE_RTOL × median step)`` = max(0.01 mm, 1 %). A step ≈ k × median
(k ≥ 2) is reported as k−1 missing slices; any other deviation as uneven spacing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crc_lightning.io.errors import InputError
from crc_lightning.io.files import atomic_dir, series_files
from crc_lightning.io.volume import Volume

SLICE_ATOL_MM = 0.01  # absolute tolerance on a slice step (mm)
SLICE_RTOL = 0.01  # relative tolerance on a slice step (fraction of the median step)
ORIENTATION_ATOL = 1e-4  # between slices' direction cosines
DUPLICATE_ATOL_MM = 1e-3  # two slices closer than this along the normal are at one position


@dataclass
class _Slice:
    path: Path
    ds: object  # pydicom Dataset
    row: np.ndarray
    col: np.ndarray
    ipp: np.ndarray


def _read_slices(folder: Path) -> list[_Slice]:
    """Every DICOM image slice in ``folder`` (not recursive); non-image files are skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not folder.is_dir():
        raise InputError(folder, "DICOM series folder not found")
    slices: list[_Slice] = []
    for path in series_files(folder):
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            try:  # old files without the 128-byte preamble; garbage parses without PixelData
                ds = pydicom.dcmread(path, force=True)
                _ = ds.get("ImagePositionPatient"), ds.get("PixelData")
            except Exception:
                continue
        except (EOFError, OSError, ValueError, TypeError, KeyError):
            continue  # not DICOM (or not readable as such): skip, like any other stray file
        if "PixelData" not in ds:
            continue  # DICOMDIR, structured reports, presentation states, …
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(
                folder, f"{path.name} is a multi-frame object; expected one file per slice"
            )
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient") if k not in ds]
        missing += [k for k in ("PixelSpacing", "Rows", "Columns") if k not in ds]
        if missing:
            raise InputError(folder, f"{path.name} lacks {', '.join(missing)}; cannot place it")
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        if iop.shape != (6,):
            raise InputError(folder, f"{path.name} has a malformed ImageOrientationPatient")
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
        slices.append(_Slice(path, ds, iop[:3], iop[3:], ipp))
    if not slices:
        raise InputError(folder, "no DICOM image files in the folder")
    return slices


def _check_consistent(folder: Path, slices: list[_Slice]) -> None:
    """Refuse slices that do not belong to one regular image stack."""
    uids = sorted({str(s.ds.get("SeriesInstanceUID", "")) for s in slices})
    if len(uids) > 1:
        shown = ", ".join(uids[:3]) + (" …" if len(uids) > 3 else "")
        raise InputError(
            folder, f"mixed series: {len(uids)} different SeriesInstanceUIDs ({shown})"
        )
    ref = slices[0]
    ref_ps = np.asarray([float(v) for v in ref.ds.PixelSpacing], dtype=float)
    for s in slices[1:]:
        if not (
            np.allclose(s.row, ref.row, atol=ORIENTATION_ATOL)
            and np.allclose(s.col, ref.col, atol=ORIENTATION_ATOL)
        ):
            raise InputError(
                folder,
                f"inconsistent orientation: {s.path.name} has ImageOrientationPatient differing "
                f"from {ref.path.name}",
            )
        if (int(s.ds.Rows), int(s.ds.Columns)) != (int(ref.ds.Rows), int(ref.ds.Columns)):
            raise InputError(
                folder,
                f"inconsistent slice shape: {s.path.name} is {s.ds.Rows}x{s.ds.Columns}, "
                f"{ref.path.name} is {ref.ds.Rows}x{ref.ds.Columns}",
            )
        ps = np.asarray([float(v) for v in s.ds.PixelSpacing], dtype=float)
        if not np.allclose(ps, ref_ps, rtol=1e-4, atol=1e-6):
            raise InputError(
                folder,
                f"inconsistent PixelSpacing: {s.path.name} has {ps.tolist()}, "
                f"{ref.path.name} has {ref_ps.tolist()}",
            )


def _slice_step(folder: Path, positions: np.ndarray, names: list[str]) -> float:
    """The regular step between sorted slice positions; refuse duplicates, gaps and unevenness."""
    steps = np.diff(positions)
    dup = np.flatnonzero(steps < DUPLICATE_ATOL_MM)
    if dup.size:
        i = int(dup[0])
        raise InputError(
            folder,
            f"duplicate slice position {positions[i]:.3f} mm along the normal "
            f"({names[i]} and {names[i + 1]})",
        )
    step = float(np.median(steps))
    tol = max(SLICE_ATOL_MM, SLICE_RTOL * step)
    for i, d in enumerate(steps):
        if abs(d - step) <= tol:
            continue
        k = round(d / step)
        if k >= 2 and abs(d - k * step) <= tol * k:
            raise InputError(
                folder,
                f"missing slice(s): gap of {d:.3f} mm ≈ {k} × spacing {step:.3f} mm between "
                f"{names[i]} ({positions[i]:.3f} mm) and {names[i + 1]} "
                f"({positions[i + 1]:.3f} mm): {k - 1} slice(s) absent",
            )
        raise InputError(
            folder,
            f"uneven slice spacing: step of {d:.3f} mm between {names[i]} and {names[i + 1]} "
            f"differs from the median {step:.3f} mm by more than {tol:.3f} mm "
            f"(tolerance max({SLICE_ATOL_MM} mm, {SLICE_RTOL:.0%}))",
        )
    return step


def _pixels(folder: Path, s: _Slice) -> np.ndarray:
    """One slice's values after the modality LUT (Rescale Slope/Intercept), as float64."""
    from pydicom.pixels import apply_modality_lut

    try:
        raw = s.ds.pixel_array
    except Exception as exc:  # missing decoder plug-in, truncated pixel data, …
        raise InputError(
            folder, f"cannot decode pixels of {s.path.name} ({type(exc).__name__}: {exc})"
        ) from exc
    if raw.ndim != 2:
        raise InputError(folder, f"{s.path.name} is not a single-channel 2D slice ({raw.shape})")
    return np.asarray(apply_modality_lut(raw, s.ds), dtype=np.float64)


def _sorted_stack(folder: Path) -> tuple[list[_Slice], np.ndarray, float]:
    """The folder's slices ordered along the normal, their normal vector and the slice step."""
    slices = _read_slices(folder)
    _check_consistent(folder, slices)
    ref = slices[0]
    normal = np.cross(ref.row, ref.col)
    positions = np.asarray([float(s.ipp @ normal) for s in slices])
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    names = [s.path.name for s in slices]
    ps = [float(v) for v in ref.ds.PixelSpacing]
    if len(slices) > 1:
        sz = _slice_step(folder, positions, names)
        # the stack must run along the normal: in-plane drift means a tilted/sheared acquisition
        drift = (slices[-1].ipp - slices[0].ipp) - (positions[-1] - positions[0]) * normal
        if np.linalg.norm(drift) > max(SLICE_ATOL_MM, 0.01 * min(ps)) * (len(slices) - 1):
            raise InputError(
                folder,
                "slices are not stacked along their normal (gantry tilt or sheared stack, "
                f"in-plane drift {np.linalg.norm(drift):.3f} mm); resample the series first",
            )
    else:
        thickness = ref.ds.get("SpacingBetweenSlices") or ref.ds.get("SliceThickness") or 1.0
        sz = float(thickness) if float(thickness) > 0 else 1.0
    return slices, normal, sz


def series_grid(folder: str | Path) -> tuple[list, Volume]:
    """The validated datasets of a series folder, ordered along the slice normal (the z order of
    :func:`read_dicom_series`), and its grid as a zero-memory uint8 :class:`Volume` (no pixel
    decoding), for writers that must reference the series (DICOM SEG)."""
    folder = Path(folder)
    slices, normal, sz = _sorted_stack(folder)
    ref = slices[0]
    ps = [float(v) for v in ref.ds.PixelSpacing]
    shape = (len(slices), int(ref.ds.Rows), int(ref.ds.Columns))
    grid = Volume(
        np.broadcast_to(np.zeros((), np.uint8), shape),
        (sz, ps[0], ps[1]),
        tuple(ref.ipp),
        np.stack([ref.row, ref.col, normal], axis=1),
        source=str(folder),
    )
    return [s.ds for s in slices], grid


def read_dicom_series(folder: str | Path) -> Volume:
    """Read a DICOM series folder as a float32 volume of modality values (HU for CT)."""
    folder = Path(folder)
    slices, normal, sz = _sorted_stack(folder)
    ref = slices[0]
    ps = [float(v) for v in ref.ds.PixelSpacing]  # [row spacing (sy), column spacing (sx)]
    array = np.stack([_pixels(folder, s) for s in slices]).astype(np.float32)
    direction = np.stack([ref.row, ref.col, normal], axis=1)
    return Volume(array, (sz, ps[0], ps[1]), tuple(slices[0].ipp), direction, source=str(folder))


def mask_labels(array: np.ndarray, where: str | Path) -> np.ndarray:
    """Integer labels from mask values.

    Rule: values must be whole and non-negative. If they are ⊆ {0, m} for a single m > 0 (e.g. the
    0/255 masks of IRCADb), the mask is binary and becomes {0, 1}; otherwise (instance masks 0..n)
    values are kept as they are.
    """
    if not np.all(np.isfinite(array)):
        raise InputError(where, "mask contains NaN or infinite values")
    rounded = np.rint(array)
    if not np.allclose(array, rounded, atol=1e-3):
        raise InputError(where, "mask contains non-integer values; expected integer labels")
    labels = rounded.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise InputError(where, f"mask contains negative values (min {labels.min()})")
    values = np.unique(labels)
    nonzero = values[values != 0]
    if nonzero.size == 1:
        return (labels != 0).astype(np.int32)
    if nonzero.size and nonzero.max() > np.iinfo(np.int32).max:
        raise InputError(where, "mask values do not fit in int32")
    return labels.astype(np.int32)


def read_dicom_mask_series(folder: str | Path) -> Volume:
    """Read a folder of mask slices (e.g. IRCADb ``MASKS_DICOM/livertumor01``) as int32 labels."""
    vol = read_dicom_series(folder)
    return Volume(
        mask_labels(vol.array, folder), vol.spacing, vol.origin, vol.direction, source=vol.source
    )


def is_dicom_file(path: str | Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble marker (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _ds(value: float) -> str:
    """A Decimal String (≤ 16 characters) for a float, as exact as that allows."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _stored_values(
    array: np.ndarray, rescale: tuple[float, float], folder: Path
) -> tuple[np.ndarray, int]:
    """Stored pixel values for ``value = stored * slope + intercept``: (array, PixelRepresentation).

    uint16 (PixelRepresentation 0) when every stored value is ≥ 0, else int16 (1).
    """
    slope, intercept = (float(v) for v in rescale)
    if slope == 0 or not np.isfinite(slope) or not np.isfinite(intercept):
        raise InputError(folder, f"invalid rescale (slope, intercept) = {rescale}")
    if not np.all(np.isfinite(array)):
        raise InputError(folder, "volume contains NaN or infinite values")
    stored = np.rint((np.asarray(array, dtype=np.float64) - intercept) / slope)
    lo, hi = (float(stored.min()), float(stored.max())) if stored.size else (0.0, 0.0)
    if lo >= 0 and hi <= np.iinfo(np.uint16).max:
        return stored.astype("<u2"), 0
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return stored.astype("<i2"), 1
    raise InputError(
        folder,
        f"values {array.min()}..{array.max()} do not fit 16-bit storage with rescale {rescale}",
    )


def _uid(series_uid: str, *parts: object) -> str:
    """A UID derived from the series UID, so a given series UID always yields the same files."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[series_uid, *map(str, parts)])


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    patient_id: str,
    series_uid: str | None = None,
    rescale: tuple[float, float] = (1.0, -1024.0),
    shuffle_names: bool = False,
) -> Path:
    """Write ``volume`` as a CT series: one Explicit VR Little Endian file per slice.

    Stored values are ``round((value − intercept) / slope)`` as uint16 (or int16 when some stored
    value is negative), with PixelRepresentation, RescaleSlope/Intercept set accordingly, so
    :func:`read_dicom_series` gives the array back exactly for values on the rescale lattice (e.g.
    integer HU with slope 1) and within slope/2 otherwise. Slice ``k`` sits at
    ``origin + k · sz · direction[:, 2]``; ImageOrientationPatient is ``direction[:, 0..1]``.

    Given ``series_uid``, every other UID is derived from it and no dates are written, so the files
    are byte-for-byte reproducible (content hashing of a generated cohort stays stable).
    ``shuffle_names`` permutes the file names *and* InstanceNumbers, to exercise readers that must
    order slices by position only. The folder must not exist or be empty; files are written to a
    temporary sibling folder and renamed into place, so a failure leaves nothing half-written.
    If ``direction[:, 2]`` is opposite to ``row × col``, a reader returns the same physical volume
    with the z axis reversed (DICOM stacks are ordered along the normal).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(folder, "output folder exists and is not empty; refusing to mix series")
    d = np.asarray(volume.direction, dtype=float)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
        raise InputError(folder, "direction is not orthonormal; DICOM cannot represent it")
    if not np.allclose(np.abs(np.cross(d[:, 0], d[:, 1]) @ d[:, 2]), 1.0, atol=1e-6):
        raise InputError(folder, "z axis is not perpendicular to the slices")
    stored, pixel_rep = _stored_values(volume.array, rescale, folder)
    nz, ny, nx = volume.shape
    sz, sy, sx = volume.spacing
    series_uid = str(series_uid) if series_uid else generate_uid()
    study_uid = _uid(series_uid, "study")
    frame_uid = _uid(series_uid, "frame-of-reference")
    seed = zlib.crc32(series_uid.encode())
    perm = np.random.default_rng(seed).permutation(nz) if shuffle_names else np.arange(nz)
    origin = np.asarray(volume.origin, dtype=float)
    iop = [_ds(v) for v in (*d[:, 0], *d[:, 1])]

    with atomic_dir(folder) as tmp:
        for k in range(nz):
            sop_uid = _uid(series_uid, "slice", k)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = ""
            ds.StudyTime = ""
            ds.AccessionNumber = ""
            ds.Modality = "CT"
            ds.Manufacturer = "crc-lightning"
            ds.ReferringPhysicianName = ""
            ds.PatientName = f"{patient_id}^"  # family-name component only
            ds.PatientID = str(patient_id)
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.KVP = ""
            ds.SliceThickness = _ds(sz)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = 1
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = int(perm[k]) + 1
            ipp = origin + k * sz * d[:, 2]
            ds.ImagePositionPatient = [_ds(v) for v in ipp]
            ds.ImageOrientationPatient = iop
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = _ds(float(ipp @ np.cross(d[:, 0], d[:, 1])))
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ny
            ds.Columns = nx
            ds.PixelSpacing = [_ds(sy), _ds(sx)]
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = pixel_rep
            ds.RescaleIntercept = _ds(rescale[1])
            ds.RescaleSlope = _ds(rescale[0])
            ds.RescaleType = "HU"
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ds.save_as(
                tmp / f"{int(perm[k]):04d}.dcm",
                implicit_vr=False,
                little_endian=True,
                enforce_file_format=True,
            )
    return folder
