"""The two places where reading changes voxels, both opt-in and both SimpleITK (ITK's resampler is
the reference implementation radiology tools share; no hand-rolled interpolation):

* :func:`resample_mask` — a mask on another grid than its image, nearest neighbour onto the image
  grid (``preprocess.resample_mask=true``);
* :func:`deshear` — a gantry-tilted DICOM series onto the orthogonal grid of its first slice,
  linear (``preprocess.gantry_tilt=resample``).

SimpleITK is imported inside the functions so ``import crc_lightning.io`` stays cheap.
"""

from __future__ import annotations

import numpy as np

from crc_lightning.io.volume import Volume

__all__ = ["AIR_HU", "deshear", "resample_mask", "to_sitk"]

AIR_HU = -1024.0  # value of voxels a tilt correction brings in from outside the scanned field


def to_sitk(volume: Volume, array: np.ndarray | None = None):  # -> sitk.Image
    """A SimpleITK image of ``volume`` (its array, or ``array`` on its grid)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.array if array is None else array))
    img.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    img.SetOrigin(tuple(float(o) for o in volume.origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(volume.direction).ravel()))
    return img


def _resampler(grid: Volume, interpolator, default: float, pixel_type):  # -> sitk filter
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetSize([int(n) for n in grid.shape[::-1]])
    f.SetOutputSpacing(tuple(float(s) for s in grid.spacing[::-1]))
    f.SetOutputOrigin(tuple(float(o) for o in grid.origin))
    f.SetOutputDirection(tuple(float(v) for v in np.asarray(grid.direction).ravel()))
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(float(default))
    f.SetOutputPixelType(pixel_type)
    return f


def resample_mask(mask: Volume, grid: Volume) -> Volume:
    """``mask`` resampled onto ``grid`` by nearest neighbour (labels are never blended), int32;
    voxels of ``grid`` outside the mask's field are background."""
    import SimpleITK as sitk

    f = _resampler(grid, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    out = sitk.GetArrayFromImage(f.Execute(to_sitk(mask, np.asarray(mask.array, np.int32))))
    result = grid.with_array(out.astype(np.int32, copy=False), source=mask.source)
    result.source_orientation = mask.source_orientation
    result.resampled = "mask resampled onto the image grid (nearest neighbour)"
    return result


def deshear(stack: Volume, step: np.ndarray, nearest: bool = False) -> Volume:
    """Resample a sheared slice stack onto its orthogonal grid.

    ``stack`` holds the slices on the grid they *claim* (origin = first slice's position, direction
    = (row, column, normal), z spacing = the step along the normal); ``step`` is the true LPS vector
    from one slice's position to the next (it has an in-plane part: the tilt). Slice k really lies
    at ``origin + k·step``; the output grid is ``stack``'s claimed grid, each output point sampled
    where it really is in the stack (an affine transform, so only an in-plane shift per slice:
    slices are not mixed). Outside the scanned field: :data:`AIR_HU` (0 for masks, ``nearest``).
    """
    import SimpleITK as sitk

    d = np.asarray(stack.direction, float)
    sz, sy, sx = stack.spacing
    claimed = d @ np.diag([sx, sy, sz])
    true = claimed.copy()
    true[:, 2] = np.asarray(step, float)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple((claimed @ np.linalg.inv(true)).ravel()))
    transform.SetCenter(tuple(float(o) for o in stack.origin))
    if nearest:
        f = _resampler(stack, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        src = to_sitk(stack, np.asarray(stack.array, np.int32))
    else:
        f = _resampler(stack, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
        src = to_sitk(stack, np.asarray(stack.array, np.float32))
    f.SetTransform(transform)
    out = sitk.GetArrayFromImage(f.Execute(src))
    result = stack.with_array(out)
    result.resampled = "gantry tilt resampled onto the orthogonal grid"
    return result
