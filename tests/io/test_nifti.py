"""NIfTI I/O: exact round trips and the RAS→LPS conversion, checked against nibabel and SimpleITK."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from crc_lightning.io import InputError, Volume, read_image, read_mask, write_nifti


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_volume() -> Volume:
    rng = np.random.default_rng(1)
    array = rng.normal(0, 300, size=(4, 5, 6)).astype(np.float32)
    return Volume(array, (3.0, 0.75, 0.6), (12.5, -40.0, 100.25), _rotation(0.2, -0.3, 0.5))


def _lps_of_voxel(vol: Volume, k: int, j: int, i: int) -> np.ndarray:
    """Hand-computed LPS position of array[k, j, i] from the Volume convention."""
    sz, sy, sx = vol.spacing
    return np.asarray(vol.origin) + vol.direction @ np.array([i * sx, j * sy, k * sz])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_round_trip_oblique_anisotropic(tmp_path, oblique_volume, suffix):
    path = write_nifti(oblique_volume, tmp_path / f"ct{suffix}")
    back = read_image(path)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, oblique_volume.array)
    np.testing.assert_allclose(back.spacing, oblique_volume.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.origin, oblique_volume.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, oblique_volume.direction, atol=1e-6)
    assert back.source == str(path)


def test_written_affine_matches_nibabel(tmp_path, oblique_volume):
    """nibabel's own affine maps voxel (i,j,k) to RAS = LPS with x, y negated."""
    path = write_nifti(oblique_volume, tmp_path / "ct.nii.gz")
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    assert data.shape == (6, 5, 4)  # (x, y, z)
    for k, j, i in [(0, 0, 0), (3, 4, 5), (1, 2, 3), (2, 0, 5)]:
        ras = img.affine @ np.array([i, j, k, 1.0])
        lps = _lps_of_voxel(oblique_volume, k, j, i)
        np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-4)
        assert data[i, j, k] == oblique_volume.array[k, j, i]
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_read_agrees_with_simpleitk(tmp_path, oblique_volume):
    """ITK reads NIfTI into LPS too: origin, spacing (x,y,z), direction and array must agree."""
    path = write_nifti(oblique_volume, tmp_path / "ct.nii.gz")
    ours = read_image(path)
    ref = sitk.ReadImage(str(path))
    np.testing.assert_allclose(ours.spacing[::-1], ref.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(ours.origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(
        ours.direction, np.array(ref.GetDirection()).reshape(3, 3), atol=1e-5
    )
    np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(ref))


def test_read_hand_built_ras_file(tmp_path):
    """A plain RAS-oriented file: LPS direction is diag(-1,-1,1), origin x/y negated."""
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(4, 3, 2)  # (x, y, z)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ras.nii.gz")
    vol = read_image(tmp_path / "ras.nii.gz")
    assert vol.shape == (2, 3, 4) and vol.source_orientation == "RAS"
    # canonical order: x and y reversed (RAS → LPS), the corner voxel [0, 0, 0] moves with them
    expected = data.transpose(2, 1, 0)[:, ::-1, ::-1].astype(np.float32)
    np.testing.assert_array_equal(vol.array, expected)
    np.testing.assert_allclose(vol.spacing, (2.5, 0.9, 0.8))
    np.testing.assert_allclose(vol.origin, (-10.0 - 3 * 0.8, -20.0 - 2 * 0.9, 30.0))
    np.testing.assert_allclose(vol.direction, np.eye(3))


def test_scaled_nifti_values_applied(tmp_path):
    """scl_slope/scl_inter are applied on read (HU stored with a scale)."""
    data = np.array([[[0, 10], [20, 30]]], dtype=np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii")
    vol = read_image(tmp_path / "scaled.nii")
    expected = (data.transpose(2, 1, 0) * 2.0 - 1024.0)[:, ::-1, ::-1]  # RAS → canonical LPS
    np.testing.assert_array_equal(vol.array, expected)


def test_storage_types(tmp_path, oblique_volume):
    hu = Volume(np.rint(oblique_volume.array), oblique_volume.spacing)
    write_nifti(hu, tmp_path / "hu.nii.gz")
    assert nib.load(tmp_path / "hu.nii.gz").get_data_dtype() == np.int16
    write_nifti(oblique_volume, tmp_path / "f.nii.gz")
    assert nib.load(tmp_path / "f.nii.gz").get_data_dtype() == np.float32
    labels = np.zeros((3, 4, 5), np.int32)
    labels[1, 1:3, 2:4] = 7
    write_nifti(Volume(labels, (1.0, 1.0, 1.0)), tmp_path / "m.nii.gz")
    assert nib.load(tmp_path / "m.nii.gz").get_data_dtype() == np.uint8
    mask = read_mask(tmp_path / "m.nii.gz")
    assert mask.array.dtype == np.int32
    np.testing.assert_array_equal(mask.array, labels)  # NIfTI labels are kept as they are
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_mask_grid_checked_against_reference(tmp_path, oblique_volume):
    labels = np.zeros(oblique_volume.shape, np.uint8)
    good = Volume(labels, oblique_volume.spacing, oblique_volume.origin, oblique_volume.direction)
    write_nifti(good, tmp_path / "good.nii.gz")
    read_mask(tmp_path / "good.nii.gz", reference=oblique_volume)  # same grid: accepted

    shape = Volume(np.zeros((4, 5, 7), np.uint8), oblique_volume.spacing)
    write_nifti(shape, tmp_path / "shape.nii.gz")
    with pytest.raises(InputError, match=r"shape\.nii\.gz.*4×5×7 voxels.*differs"):
        read_mask(tmp_path / "shape.nii.gz", reference=oblique_volume)

    spacing = Volume(labels, (3.0, 0.75, 0.7), oblique_volume.origin, oblique_volume.direction)
    write_nifti(spacing, tmp_path / "spacing.nii.gz")
    with pytest.raises(InputError, match=r"spacing\.nii\.gz.*×0\.7 mm.*differs"):
        read_mask(tmp_path / "spacing.nii.gz", reference=oblique_volume)

    shifted = np.asarray(oblique_volume.origin) + 5.0
    moved = Volume(labels, oblique_volume.spacing, shifted, oblique_volume.direction)
    write_nifti(moved, tmp_path / "moved.nii.gz")
    with pytest.raises(InputError, match=r"moved\.nii\.gz.*origin.*differs"):
        read_mask(tmp_path / "moved.nii.gz", reference=oblique_volume)


def test_fractional_mask_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.full((2, 2, 2), 0.5, np.float32), np.eye(4)), tmp_path / "p.nii")
    with pytest.raises(InputError, match=r"p\.nii.*non-integer"):
        read_mask(tmp_path / "p.nii")


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "scan.mha").write_bytes(b"not a format we read")
    with pytest.raises(InputError, match=r"scan\.mha.*unsupported"):
        read_image(tmp_path / "scan.mha")
    with pytest.raises(InputError, match=r"scan\.mha.*unsupported"):
        read_mask(tmp_path / "scan.mha")
    with pytest.raises(InputError, match=r"absent\.nii\.gz.*not found"):
        read_image(tmp_path / "absent.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputError, match=r"broken\.nii\.gz.*cannot read"):
        read_image(tmp_path / "broken.nii.gz")
    with pytest.raises(InputError, match=r"out\.img.*\.nii"):
        write_nifti(Volume(np.zeros((1, 1, 1)), (1, 1, 1)), tmp_path / "out.img")
    with pytest.raises(InputError, match=r"4d\.nii.*3D"):
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.int16), np.eye(4)), tmp_path / "4d.nii")
        read_image(tmp_path / "4d.nii")
