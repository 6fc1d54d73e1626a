"""DICOM SEG I/O (highdicom): instance labels survive a round trip and land on the image grid."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from crc_lightning.io import (
    InputError,
    Volume,
    read_image,
    read_mask,
    write_dicom_seg,
    write_dicom_series,
)


@pytest.fixture
def image(tmp_path) -> Volume:
    rng = np.random.default_rng(3)
    array = rng.integers(-200, 300, size=(9, 8, 10)).astype(np.float32)
    a = 0.3
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    vol = Volume(array, (2.0, 0.8, 0.7), (-50.0, 10.0, 120.0), direction)
    write_dicom_series(vol, tmp_path / "ct", "P7", shuffle_names=True)
    return read_image(tmp_path / "ct")


@pytest.fixture
def labels(image) -> np.ndarray:
    """Three lesions on slices 2..6 only, so empty frames are omitted from the SEG."""
    m = np.zeros(image.shape, np.int32)
    m[2:4, 2:5, 3:6] = 1
    m[5, 5:7, 6:9] = 2
    m[6, 1, 1] = 3
    return m


def _on_grid(image: Volume, array: np.ndarray) -> Volume:
    return Volume(array, image.spacing, image.origin, image.direction)


def test_round_trip_on_image_grid(tmp_path, image, labels):
    path = write_dicom_seg(
        _on_grid(image, labels),
        tmp_path / "ct",
        tmp_path / "seg.dcm",
        ["lesion 1", "lesion 2", "lesion 3"],
    )
    mask = read_mask(path, reference=image)
    assert mask.array.dtype == np.int32
    np.testing.assert_array_equal(mask.array, labels)
    np.testing.assert_allclose(mask.spacing, image.spacing, rtol=1e-6)
    np.testing.assert_allclose(mask.origin, image.origin, atol=1e-6)
    np.testing.assert_allclose(mask.direction, image.direction, atol=1e-6)


def test_written_seg_frames_match_labels(tmp_path, image, labels):
    """Independent oracle: rebuild the label map from the raw SEG frames with pydicom."""
    path = write_dicom_seg(
        _on_grid(image, labels), tmp_path / "ct", tmp_path / "seg.dcm", ["a", "b", "c"]
    )
    ds = pydicom.dcmread(path)
    assert ds.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["a", "b", "c"]
    refs = {r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence}
    ct_file = next((tmp_path / "ct").iterdir())
    assert refs == {pydicom.dcmread(ct_file).SeriesInstanceUID}
    frames = ds.pixel_array.reshape(-1, *image.shape[1:])
    normal = image.direction[:, 2]
    rebuilt = np.zeros_like(labels)
    for frame, fg in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float)
        k = round(float((ipp - np.asarray(image.origin)) @ normal) / image.spacing[0])
        rebuilt[k][frame > 0] = number
    assert len(frames) < labels.shape[0] * 3  # empty frames were omitted
    np.testing.assert_array_equal(rebuilt, labels)


def test_without_reference_covers_seg_extent(tmp_path, image, labels):
    path = write_dicom_seg(
        _on_grid(image, labels), tmp_path / "ct", tmp_path / "seg.dcm", ["a", "b", "c"]
    )
    mask = read_mask(path)
    np.testing.assert_array_equal(mask.array, labels[2:7])
    expected_origin = np.asarray(image.origin) + 2 * image.spacing[0] * image.direction[:, 2]
    np.testing.assert_allclose(mask.origin, expected_origin, atol=1e-6)


def test_frames_placed_by_position_on_larger_reference(tmp_path, image, labels):
    """A reference grid starting 3 slices earlier: labels shift by 3 along z."""
    path = write_dicom_seg(
        _on_grid(image, labels), tmp_path / "ct", tmp_path / "seg.dcm", ["a", "b", "c"]
    )
    origin = np.asarray(image.origin) - 3 * image.spacing[0] * image.direction[:, 2]
    bigger = Volume(
        np.zeros((14, *image.shape[1:]), np.float32), image.spacing, origin, image.direction
    )
    mask = read_mask(path, reference=bigger)
    expected = np.zeros(bigger.shape, np.int32)
    expected[3:12] = labels
    np.testing.assert_array_equal(mask.array, expected)


def test_seg_off_reference_grid_refused(tmp_path, image, labels):
    path = write_dicom_seg(
        _on_grid(image, labels), tmp_path / "ct", tmp_path / "seg.dcm", ["a", "b", "c"]
    )
    origin = np.asarray(image.origin) + 0.5 * image.spacing[0] * image.direction[:, 2]
    half = Volume(image.array, image.spacing, origin, image.direction)
    with pytest.raises(InputError, match=r"seg\.dcm: 4 frame\(s\).*not on the grid.*126\.00"):
        read_mask(path, reference=half)
    finer = Volume(image.array, (2.0, 0.4, 0.7), image.origin, image.direction)
    with pytest.raises(InputError, match=r"seg\.dcm: its pixel grid.*not the grid of the image"):
        read_mask(path, reference=finer)


def test_writer_refuses_bad_masks(tmp_path, image, labels):
    with pytest.raises(InputError, match=r"seg\.dcm.*outside 0\.\.2"):
        write_dicom_seg(_on_grid(image, labels), tmp_path / "ct", tmp_path / "seg.dcm", ["a", "b"])
    wrong = Volume(labels[:, :, :9], image.spacing, image.origin, image.direction)
    with pytest.raises(InputError, match=r"9×8×9 voxels.*differs.*9×8×10 voxels"):
        write_dicom_seg(wrong, tmp_path / "ct", tmp_path / "seg.dcm", ["a", "b", "c"])
    assert not (tmp_path / "seg.dcm").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_non_seg_dicom_file_refused_as_mask(tmp_path, image):
    ct_file = next((tmp_path / "ct").iterdir())
    with pytest.raises(InputError, match=ct_file.name + r".*DICOM SEG"):
        read_mask(ct_file)
