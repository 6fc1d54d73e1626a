"""DICOM series I/O: HU vs pydicom's modality LUT, slice ordering, and every refused input."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from crc_lightning.io import (
    InputError,
    ReadOptions,
    Volume,
    read_image,
    read_image_grid,
    read_mask,
    same_grid,
    write_dicom_series,
    write_nifti,
)


def _oblique() -> np.ndarray:
    a, b = 0.4, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


@pytest.fixture
def ct() -> Volume:
    rng = np.random.default_rng(7)
    array = rng.integers(-1024, 2000, size=(6, 7, 9)).astype(np.float32)
    return Volume(array, (2.5, 0.7, 0.9), (-100.0, 35.5, -250.25), _oblique())


@pytest.fixture
def series(tmp_path, ct):
    return write_dicom_series(ct, tmp_path / "series", "P001", shuffle_names=True)


def _files(folder):
    return sorted(folder.iterdir())


def _by_position(folder):
    """(path, dataset) pairs ordered by ImagePositionPatient along the normal — the oracle order."""
    items = [(p, pydicom.dcmread(p)) for p in _files(folder)]
    iop = np.array(items[0][1].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(items, key=lambda it: np.dot(np.array(it[1].ImagePositionPatient, float), normal))


def test_ct_small_hu_matches_modality_lut(tmp_path):
    folder = tmp_path / "ct_small"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "IM0001")
    ds = pydicom.dcmread(folder / "IM0001")
    expected = apply_modality_lut(ds.pixel_array, ds)
    assert float(ds.RescaleIntercept) != 0 or float(ds.RescaleSlope) != 1  # the LUT matters

    vol = read_image(folder)
    assert vol.array.dtype == np.float32
    assert vol.shape == (1, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(vol.array[0], expected.astype(np.float32))
    sy, sx = (float(v) for v in ds.PixelSpacing)
    assert vol.spacing[1:] == (sy, sx)
    assert vol.spacing[0] == float(ds.SliceThickness)
    np.testing.assert_allclose(vol.origin, [float(v) for v in ds.ImagePositionPatient])


def test_shuffled_series_matches_nifti_of_same_volume(tmp_path, ct, series):
    # the test only means something if neither names nor InstanceNumbers follow position
    ordered = _by_position(series)
    names = [p.name for p, _ in ordered]
    numbers = [int(ds.InstanceNumber) for _, ds in ordered]
    assert names != sorted(names) and numbers != sorted(numbers)

    from_dicom = read_image(series)
    from_nifti = read_image(write_nifti(ct, tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(from_dicom.array, ct.array)  # integer HU: exact
    np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
    np.testing.assert_allclose(from_dicom.spacing, from_nifti.spacing, rtol=1e-6)
    np.testing.assert_allclose(from_dicom.spacing, ct.spacing, rtol=1e-9)
    np.testing.assert_allclose(from_dicom.origin, ct.origin, atol=1e-6)
    np.testing.assert_allclose(from_dicom.direction, ct.direction, atol=1e-9)
    np.testing.assert_allclose(from_dicom.direction, from_nifti.direction, atol=1e-5)


def test_series_agrees_with_simpleitk(series, ct):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ref = reader.Execute()
    ours = read_image(series)
    np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    np.testing.assert_allclose(ours.spacing[::-1], ref.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(ours.origin, ref.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(ours.direction, np.reshape(ref.GetDirection(), (3, 3)), atol=1e-6)


def test_written_files_are_valid_ct(series, ct):
    (_, first), *_ = _by_position(series)
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.PatientID == "P001" and first.Modality == "CT"
    assert int(first.PixelRepresentation) == 0  # HU ≥ -1024 with intercept -1024 → unsigned
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, -1024.0)
    assert [float(v) for v in first.PixelSpacing] == [0.7, 0.9]  # [row (sy), column (sx)]
    sops = {pydicom.dcmread(p).SOPInstanceUID for p in _files(series)}
    assert len(sops) == ct.shape[0]


def test_signed_storage_and_quantised_rescale(tmp_path):
    values = np.linspace(-3000.0, 500.0, 2 * 3 * 4).reshape(2, 3, 4)
    vol = Volume(values, (1.0, 1.0, 1.0))
    folder = write_dicom_series(vol, tmp_path / "s", "P", rescale=(0.5, -1024.0))
    ds = pydicom.dcmread(_files(folder)[0])
    assert int(ds.PixelRepresentation) == 1
    back = read_image(folder)
    assert np.max(np.abs(back.array - values)) <= 0.25 + 1e-6  # slope / 2


def test_non_dicom_files_are_skipped(tmp_path, ct, series):
    (series / "README.txt").write_text("not dicom")
    first = pydicom.dcmread(_files(series)[0])
    del first.PixelData
    first.SOPInstanceUID = generate_uid()
    first.save_as(series / "DICOMDIR")  # a DICOM object without pixels, like a DICOMDIR
    vol = read_image(series)
    np.testing.assert_array_equal(vol.array, ct.array)


def test_mask_series_values_kept(tmp_path, ct):
    """A 0/255 mask series (IRCADb) keeps its values: the lesion rule decides what they mean."""
    labels = np.zeros(ct.shape, np.int32)
    labels[2:4, 1:4, 2:6] = 255
    mask = Volume(labels, ct.spacing, ct.origin, ct.direction)
    folder = write_dicom_series(mask, tmp_path / "livertumor01", "P", rescale=(1.0, 0.0))
    read = read_mask(folder, reference=ct)
    assert read.array.dtype == np.int32
    np.testing.assert_array_equal(read.array, labels)

    inst = np.zeros(ct.shape, np.int32)
    inst[1, 1:3, 1:3], inst[4, 4:6, 5:8] = 1, 3
    folder = write_dicom_series(
        Volume(inst, ct.spacing, ct.origin, ct.direction), tmp_path / "inst", "P"
    )  # default rescale: labels via the LUT
    np.testing.assert_array_equal(read_mask(folder).array, inst)


def test_mask_grid_mismatch_refused(tmp_path, ct):
    other = Volume(np.zeros(ct.shape, np.int32), (2.0, 0.7, 0.9), ct.origin, ct.direction)
    folder = write_dicom_series(other, tmp_path / "mask_spacing", "P", rescale=(1.0, 0.0))
    with pytest.raises(InputError, match=r"mask_spacing.*of 2×0\.7×0\.9 mm.*differs.*2\.5×0\.7"):
        read_mask(folder, reference=ct)
    small = Volume(np.zeros((6, 7, 8), np.int32), ct.spacing, ct.origin, ct.direction)
    folder = write_dicom_series(small, tmp_path / "mask_shape", "P", rescale=(1.0, 0.0))
    with pytest.raises(InputError, match=r"mask_shape.*6×7×8 voxels.*differs.*6×7×9 voxels"):
        read_mask(folder, reference=ct)


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_mixed_series_refused(series):
    _edit(_files(series)[2], SeriesInstanceUID=generate_uid())
    with pytest.raises(InputError, match=r"series.*mixed series"):
        read_image(series)


def test_duplicate_position_refused(series):
    src = _files(series)[0]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(series / "copy.dcm")
    with pytest.raises(InputError, match=r"series.*duplicate slice position"):
        read_image(series)


def test_missing_slice_refused(series):
    ordered = _by_position(series)
    ordered[3][0].unlink()
    with pytest.raises(InputError, match=r"series.*missing slice.*2 × spacing"):
        read_image(series)


def test_uneven_spacing_refused(series):
    path, ds = _by_position(series)[3]
    normal = np.cross(
        np.array(ds.ImageOrientationPatient[:3], float),
        np.array(ds.ImageOrientationPatient[3:], float),
    )
    moved = np.array(ds.ImagePositionPatient, float) + 0.5 * normal  # 20 % of the 2.5 mm step
    _edit(path, ImagePositionPatient=[f"{v:.6f}" for v in moved])
    with pytest.raises(InputError, match=r"series.*uneven slice spacing"):
        read_image(series)


def test_small_position_jitter_accepted(series, ct):
    path, ds = _by_position(series)[3]
    normal = np.cross(
        np.array(ds.ImageOrientationPatient[:3], float),
        np.array(ds.ImageOrientationPatient[3:], float),
    )
    moved = np.array(ds.ImagePositionPatient, float) + 0.005 * normal  # below 0.01 mm / 1 %
    _edit(path, ImagePositionPatient=[f"{v:.6f}" for v in moved])
    np.testing.assert_allclose(read_image(series).spacing, ct.spacing, rtol=1e-3)


def test_inconsistent_shape_refused(series):
    path = _files(series)[1]
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 3, 4
    ds.PixelData = np.zeros((3, 4), "<u2").tobytes()
    ds.save_as(path)
    with pytest.raises(InputError, match=r"series.*inconsistent slice shape"):
        read_image(series)


def test_inconsistent_orientation_refused(series):
    _edit(_files(series)[4], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    with pytest.raises(InputError, match=r"series.*inconsistent orientation"):
        read_image(series)


def test_folder_without_dicom_refused(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes.*no DICOM image files"):
        read_image(folder)
    with pytest.raises(InputError, match=r"notes.*no DICOM image files"):
        read_mask(folder)


def test_single_dicom_file_refused_as_image(series):
    with pytest.raises(InputError, match=r"\.dcm.*series folder"):
        read_image(_files(series)[0])


def test_writer_refuses_and_leaves_nothing(tmp_path, ct, series):
    with pytest.raises(InputError, match=r"series.*not empty"):
        write_dicom_series(ct, series, "P")
    huge = Volume(np.full((2, 2, 2), 1e6), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match=r"huge.*16-bit"):
        write_dicom_series(huge, tmp_path / "huge", "P")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # no partial or temp folder


def test_same_series_uid_gives_identical_files(tmp_path, ct):
    a = write_dicom_series(ct, tmp_path / "a", "P", series_uid="1.2.826.0.1.3680043.8.498.1")
    b = write_dicom_series(ct, tmp_path / "b", "P", series_uid="1.2.826.0.1.3680043.8.498.1")
    assert [p.read_bytes() for p in _files(a)] == [p.read_bytes() for p in _files(b)]


def test_files_without_preamble_are_read(tmp_path, ct, series):
    """Old exports lack the 128-byte preamble and 'DICM' marker; they are still slices."""
    for path in _files(series):
        path.write_bytes(path.read_bytes()[132:])  # strip preamble + 'DICM'
        assert not pydicom.misc.is_dicom(path)
    np.testing.assert_array_equal(read_image(series).array, ct.array)


def _tilted(tmp_path, name: str = "tilted", low: int = -200, drift_px: float = 1.0):
    """A series whose slice k is shifted by k·drift_px rows along the column cosine (gantry tilt),
    and the untilted source volume."""
    rng = np.random.default_rng(11)
    src = rng.integers(low, 300, size=(5, 12, 10)).astype(np.float32)
    vol = Volume(src, (2.0, 0.8, 0.7), (10.0, -20.0, 30.0))
    folder = write_dicom_series(vol, tmp_path / name, "P", rescale=(1.0, min(low, 0)))
    for path, ds in _by_position(folder):
        k = round((float(ds.ImagePositionPatient[2]) - 30.0) / 2.0)
        ipp = np.array(ds.ImagePositionPatient, float) + k * drift_px * 0.8 * np.array([0, 1, 0])
        _edit(path, ImagePositionPatient=[f"{v:.6f}" for v in ipp])
    return folder, src


def test_gantry_tilt_refused_by_default_and_resampled_on_request(tmp_path):
    folder, src = _tilted(tmp_path)
    with pytest.raises(InputError, match=r"tilted.*gantry tilt.*preprocess\.gantry_tilt=resample"):
        read_image(folder)
    vol = read_image(folder, ReadOptions(gantry_tilt="resample"))
    assert vol.resampled and vol.shape == src.shape
    np.testing.assert_allclose(vol.origin, (10.0, -20.0, 30.0))
    # oracle by hand: slice k really lies k rows further along y, so on the orthogonal grid
    # out[k, r] = src[k, r - k]; rows brought in from outside the scanned field are air
    for k in range(src.shape[0]):
        np.testing.assert_allclose(vol.array[k, k:], src[k, : src.shape[1] - k], atol=1e-3)
        assert (vol.array[k, :k] == -1024).all()
    labels, lab = _tilted(tmp_path, "labels", low=0)  # a mask series drawn on the tilted scan
    mask = read_mask(labels, reference=vol, options=ReadOptions(gantry_tilt="resample"))
    assert mask.array.dtype == np.int32 and same_grid(vol, mask)
    for k in range(lab.shape[0]):  # nearest neighbour: labels moved, never blended
        np.testing.assert_array_equal(mask.array[k, k:], lab[k, : lab.shape[1] - k])
        assert (mask.array[k, :k] == 0).all()


def test_uneven_tilt_refused_even_with_resampling(tmp_path):
    folder, _ = _tilted(tmp_path)
    path, ds = _by_position(folder)[2]
    _edit(
        path,
        ImagePositionPatient=[f"{v + d:.6f}" for v, d in zip(ds.ImagePositionPatient, (0.5, 0, 0))],
    )
    with pytest.raises(InputError, match=r"constant vector"):
        read_image(folder, ReadOptions(gantry_tilt="resample"))


def test_grid_from_headers_without_decoding_pixels(series, ct, monkeypatch):
    import crc_lightning.io.dicom as dicom_mod

    def boom(*args):
        raise AssertionError("pixels decoded for a header check")

    monkeypatch.setattr(dicom_mod, "_pixels", boom)
    grid = read_image_grid(series)
    assert grid.shape == ct.shape and same_grid(grid, ct.canonical())
    assert grid.array.strides == (0, 0, 0)  # zero memory
