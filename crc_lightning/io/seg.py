"""DICOM Segmentation objects (highdicom): lesion masks ↔ :class:`Volume` label maps.

One reader for every binary SEG, :func:`read_dicom_seg`:

* **which segments are lesions** — ``segments``: ``None`` = all of them; a label regular expression
  (searched in SegmentLabel, case-insensitive, e.g. TCIA-CRLM's ``"tumou?r"`` for ``Tumor_1`` …);
  or a list of segment numbers. Only the named segments are read, so organ segments that overlap
  the lesions (Liver ⊃ Tumor_1) are no obstacle; named segments that overlap each other are refused
  (one voxel, one lesion), naming the pair;
* **values** — a voxel of segment *n* holds *n* (the segment number is the lesion's instance id);
* **placement** — with ``reference`` (the image's canonical grid) every frame of the named segments
  must lie on it: its first pixel at a voxel position (within 0.1 voxel), its rows and columns along
  the grid's axes at the grid's spacing (a SEG drawn on another axis order of the same grid is
  fine), and every annotated pixel inside the image. A frame off the grid (a CT missing an annotated
  slice, a SEG drawn on a thinner reconstruction, a shifted field of view) is an
  :class:`InputError` naming the SEG and the positions, never dropped; with ``resample=True`` the SEG
  is instead resampled onto the image grid (nearest neighbour). :func:`check_seg_frames` runs the
  position checks from the header alone, for manifest validation;
* without ``reference`` the SEG's own grid (highdicom ``get_volume``, frames placed by position,
  missing positions empty) in the canonical voxel order.

FRACTIONAL SEGs are refused (probabilities are not lesion masks).

highdicom is imported inside the functions so ``import crc_lightning.io`` stays fast.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crc_lightning.io.dicom import _from_hd_affine
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import atomic_path
from crc_lightning.io.volume import Volume, check_same_grid, describe_grid

__all__ = [
    "OffGridError",
    "SegmentSelector",
    "check_seg_frames",
    "check_seg_on_grid",
    "read_dicom_seg",
    "segment_labels",
    "select_segments",
    "write_dicom_seg",
]

GRID_ATOL_MM = 1e-2  # origin mismatch tolerated between a mask and its image series
FRAME_TOL_VOXEL = 0.1  # a frame's position may be off a voxel position by this fraction
_SHOWN = 5  # positions listed in an error

SegmentSelector = str | Sequence[int] | None


class OffGridError(InputError):
    """Frames of a SEG that do not lie on the image grid (resampling is the way out)."""


def segment_labels(ds) -> dict[int, str]:
    """Segment number → SegmentLabel of a SEG dataset (header only)."""
    return {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in ds.SegmentSequence}


def select_segments(labels: dict[int, str], segments: SegmentSelector, path: Path) -> list[int]:
    """The segment numbers ``segments`` names (sorted); naming none that exists is an error."""
    if segments is None or (isinstance(segments, str) and not segments.strip()):
        return sorted(labels)
    if isinstance(segments, str):
        try:
            pattern = re.compile(segments, re.IGNORECASE)
        except re.error as exc:
            raise InputError(
                path, f"segments {segments!r} is not a regular expression ({exc})"
            ) from exc
        numbers = sorted(n for n, label in labels.items() if pattern.search(label))
        if not numbers:
            shown = ", ".join(f"{n}: {lab!r}" for n, lab in sorted(labels.items()))
            raise InputError(
                path, f"no segment label matches {segments!r} (segments: {shown or 'none'})"
            )
        return numbers
    numbers = sorted({int(n) for n in segments})
    absent = [n for n in numbers if n not in labels]
    if absent or not numbers:
        raise InputError(
            path,
            f"segment number(s) {absent or '[]'} not in the SEG (it has {sorted(labels)})",
        )
    return numbers


def _segread(path: Path, lazy: bool):  # -> highdicom.seg.Segmentation
    import highdicom as hd

    if not path.is_file():
        raise InputError(path, "DICOM SEG file not found")
    try:
        seg = hd.seg.segread(path, lazy_frame_retrieval=lazy)
    except Exception as exc:  # not DICOM, or not a Segmentation
        raise InputError(path, f"not a readable DICOM SEG ({type(exc).__name__}: {exc})") from exc
    if str(seg.segmentation_type.value) == "FRACTIONAL":
        raise InputError(path, "fractional DICOM SEG is not a label mask; expected BINARY")
    return seg


def _frames(seg, numbers: list[int]) -> list[tuple[int, int, np.ndarray]]:
    """(1-based frame number, segment number, ImagePositionPatient) of the named segments' frames."""
    wanted = set(numbers)
    out = []
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number in wanted:
            ipp = np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
            out.append((i, number, ipp))
    return out


