"""The in-memory CT volume every reader returns and every writer takes, and its one voxel order.

Axis convention (as nnU-Net keeps it): arrays are indexed ``[z, y, x]`` (slice, row, column),
``spacing`` is ``(sz, sy, sx)`` in millimetres, ``origin`` is the patient-space (LPS, mm) position of
voxel ``[0, 0, 0]`` and ``direction`` is the 3×3 matrix whose *columns* are the unit vectors of the
x, y and z array axes in patient space (LPS), i.e. the DICOM/ITK convention.

**Canonical orientation** (:data:`CANONICAL`): every reader (NIfTI in any axis order, DICOM series,
Enhanced CT, DICOM SEG, mask series) hands back its volume with the axes permuted and flipped so
that

* ``x`` (columns) runs towards the patient's **left** — the patient's right is on the image's left,
  the radiological view;
* ``y`` (rows) runs towards **posterior** — anterior at the top of an axial slice;
* ``z`` (slices) runs towards **superior** — slice 0 is the most inferior.

That is direction ≈ identity, orientation code ``"LPS"``, exactly what SimpleITK's
``DICOMOrient(image, "LPS")`` returns (tests check it on real CT). For an oblique acquisition the
nearest such axis order is taken (the permutation maximising the direction cosines); nothing is
ever resampled by this step. :meth:`Volume.canonical` only transposes and flips — numpy *views*, no
copy — and updates spacing, origin and direction to match, so the physical position of every value
is unchanged. The crops of one anatomy are therefore the same arrays whatever format or axis order
the file used. ``source_orientation`` keeps the file's own code (e.g. ``"RAS"`` for most
NIfTI written by nibabel, ``"LAS"`` for dcm2niix) for the records.

Grids are compared physically (:func:`same_grid`): shape, spacing, direction and origin, after
bringing one into the other's axis order (:meth:`Volume.reoriented_like`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crc_lightning.io.errors import InputError

__all__ = [
    "CANONICAL",
    "CANONICAL_DESCRIPTION",
    "GANTRY_TILT_MODES",
    "ReadOptions",
    "Volume",
    "check_finite",
    "check_same_grid",
    "describe_grid",
    "grid_of",
    "orientation_code",
    "same_grid",
]

SPACING_RTOL = 1e-3  # relative tolerance when comparing two grids
DIRECTION_ATOL = 1e-3
ORIGIN_TOL_VOXEL = 0.1  # two grids' origins may differ by ≤ 0.1 of the smallest voxel side
ORTHONORMAL_ATOL = 1e-3
CANONICAL = "LPS"
CANONICAL_DESCRIPTION = (
    "arrays [z, y, x]: x (columns) towards patient left, y (rows) towards posterior, z (slices) "
    "towards superior — the radiological view, as SimpleITK DICOMOrient(image, 'LPS')"
)
GANTRY_TILT_MODES = ("refuse", "resample")
_POSITIVE, _NEGATIVE = "LPS", "RAI"
_PERMUTATIONS = tuple(itertools.permutations(range(3)))


@dataclass(frozen=True)
class ReadOptions:
    """How readers treat inputs that are usable only after a change of their voxels (all off by
    default: such an input is refused with the reason). Set from ``conf/preprocess.yaml``
    (``preprocess.resample_mask``, ``preprocess.gantry_tilt``, ``preprocess.nonfinite_hu``) and
    recorded with the store's parameters.

    * ``resample_mask``: a mask on another grid than its image (not just another axis order) is
      resampled onto the image grid, nearest neighbour (SimpleITK), instead of refused;
    * ``gantry_tilt``: ``"refuse"`` a DICOM series whose slices are not stacked along their normal,
      or ``"resample"`` it onto the orthogonal grid of its first slice (SimpleITK, linear);
    * ``nonfinite_hu``: ``None`` refuses a CT holding NaN/±inf voxels; a number replaces them.
    """

    resample_mask: bool = False
    gantry_tilt: str = "refuse"
    nonfinite_hu: float | None = None

    def __post_init__(self) -> None:
        if self.gantry_tilt not in GANTRY_TILT_MODES:
            raise ValueError(
                f"preprocess.gantry_tilt must be one of {GANTRY_TILT_MODES}, got {self.gantry_tilt!r}"
            )
        if self.nonfinite_hu is not None and not np.isfinite(float(self.nonfinite_hu)):
            raise ValueError("preprocess.nonfinite_hu must be a finite number or null")


@dataclass
class Volume:
    """A 3D array on a physical grid: HU values for images, integer labels for masks."""

    array: np.ndarray  # [z, y, x]
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LPS mm of voxel [0,0,0]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: x, y, z axes (LPS)
    source: str = ""  # the file or folder it came from (never logged remotely)
    source_orientation: str = ""  # orientation code of the file's own axis order, e.g. "RAS"
    resampled: str = ""  # why its voxels were resampled on reading ("" = they were not)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(
                self.source or None, f"expected a 3D volume, got shape {self.array.shape}"
            )
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise InputError(self.source or None, f"spacing must be positive, got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Orientation code of the array axes (x, y, z), e.g. ``"LPS"`` (see the module doc)."""
        return orientation_code(self.direction)

    def with_array(self, array: np.ndarray, source: str | None = None) -> Volume:
        """The same grid holding ``array`` (same shape)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array {array.shape} does not fit the grid {self.shape}")
        return Volume(
            array,
            self.spacing,
            self.origin,
            self.direction,
            source=self.source if source is None else source,
            source_orientation=self.source_orientation,
            resampled=self.resampled,
        )

    def canonical(self) -> Volume:
        """This volume in the canonical voxel order (:data:`CANONICAL`): a view, no copy."""
        out = self._permuted(*_matching_axes(self.direction, np.eye(3)))
        out.source_orientation = self.source_orientation or self.orientation
        return out

    def reoriented_like(self, grid: Volume) -> Volume:
        """This volume with its axes permuted/flipped into the axis order of ``grid`` (a view).

        Only the axis order changes; whether the two grids then coincide is :func:`same_grid`'s
        question.
        """
        return self._permuted(*_matching_axes(self.direction, grid.direction))

    def _permuted(self, perm: tuple[int, ...], flips: tuple[bool, ...]) -> Volume:
        """New voxel axis p (x=0, y=1, z=2) = old voxel axis ``perm[p]``, reversed if ``flips[p]``."""
        if perm == (0, 1, 2) and not any(flips):
            return self.with_array(self.array)
        array = self.array.transpose(2 - perm[2], 2 - perm[1], 2 - perm[0])
        array = array[tuple(slice(None, None, -1) if flips[p] else slice(None) for p in (2, 1, 0))]
        d = self.direction
        spacing_xyz = self.spacing[::-1]
        shape_xyz = self.shape[::-1]
        direction = np.stack([d[:, perm[p]] * (-1.0 if flips[p] else 1.0) for p in range(3)], 1)
        origin = np.asarray(self.origin, dtype=float).copy()
        for p in range(3):
            if flips[p]:
                v = perm[p]
                origin += (shape_xyz[v] - 1) * spacing_xyz[v] * d[:, v]
        spacing = tuple(spacing_xyz[perm[p]] for p in (2, 1, 0))
        return Volume(
            array,
            spacing,  # type: ignore[arg-type]
            tuple(origin),  # type: ignore[arg-type]
            direction,
            source=self.source,
            source_orientation=self.source_orientation,
            resampled=self.resampled,
        )


def _matching_axes(
    direction: np.ndarray, target: np.ndarray
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """(perm, flips) bringing the axes of ``direction`` closest to those of ``target``.

    ``cos[p, v]`` = cosine between target axis p and source axis v; the permutation maximising
    Σ|cos[p, perm[p]]| wins (6 candidates), a tie (a 45° oblique) going to the candidate whose
    resulting direction matrix is lexicographically largest — a rule that depends only on the
    physical axes, not on the order they were stored in, so two files of one grid agree.
    """
    cos = np.asarray(target, float).T @ np.asarray(direction, float)
    best: tuple[float, tuple[float, ...], tuple[int, ...]] | None = None
    for perm in _PERMUTATIONS:
        score = round(float(sum(abs(cos[p, perm[p]]) for p in range(3))), 9)
        signs = [1.0 if cos[p, perm[p]] >= 0 else -1.0 for p in range(3)]
        result = np.stack([direction[:, perm[p]] * signs[p] for p in range(3)], 1)
        key = (score, tuple(np.round(result.ravel(), 9)), perm)
        if best is None or key[:2] > best[:2]:
            best = key
    assert best is not None
    perm = best[2]
    return perm, tuple(bool(cos[p, perm[p]] < 0) for p in range(3))


def orientation_code(direction: np.ndarray) -> str:
    """Three letters, one per array axis (x, y, z): the patient direction it runs *towards*
    (L/R, P/A, S/I), from its largest direction cosine — ``"LPS"`` for the identity, ``"RAS"`` for
    nibabel's canonical NIfTI, ``"LAS"`` for dcm2niix output (the DICOM / SimpleITK
    ``DICOMOrient`` convention)."""
    d = np.asarray(direction, float)
    letters = []
    for v in range(3):
        a = int(np.argmax(np.abs(d[:, v])))
        letters.append(_POSITIVE[a] if d[a, v] >= 0 else _NEGATIVE[a])
    return "".join(letters)


def is_orthonormal(direction: np.ndarray, atol: float = ORTHONORMAL_ATOL) -> bool:
    d = np.asarray(direction, float)
    return bool(np.allclose(d.T @ d, np.eye(3), atol=atol))


def grid_of(volume: Volume) -> Volume:
    """``volume``'s grid as a zero-memory uint8 volume (a broadcast array, nothing allocated)."""
    return volume.with_array(np.broadcast_to(np.zeros((), np.uint8), volume.shape))


