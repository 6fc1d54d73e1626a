"""The canonical voxel order against SimpleITK's DICOMOrient(…, "LPS"), for every one of the 48 axis
orders a file can have; reorientation is a view; grids are compared physically; NaN refused."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from crc_lightning.io import InputError, ReadOptions, Volume, read_image, read_mask, write_nifti
from crc_lightning.io.volume import orientation_code, same_grid

SIGNED_PERMUTATIONS = [
    (perm, signs)
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1.0, -1.0), repeat=3)
]


def _direction(perm, signs) -> np.ndarray:
    d = np.zeros((3, 3))
    for axis, (p, s) in enumerate(zip(perm, signs)):
        d[p, axis] = s  # column `axis` (x, y, z) points along patient axis p
    return d


def _sitk(vol: Volume) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array))
    img.SetSpacing(vol.spacing[::-1])
    img.SetOrigin(vol.origin)
    img.SetDirection(vol.direction.ravel().tolist())
    return img


@pytest.mark.parametrize(("perm", "signs"), SIGNED_PERMUTATIONS)
def test_canonical_equals_simpleitk_dicomorient_lps(perm, signs):
    rng = np.random.default_rng(0)
    vol = Volume(
        rng.integers(-1000, 1000, size=(4, 5, 6)).astype(np.float32),
        (2.5, 0.7, 0.9),
        (12.0, -30.5, 7.25),
        _direction(perm, signs),
    )
    ref = sitk.DICOMOrient(_sitk(vol), "LPS")
    ours = vol.canonical()
    np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(ours.spacing[::-1], ref.GetSpacing())
    np.testing.assert_allclose(ours.origin, ref.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(ours.direction, np.reshape(ref.GetDirection(), (3, 3)), atol=1e-12)
    assert ours.orientation == "LPS"
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        vol.direction.ravel().tolist()
    )
    assert ours.source_orientation == orientation_code(vol.direction) == code
    assert np.shares_memory(ours.array, vol.array)  # a view: nothing copied
    assert same_grid(ours, vol.reoriented_like(ours))


def test_slightly_oblique_takes_the_nearest_axis_order_like_simpleitk():
    a = np.deg2rad(12)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    d = rot @ _direction((1, 0, 2), (-1.0, 1.0, -1.0))
    vol = Volume(np.arange(60, dtype=np.float32).reshape(3, 4, 5), (1.0, 2.0, 3.0), (1, 2, 3), d)
    ref = sitk.DICOMOrient(_sitk(vol), "LPS")
    ours = vol.canonical()
    np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(ours.direction, np.reshape(ref.GetDirection(), (3, 3)), atol=1e-12)
    np.testing.assert_allclose(ours.origin, ref.GetOrigin(), atol=1e-9)


def test_every_reader_returns_canonical_arrays_for_any_nifti_axis_order(tmp_path):
    """One physical volume written by nibabel in 4 axis orders reads back as one array."""
    rng = np.random.default_rng(1)
    lps = Volume(rng.integers(-500, 500, (5, 6, 7)).astype(np.float32), (3.0, 0.8, 0.6), (1, 2, 3))
    base = nib.Nifti1Image(
        lps.array.transpose(2, 1, 0).astype(np.int16),
        np.array([[-0.6, 0, 0, -1.0], [0, -0.8, 0, -2.0], [0, 0, 3.0, 3.0], [0, 0, 0, 1]]),
    )
    assert nib.aff2axcodes(base.affine) == ("L", "P", "S")
    for codes in (("L", "P", "S"), ("R", "A", "S"), ("L", "A", "S"), ("S", "R", "P")):
        img = base.as_reoriented(
            nib.orientations.ornt_transform(
                nib.orientations.axcodes2ornt(("L", "P", "S")), nib.orientations.axcodes2ornt(codes)
            )
        )
        assert nib.aff2axcodes(img.affine) == codes
        path = tmp_path / f"{''.join(codes)}.nii.gz"
        nib.save(img, path)
        got = read_image(path)
        np.testing.assert_array_equal(got.array, lps.array)
        np.testing.assert_allclose(got.origin, lps.origin, atol=1e-5)
        np.testing.assert_allclose(got.spacing, lps.spacing, rtol=1e-6)
        np.testing.assert_allclose(got.direction, np.eye(3), atol=1e-6)
        assert got.source_orientation == "".join(codes)
        assert got.array.flags.c_contiguous  # the int16 → float32 copy comes out in order
        mask = read_mask(path, reference=lps)  # same grid, other axis order: accepted
        np.testing.assert_array_equal(mask.array, lps.array.astype(np.int32))


def test_mask_on_another_grid_refused_naming_both_or_resampled(tmp_path):
    image = Volume(np.zeros((4, 6, 6), np.float32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    labels = np.zeros((8, 12, 12), np.uint8)
    labels[2:6, 3:9, 4:10] = 3
    fine = write_nifti(Volume(labels, (1.0, 0.5, 0.5), (0.0, 0.0, 0.0)), tmp_path / "fine.nii.gz")
    with pytest.raises(InputError) as err:
        read_mask(fine, reference=image)
    msg = str(err.value)
    assert "fine.nii.gz" in msg and "8×12×12 voxels" in msg and "4×6×6 voxels" in msg
    assert "resample_mask=true" in msg
    got = read_mask(fine, reference=image, options=ReadOptions(resample_mask=True))
    # oracle by hand: image voxel i's centre is fine voxel 2i's centre → nearest = fine[::2]
    np.testing.assert_array_equal(got.array, labels[::2, ::2, ::2].astype(np.int32))
    assert got.resampled and same_grid(image, got)


def test_nan_in_ct_refused_with_count_or_filled(tmp_path):
    data = np.zeros((5, 4, 3), np.float32)
    data[1, 2, 0] = np.nan
    data[3, 0, 1] = np.inf
    data[4, 3, 2] = -np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"nan\.nii\.gz: 3 voxel\(s\) are NaN or infinite"):
        read_image(tmp_path / "nan.nii.gz")
    filled = read_image(tmp_path / "nan.nii.gz", ReadOptions(nonfinite_hu=-1024))
    assert np.isfinite(filled.array).all() and int((filled.array == -1024).sum()) == 3


def test_sheared_nifti_refused(tmp_path):
    affine = np.eye(4)
    affine[1, 2] = 0.3  # z axis leans along y: a tilted stack saved as is
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), affine), tmp_path / "tilt.nii.gz")
    with pytest.raises(InputError, match=r"tilt\.nii\.gz.*sheared"):
        read_image(tmp_path / "tilt.nii.gz")