def _plane(seg, frame: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(row cosine, column cosine, (row spacing, column spacing)) of a frame (shared or own)."""

    def item(name: str):
        fg = seg.PerFrameFunctionalGroupsSequence[frame - 1]
        if name in fg:
            return fg[name].value[0]
        return seg.SharedFunctionalGroupsSequence[0][name].value[0]

    iop = np.asarray(item("PlaneOrientationSequence").ImageOrientationPatient, dtype=float)
    ps = item("PixelMeasuresSequence").PixelSpacing
    return iop[:3], iop[3:], (float(ps[0]), float(ps[1]))


def _index_map(reference: Volume):  # -> (inverse matrix, origin)
    sz, sy, sx = reference.spacing
    m = np.asarray(reference.direction, float) @ np.diag([sx, sy, sz])
    return np.linalg.inv(m), np.asarray(reference.origin, float)


def _is_axis_step(step: np.ndarray) -> bool:
    """True for ±1 along one grid axis and 0 along the others (same spacing, same axes)."""
    a = np.sort(np.abs(step))
    return bool(abs(a[2] - 1) <= 1e-3 and a[1] <= 1e-3)


def _name(reference: Volume) -> str:
    return f" {reference.source}" if reference.source else ""


def _where(ipp: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in ipp) + ")"


def check_seg_frames(
    path: Path, seg, numbers: list[int], reference: Volume
) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Check that every frame of the named segments lies on ``reference``'s grid (header only).

    Returns, per frame, (frame number, segment number, first-pixel voxel index (x, y, z), index
    step per column, index step per row); raises an :class:`InputError` naming the SEG, the
    off-grid positions and the image's grid otherwise.
    """
    inv, origin = _index_map(reference)
    shape_xyz = np.asarray(reference.shape[::-1])
    placed, off, outside = [], [], []
    steps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for frame, number, ipp in _frames(seg, numbers):
        row, col, (ps_r, ps_c) = _plane(seg, frame)
        u = inv @ (row * ps_c)  # index step per column
        v = inv @ (col * ps_r)  # index step per row
        for step in (u, v):
            if not _is_axis_step(step):
                raise OffGridError(
                    path,
                    f"its pixel grid (pixel spacing {ps_r:g}×{ps_c:g} mm, orientation "
                    f"{np.round(np.r_[row, col], 4).tolist()}) is not the grid of the image"
                    f"{_name(reference)} ({describe_grid(reference)}); "
                    "set preprocess.resample_mask=true to resample it",
                )
        steps[frame] = (np.rint(u), np.rint(v))
        idx = inv @ (ipp - origin)
        k = np.rint(idx)
        if np.abs(idx - k).max() > FRAME_TOL_VOXEL:
            off.append(ipp)
            continue
        normal_axis = int(np.argmax(np.abs(np.cross(np.rint(u), np.rint(v)))))
        if not 0 <= k[normal_axis] < shape_xyz[normal_axis]:
            outside.append(ipp)
            continue
        placed.append((frame, number, k.astype(int), *steps[frame]))
    if off or outside:
        bad = off + outside
        shown = ", ".join(_where(p) for p in bad[:_SHOWN]) + (" …" if len(bad) > _SHOWN else "")
        what = []
        if off:
            what.append(f"{len(off)} between the image's voxel positions")
        if outside:
            what.append(f"{len(outside)} outside the image")
        raise OffGridError(
            path,
            f"{len(bad)} frame(s) of segment(s) {numbers} are not on the grid of the image"
            f"{_name(reference)} ({' and '.join(what)}): first-pixel positions {shown} mm LPS;"
            f" image grid {describe_grid(reference)}. Refused rather than dropped (set "
            "preprocess.resample_mask=true to resample the SEG onto the image grid)",
        )
    return placed


def _overlap_error(path: Path, a: int, b: int, labels: dict[int, str]) -> InputError:
    return InputError(
        path,
        f"segments {a} ({labels.get(a, '')!r}) and {b} ({labels.get(b, '')!r}) overlap; name "
        "which segments are lesions (data.segments: a label regex such as 'tumou?r', or a list "
        "of segment numbers) so that each voxel belongs to one lesion",
    )


def _place(path: Path, seg, placed, reference: Volume, labels: dict[int, str]) -> np.ndarray:
    """The named segments' frames written into an int32 array on ``reference``'s grid."""
    out = np.zeros(reference.shape, np.int32)
    shape_xyz = np.asarray(reference.shape[::-1])
    outside = []
    for frame, number, k0, u, v in placed:
        pixels = np.asarray(seg.get_stored_frame(frame))
        rr, cc = np.nonzero(pixels)
        if rr.size == 0:
            continue
        xyz = k0[None, :] + rr[:, None] * v[None, :] + cc[:, None] * u[None, :]
        xyz = xyz.astype(np.int64)
        inside = np.all((xyz >= 0) & (xyz < shape_xyz), axis=1)
        if not inside.all():
            outside.append(int(np.count_nonzero(~inside)))
            continue
        z, y, x = xyz[:, 2], xyz[:, 1], xyz[:, 0]
        prior = out[z, y, x]
        clash = prior[(prior != 0) & (prior != number)]
        if clash.size:
            raise _overlap_error(path, int(clash[0]), number, labels)
        out[z, y, x] = number
    if outside:
        raise OffGridError(
            path,
            f"{sum(outside)} annotated pixel(s) in {len(outside)} frame(s) lie outside the image"
            f"{_name(reference)} ({describe_grid(reference)}); refused rather than cropped",
        )
    return out


def _own_volume(path: Path, seg, numbers: list[int], labels: dict[int, str]) -> Volume:
    """The named segments on the SEG's own grid (highdicom), canonical voxel order."""
    try:
        hvol = seg.get_volume(
            segment_numbers=numbers,
            combine_segments=True,
            relabel=False,
            allow_missing_positions=True,
        )
    except Exception as exc:  # overlapping segments, irregular or tilted frame positions, …
        message = str(exc)
        if "overlap" in message.lower() and len(numbers) > 1:
            raise _overlap_error(path, numbers[0], numbers[1], labels) from exc
        raise InputError(
            path, f"cannot build a label volume from the SEG ({type(exc).__name__}: {exc})"
        ) from exc
    array = np.asarray(hvol.array).astype(np.int32)
    return _from_hd_affine(array, hvol.affine, str(path)).canonical()


def read_dicom_seg(
    path: str | Path,
    reference: Volume | None = None,
    segments: SegmentSelector = None,
    resample: bool = False,
) -> Volume:
    """Read the named segments of a binary DICOM SEG as an int32 label map (value = segment
    number), on ``reference``'s grid when given; see the module docstring for every rule."""
    path = Path(path)
    seg = _segread(path, lazy=reference is not None)
    labels = segment_labels(seg)
    if not labels:
        raise InputError(path, "DICOM SEG has no segments")
    numbers = select_segments(labels, segments, path)
    if reference is None:
        return _own_volume(path, seg, numbers, labels)
    try:
        placed = check_seg_frames(path, seg, numbers, reference)
        array = _place(path, seg, placed, reference, labels)
    except OffGridError:
        if not resample:
            raise
        array = None
    if array is None:
        from crc_lightning.io.resample import resample_mask

        own = _own_volume(path, _segread(path, lazy=False), numbers, labels)
        vol = resample_mask(own, reference)
        if own.array.any() and not vol.array.any():
            raise InputError(path, "no annotated voxel falls inside the image after resampling")
        return vol
    vol = reference.with_array(array, source=str(path))
    vol.source_orientation = reference.source_orientation
    vol.resampled = ""
    return vol


def check_seg_on_grid(path: Path, reference: Volume, segments: SegmentSelector) -> None:
    """Header-only validation of a SEG against its image's grid (raises the reader's errors)."""
    seg = _segread(path, lazy=True)
    labels = segment_labels(seg)
    if not labels:
        raise InputError(path, "DICOM SEG has no segments")
    check_seg_frames(path, seg, select_segments(labels, segments, path), reference)


def write_dicom_seg(
    mask_volume: Volume,
    image_folder: str | Path,
    path: str | Path,
    segment_labels: list[str],
    series_uid: str | None = None,
) -> Path:
    """Write a BINARY DICOM SEG of an instance mask: segment ``i`` = voxels with value ``i``
    (``i = 1..len(segment_labels)``), referencing the CT series in ``image_folder``.

    The mask must be on the series' grid (shape, spacing, orientation and origin) up to its axis
    order (a mask read by this package is in the canonical order, the series in slice order). Empty
    frames are omitted (highdicom default), so a reader must place frames by position. Written to a
    temporary name and renamed into place.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from crc_lightning.io.dicom import series_grid

    path = Path(path)
    sources, grid = series_grid(image_folder)
    mask_volume = mask_volume.reoriented_like(grid)  # e.g. a canonical mask → DICOM slice order
    check_same_grid(grid, mask_volume)
    if not np.allclose(grid.origin, mask_volume.origin, atol=GRID_ATOL_MM):
        raise InputError(
            path,
            f"mask origin {mask_volume.origin} differs from the series origin {grid.origin}",
        )
    n = len(segment_labels)
    if n == 0:
        raise InputError(path, "segment_labels is empty; need one label per instance value")
    mask = np.asarray(mask_volume.array)
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        if not np.array_equal(mask, np.rint(mask)):
            raise InputError(path, "mask has non-integer values")
    mask = np.rint(mask).astype(np.int64)
    if mask.size and (mask.min() < 0 or mask.max() > n):
        raise InputError(
            path,
            f"mask values {mask.min()}..{mask.max()} outside 0..{n} ({n} segment label(s) given)",
        )
    dtype = np.uint8 if n < 256 else np.uint16
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=str(label),
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, label in enumerate(segment_labels, start=1)
    ]
    series_uid = str(series_uid) if series_uid else generate_uid()
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=mask.astype(dtype),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=2,
            sop_instance_uid=generate_uid(entropy_srcs=[series_uid, "seg"]),
            instance_number=1,
            manufacturer="crc-lightning",
            manufacturer_model_name="crc-lightning",
            software_versions="0.1.0",
            device_serial_number="0",
        )
    except Exception as exc:
        raise InputError(path, f"cannot build DICOM SEG ({type(exc).__name__}: {exc})") from exc
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path