def describe_grid(volume: Volume) -> str:
    """A one-line physical description of a grid, for error messages."""
    sz, sy, sx = volume.spacing
    nz, ny, nx = volume.shape
    o = ", ".join(f"{v:.2f}" for v in volume.origin)
    oblique = np.abs(volume.direction).max(axis=0).min() < 1 - DIRECTION_ATOL
    oblique_note = " (oblique)" if oblique else ""
    return (
        f"{nz}×{ny}×{nx} voxels (z×y×x) of {sz:.4g}×{sy:.4g}×{sx:.4g} mm, origin ({o}) mm, "
        f"axes {volume.orientation}{oblique_note}"
    )


def same_grid(image: Volume, other: Volume) -> bool:
    """True when ``other`` (in ``image``'s axis order) has ``image``'s shape, spacing, direction
    and origin (within 0.1 of the smallest voxel side)."""
    if image.shape != other.shape:
        return False
    if not np.allclose(image.spacing, other.spacing, rtol=SPACING_RTOL, atol=1e-4):
        return False
    if not np.allclose(image.direction, other.direction, atol=DIRECTION_ATOL):
        return False
    shift = np.asarray(other.origin) - np.asarray(image.origin)
    return bool(np.linalg.norm(shift) <= ORIGIN_TOL_VOXEL * min(image.spacing))


