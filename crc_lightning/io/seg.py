"""DICOM Segmentation objects (highdicom): lesion masks ↔ :class:`Volume` label maps.

Reading: the segments become instance values ``1..n`` in increasing segment-number order
(highdicom ``combine_segments=True, relabel=True``); overlapping segments are refused. A SEG usually
stores only the frames that contain something, so its own grid spans just those slices: frames are
placed by their ImagePositionPatient, and with ``reference`` given they are placed on the
reference image's grid (highdicom ``match_geometry``: permute/flip/crop/pad, never resample); a
frame off that grid is refused. Without ``reference`` the result covers only the SEG's own extent, with z running along the
slice normal (as :func:`~crc_lightning.io.dicom.read_dicom_series` orders slices).

highdicom is imported inside the functions so ``import crc_lightning.io`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crc_lightning.io.errors import InputError
from crc_lightning.io.files import atomic_path
from crc_lightning.io.volume import Volume, check_same_grid

GRID_ATOL_MM = 1e-2  # origin mismatch tolerated between a mask and its image series


def volume_affine(volume: Volume) -> np.ndarray:
    """4×4 LPS affine from (slice, row, column) indices, highdicom's convention."""
    sz, sy, sx = volume.spacing
    d = np.asarray(volume.direction, dtype=float)
    affine = np.eye(4)
    affine[:3, 0] = d[:, 2] * sz
    affine[:3, 1] = d[:, 1] * sy
    affine[:3, 2] = d[:, 0] * sx
    affine[:3, 3] = volume.origin
    return affine


def _from_affine(array: np.ndarray, affine: np.ndarray, source: str) -> Volume:
    """A :class:`Volume` from an array indexed (slice, row, column) and its LPS affine."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    direction = np.stack([m[:, 2] / norms[2], m[:, 1] / norms[1], m[:, 0] / norms[0]], axis=1)
    spacing = (float(norms[0]), float(norms[1]), float(norms[2]))
    return Volume(array, spacing, tuple(np.asarray(affine)[:3, 3]), direction, source=source)


def read_dicom_seg(path: str | Path, reference: Volume | None = None) -> Volume:
    """Read a DICOM SEG file as an int32 label map (segments → 1..n in segment-number order)."""
    import highdicom as hd

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "DICOM SEG file not found")
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # not DICOM, or not a Segmentation
        raise InputError(path, f"not a readable DICOM SEG ({type(exc).__name__}: {exc})") from exc
    numbers = sorted(int(n) for n in seg.segment_numbers)
    if not numbers:
        raise InputError(path, "DICOM SEG has no segments")
    if str(seg.segmentation_type.value) == "FRACTIONAL":
        raise InputError(path, "fractional DICOM SEG is not a label mask; expected BINARY")
    try:
        hvol = seg.get_volume(
            segment_numbers=numbers,
            combine_segments=True,
            relabel=True,
            allow_missing_positions=True,
        )
    except Exception as exc:  # overlapping segments, irregular or tilted frame positions, …
        raise InputError(
            path, f"cannot build a label volume from the SEG ({type(exc).__name__}: {exc})"
        ) from exc
    if reference is not None:
        grid = hd.VolumeGeometry(volume_affine(reference), reference.shape, "PATIENT")
        try:
            hvol = hvol.match_geometry(grid)
        except Exception as exc:
            raise InputError(
                path,
                "SEG frames do not lie on the reference image grid "
                f"{reference.source or ''} ({type(exc).__name__}: {exc})",
            ) from exc
    labels = np.asarray(hvol.array).astype(np.int32)
    affine = np.asarray(hvol.affine, dtype=float)
    normal = np.cross(affine[:3, 2], affine[:3, 1])  # row cosine × column cosine (scaled)
    if reference is None and labels.shape[0] > 1 and float(affine[:3, 0] @ normal) < 0:
        # highdicom may stack against the normal; keep read_dicom_series' order (along it)
        labels = labels[::-1].copy()
        affine[:3, 3] = affine[:3, 3] + (labels.shape[0] - 1) * affine[:3, 0]
        affine[:3, 0] = -affine[:3, 0]
    vol = _from_affine(labels, affine, str(path))
    if reference is not None:
        check_same_grid(reference, vol)
    return vol


def write_dicom_seg(
    mask_volume: Volume,
    image_folder: str | Path,
    path: str | Path,
    segment_labels: list[str],
    series_uid: str | None = None,
) -> Path:
    """Write a BINARY DICOM SEG of an instance mask: segment ``i`` = voxels with value ``i``
    (``i = 1..len(segment_labels)``), referencing the CT series in ``image_folder``.

    The mask must be on the series' grid (shape, spacing, orientation and origin). Empty frames are
    omitted (highdicom default), so a reader must place frames by position. Written to a temporary
    name and renamed into place.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from crc_lightning.io.dicom import series_grid

    path = Path(path)
    sources, grid = series_grid(image_folder)
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
