"""The in-memory CT volume every reader returns and every writer takes.

Axis convention (as nnU-Net keeps it): arrays are indexed ``[z, y, x]`` (slice, row, column),
``spacing`` is ``(sz, sy, sx)`` in millimetres, ``origin`` is the patient-space (LPS, mm) position of
voxel ``[0, 0, 0]`` and ``direction`` is the 3×3 matrix whose *columns* are the unit vectors of the
x, y and z array axes in patient space (LPS), i.e. the DICOM/ITK convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crc_lightning.io.errors import InputError

SPACING_RTOL = 1e-3  # relative tolerance when comparing two grids
DIRECTION_ATOL = 1e-3


@dataclass
class Volume:
    """A 3D array on a physical grid: HU values for images, integer labels for masks."""

    array: np.ndarray  # [z, y, x]
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LPS mm of voxel [0,0,0]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: x, y, z axes (LPS)
    source: str = ""  # the file or folder it came from (never logged remotely)

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


def check_same_grid(image: Volume, mask: Volume) -> None:
    """Refuse an image/mask pair that does not describe the same voxel grid."""
    where = f"{mask.source or 'mask'} vs image {image.source or 'image'}"
    if image.shape != mask.shape:
        raise InputError(
            Path(mask.source) if mask.source else None,
            f"mask shape {mask.shape} differs from image shape {image.shape} ({where})",
        )
    if not np.allclose(image.spacing, mask.spacing, rtol=SPACING_RTOL, atol=1e-4):
        raise InputError(
            Path(mask.source) if mask.source else None,
            f"mask spacing {mask.spacing} differs from image spacing {image.spacing} ({where})",
        )
    if not np.allclose(image.direction, mask.direction, atol=DIRECTION_ATOL):
        raise InputError(
            Path(mask.source) if mask.source else None,
            f"mask orientation differs from the image's ({where})",
        )