def check_same_grid(image: Volume, mask: Volume, hint: str = "") -> None:
    """Refuse an image/mask pair whose grids differ physically, naming both geometries."""
    if same_grid(image, mask):
        return
    raise InputError(
        Path(mask.source) if mask.source else None,
        f"mask grid {describe_grid(mask)} differs from the grid of the image "
        f"{image.source or ''}: {describe_grid(image)}{hint}",
    )


def check_finite(array: np.ndarray, source: str | Path, fill: float | None = None) -> np.ndarray:
    """``array`` unchanged when every value is finite (integer arrays always are); otherwise an
    :class:`InputError` naming ``source`` and the count of NaN/±inf voxels, or — with ``fill`` — a
    copy with them replaced by ``fill``. Checked slab by slab (no full-size temporary)."""
    if array.dtype.kind not in "fc":
        return array
    step = 16
    if all(np.isfinite(array[k : k + step]).all() for k in range(0, array.shape[0], step)):
        return array
    bad = sum(
        int(np.count_nonzero(~np.isfinite(array[k : k + step])))
        for k in range(0, array.shape[0], step)
    )
    if fill is None:
        raise InputError(
            source,
            f"{bad} voxel(s) are NaN or infinite (of {array.size}); a CT must hold finite HU "
            "(or set preprocess.nonfinite_hu=<HU> to replace them)",
        )
    return np.where(np.isfinite(array), array, np.asarray(fill, array.dtype))
