"""DICOM CT (pydicom, highdicom): a series folder or an Enhanced CT file → :class:`Volume` in HU.

Reading rules (why: file names and InstanceNumber are not reliable slice orders in the wild):

* every regular file in the folder is tried; files that are not DICOM, and DICOM objects without
  pixel data (e.g. ``DICOMDIR``), are skipped; a folder with no image slice is refused. Headers are
  read with pixel data deferred, so :func:`dicom_series_grid` checks a whole series (validation)
  without decoding a pixel;
* slices are ordered by their position along the slice normal,
  ``normal = row_cosine × col_cosine`` (from ImageOrientationPatient) and
  ``position = ImagePositionPatient · normal``;
* pixels are decoded by pydicom's pixel backends: native for uncompressed and RLE, the pylibjpeg
  plug-ins (libjpeg: JPEG Baseline/Extended/Lossless/JPEG-LS; openjpeg: JPEG 2000; rle) declared
  as dependencies, or python-gdcm when installed; values go through the modality LUT
  (RescaleSlope/Intercept), so images are in HU;
* ``spacing = (sz, sy, sx)`` with ``sy, sx = PixelSpacing`` (row spacing, column spacing) and ``sz``
  the median step between consecutive slice positions; ``origin`` is the first slice's
  ImagePositionPatient; ``direction`` columns are (row cosine, column cosine, normal); the volume
  is then brought into the canonical voxel order (:meth:`Volume.canonical`, a view);
* an **Enhanced CT** object (one file, many frames with per-frame positions) is read by highdicom
  (``Image.get_volume``: frames sorted spatially, modality transform applied), alone or as the only
  image object of a folder, and gives what the equivalent series gives.

Refused, with an :class:`InputError` naming the folder and the problem: several SeriesInstanceUIDs,
two slices at one position, slices whose orientation / size / pixel spacing differ, uneven slice
steps and missing slices. Tolerance for a step: ``max(SLICE_ATOL_MM, SLICE_RTOL × median step)`` =
max(0.01 mm, 1 %). A step ≈ k × median (k ≥ 2) is reported as k−1 missing slices; any other
deviation as uneven spacing. A stack not perpendicular to its slices (**gantry tilt**) is refused
unless ``ReadOptions.gantry_tilt == "resample"``: then the slices (whose positions must advance by
one constant vector) are resampled onto the orthogonal grid of the first slice
(:func:`~crc_lightning.io.resample.deshear`, SimpleITK).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crc_lightning.io.errors import InputError
from crc_lightning.io.files import atomic_dir, series_files
from crc_lightning.io.volume import ReadOptions, Volume, check_finite

SLICE_ATOL_MM = 0.01  # absolute tolerance on a slice step (mm)
SLICE_RTOL = 0.01  # relative tolerance on a slice step (fraction of the median step)
ORIENTATION_ATOL = 1e-4  # between slices' direction cosines
DUPLICATE_ATOL_MM = 1e-3  # two slices closer than this along the normal are at one position
_DEFER = 1024  # header reads leave larger values (pixel data) on disk until used


@dataclass
class _Slice:
    path: Path
    ds: object  # pydicom Dataset (pixel data deferred)
    row: np.ndarray
    col: np.ndarray
    ipp: np.ndarray


@dataclass
class _Stack:
    """A validated series: slices ordered along the normal, the claimed grid and the true step."""

    slices: list[_Slice]
    normal: np.ndarray
    sz: float
    step: np.ndarray  # LPS vector from one slice's position to the next
    tilted: bool

    def grid(self, folder: Path) -> Volume:
        """The stack's grid in DICOM order (not canonical), zero-memory."""
        ref = self.slices[0]
        ps = [float(v) for v in ref.ds.PixelSpacing]
        shape = (len(self.slices), int(ref.ds.Rows), int(ref.ds.Columns))
        return Volume(
            np.broadcast_to(np.zeros((), np.uint8), shape),
            (self.sz, ps[0], ps[1]),
            tuple(ref.ipp),
            np.stack([ref.row, ref.col, self.normal], axis=1),
            source=str(folder),
        )


def _dcmread(path: Path):  # -> pydicom.Dataset | None
    """The dataset of a file with large values deferred, or None when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, defer_size=_DEFER)
    except InvalidDicomError:
        try:  # old files without the 128-byte preamble; garbage parses without PixelData
            ds = pydicom.dcmread(path, force=True, defer_size=_DEFER)
            _ = ds.get("ImagePositionPatient"), ds.get("PixelData")
            return ds
        except Exception:
            return None
    except (EOFError, OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # not DICOM (or not readable as such): skip, like any other stray file


def _is_multiframe(ds) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _image_objects(folder: Path) -> list[tuple[Path, object]]:
    """Every DICOM object with pixel data in ``folder`` (not recursive)."""
    if not folder.is_dir():
        raise InputError(folder, "DICOM series folder not found")
    found = []
    for path in series_files(folder):
        ds = _dcmread(path)
        if ds is not None and "PixelData" in ds:  # DICOMDIR, SR, presentation states: skipped
            found.append((path, ds))
    if not found:
        raise InputError(folder, "no DICOM image files in the folder")
    return found


def _read_slices(folder: Path, objects: list[tuple[Path, object]]) -> list[_Slice]:
    """The single-frame image slices of a folder, with their placement attributes."""
    slices: list[_Slice] = []
    for path, ds in objects:
        if _is_multiframe(ds):
            raise InputError(
                folder,
                f"{path.name} is a multi-frame object among {len(objects)} image files; expected "
                "one file per slice, or a folder holding one Enhanced CT file",
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
        ts = getattr(getattr(s.ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax = f"transfer syntax {ts.name}; " if ts is not None else ""
        raise InputError(
            folder,
            f"cannot decode pixels of {s.path.name} ({syntax}{type(exc).__name__}: {exc})",
        ) from exc
    if raw.ndim != 2:
        raise InputError(folder, f"{s.path.name} is not a single-channel 2D slice ({raw.shape})")
    return np.asarray(apply_modality_lut(raw, s.ds), dtype=np.float64)


def _sorted_stack(folder: Path, slices: list[_Slice], gantry_tilt: str = "refuse") -> _Stack:
    """The folder's slices ordered along the normal, validated; tilt refused or measured."""
    _check_consistent(folder, slices)
    ref = slices[0]
    normal = np.cross(ref.row, ref.col)
    positions = np.asarray([float(s.ipp @ normal) for s in slices])
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    names = [s.path.name for s in slices]
    ps = [float(v) for v in ref.ds.PixelSpacing]
    if len(slices) == 1:
        thickness = ref.ds.get("SpacingBetweenSlices") or ref.ds.get("SliceThickness") or 1.0
        sz = float(thickness) if float(thickness) > 0 else 1.0
        return _Stack(slices, normal, sz, sz * normal, False)
    sz = _slice_step(folder, positions, names)
    # the stack must run along the normal: in-plane drift means a tilted/sheared acquisition
    n = len(slices)
    ipps = np.stack([s.ipp for s in slices])
    drift = (ipps[-1] - ipps[0]) - (positions[-1] - positions[0]) * normal
    tol = max(SLICE_ATOL_MM, 0.01 * min(ps))
    if np.linalg.norm(drift) <= tol * (n - 1):
        return _Stack(slices, normal, sz, sz * normal, False)
    tilt = np.degrees(np.arctan2(np.linalg.norm(drift), positions[-1] - positions[0]))
    if gantry_tilt != "resample":
        raise InputError(
            folder,
            f"slices are not stacked along their normal (gantry tilt {tilt:.2f}° or a sheared "
            f"stack: in-plane drift {np.linalg.norm(drift):.3f} mm over {n} slices); set "
            "preprocess.gantry_tilt=resample to resample it onto an orthogonal grid",
        )
    k = np.arange(n, dtype=float)
    step = (ipps[-1] - ipps[0]) / (n - 1)
    residual = np.linalg.norm(ipps - (ipps[0] + k[:, None] * step), axis=1).max()
    if residual > tol:
        raise InputError(
            folder,
            f"slice positions do not advance by one constant vector (deviation {residual:.3f} mm):"
            " not a gantry tilt that can be resampled",
        )
    return _Stack(slices, normal, sz, step, True)


def _folder_stack(folder: Path, gantry_tilt: str) -> tuple[_Stack | None, Path | None]:
    """(validated stack, None) for a series folder, or (None, file) when the folder holds one
    Enhanced (multi-frame) object."""
    objects = _image_objects(folder)
    if len(objects) == 1 and _is_multiframe(objects[0][1]):
        return None, objects[0][0]
    return _sorted_stack(folder, _read_slices(folder, objects), gantry_tilt), None


def series_grid(folder: str | Path) -> tuple[list, Volume]:
    """The validated datasets of a series folder, ordered along the slice normal, and its grid in
    that DICOM order (zero-memory, not canonical), for writers that must reference the series
    (DICOM SEG)."""
    folder = Path(folder)
    stack = _sorted_stack(folder, _read_slices(folder, _image_objects(folder)))
    return [s.ds for s in stack.slices], stack.grid(folder)


def dicom_series_grid(folder: str | Path, options: ReadOptions | None = None) -> Volume:
    """The canonical grid :func:`read_dicom_series` would return, from the headers alone (no pixel
    is decoded): every refusal of the reader happens here too, in seconds."""
    options = options or ReadOptions()
    folder = Path(folder)
    stack, enhanced = _folder_stack(folder, options.gantry_tilt)
    if enhanced is not None:
        return enhanced_grid(enhanced)
    return stack.grid(folder).canonical()  # type: ignore[union-attr]


def read_dicom_series(
    folder: str | Path, options: ReadOptions | None = None, *, mask: bool = False
) -> Volume:
    """Read a DICOM series folder (or a folder holding one Enhanced CT file) as a float32 volume of
    modality values (HU for CT), in the canonical voxel order. ``mask`` only changes how a tilted
    stack is resampled (nearest neighbour) and skips the NaN check."""
    options = options or ReadOptions()
    folder = Path(folder)
    stack, enhanced = _folder_stack(folder, options.gantry_tilt)
    if enhanced is not None:
        vol = read_enhanced_ct(enhanced)
        if not mask:
            vol = vol.with_array(check_finite(vol.array, enhanced, options.nonfinite_hu))
        return vol
    assert stack is not None
    grid = stack.grid(folder)
    array = np.stack([_pixels(folder, s) for s in stack.slices]).astype(np.float32)
    if not mask:
        array = check_finite(array, folder, options.nonfinite_hu)
    vol = grid.with_array(array)
    if stack.tilted:
        from crc_lightning.io.resample import deshear

        vol = deshear(vol, stack.step, nearest=mask)
        vol.array = vol.array.astype(np.float32, copy=False)
    return vol.canonical()


def _enhanced(path: Path, lazy: bool):  # -> highdicom.Image
    import highdicom as hd

    try:
        return hd.imread(str(path), lazy_frame_retrieval=lazy)
    except Exception as exc:
        raise InputError(path, f"not a readable DICOM image ({type(exc).__name__}: {exc})") from exc


def _from_hd_affine(array: np.ndarray, affine: np.ndarray, source: str) -> Volume:
    """A :class:`Volume` from an array indexed (slice, row, column) and its LPS affine (the
    highdicom convention)."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    direction = np.stack([m[:, 2] / norms[2], m[:, 1] / norms[1], m[:, 0] / norms[0]], axis=1)
    spacing = (float(norms[0]), float(norms[1]), float(norms[2]))
    return Volume(array, spacing, tuple(np.asarray(affine)[:3, 3]), direction, source=source)


def enhanced_grid(path: str | Path) -> Volume:
    """The canonical grid of an Enhanced (multi-frame) CT file from its header (frames unread)."""
    path = Path(path)
    geometry = _enhanced(path, lazy=True).get_volume_geometry()
    if geometry is None:
        raise InputError(
            path,
            "the frames of this multi-frame object do not form a regular 3D volume (uneven or "
            "missing positions, or a tilted stack)",
        )
    shape = tuple(int(n) for n in geometry.spatial_shape)
    grid = np.broadcast_to(np.zeros((), np.uint8), shape)
    return _from_hd_affine(grid, geometry.affine, str(path)).canonical()


def read_enhanced_ct(path: str | Path) -> Volume:
    """Read an Enhanced CT (multi-frame) file as float32 HU in the canonical voxel order
    (highdicom: frames placed by their per-frame positions, modality transform applied)."""
    path = Path(path)
    image = _enhanced(path, lazy=False)
    try:
        hvol = image.get_volume(
            dtype=np.float32, apply_real_world_transform=False, apply_modality_transform=True
        )
    except Exception as exc:
        raise InputError(
            path,
            "cannot build a volume from the frames of this multi-frame object "
            f"({type(exc).__name__}: {exc})",
        ) from exc
    array = np.asarray(hvol.array, dtype=np.float32)
    return _from_hd_affine(array, hvol.affine, str(path)).canonical()


def mask_labels(array: np.ndarray, where: str | Path) -> np.ndarray:
    """Integer labels from mask values: whole, non-negative, finite; kept as they are (a 0/255
    mask stays 0/255: what its lesions are is the lesion rule's business,
    :mod:`crc_lightning.io.lesions`)."""
    if not np.all(np.isfinite(array)):
        raise InputError(where, "mask contains NaN or infinite values")
    rounded = np.rint(array)
    if not np.allclose(array, rounded, atol=1e-3):
        raise InputError(where, "mask contains non-integer values; expected integer labels")
    if rounded.size and rounded.min() < 0:
        raise InputError(where, f"mask contains negative values (min {rounded.min():g})")
    if rounded.size and rounded.max() > np.iinfo(np.int32).max:
        raise InputError(where, "mask values do not fit in int32")
    return rounded.astype(np.int32)


def read_dicom_mask_series(folder: str | Path, options: ReadOptions | None = None) -> Volume:
    """Read a folder of mask slices (e.g. IRCADb ``MASKS_DICOM/livertumor01``) as int32 labels."""
    vol = read_dicom_series(folder, options, mask=True)
    return vol.with_array(mask_labels(vol.array, folder))


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
