"""Readers on real DICOM files nobody on this project wrote: compressed CT slices (pydicom-data),
an Enhanced CT multi-frame object, and highdicom's SEG test objects drawn on pydicom's bundled CT
series — with SimpleITK and raw pydicom as the oracles. Skipped with the reason when absent."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import crc_lightning.io as cio
from crc_lightning.io import InputError, ReadOptions, Volume, read_image, read_mask
from tests.helpers.realdata import pydicom_file, realdata

CT2 = ("17106", "17136", "17166", "17196")  # dicomdirtests/77654033/CT2: z -99.48, 103.02 …


def _folder(tmp_path, name, files) -> object:
    folder = tmp_path / name
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


def _sitk_lps(path) -> sitk.Image:
    return sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")


# ------------------------------------------------------------------------------------ compression
@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("bad_sequence.dcm", "1.2.840.10008.1.2.4.70"),  # JPEG Lossless, Process 14 SV1
        ("693_J2KR.dcm", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
        ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91"),  # JPEG 2000 (lossy allowed)
    ],
)
def test_compressed_ct_slice_decodes_to_simpleitk_hu(tmp_path, name, syntax):
    path = pydicom_file(name)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax and ds.Modality == "CT"
    vol = read_image(_folder(tmp_path, "series", [path]))
    ref = _sitk_lps(path)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-4)
    assert float(ds.RescaleIntercept) == -1024 and vol.array.min() < -500  # HU, not stored values


def test_jpeg2000_lossless_equals_its_uncompressed_twin(tmp_path):
    j2k = read_image(_folder(tmp_path, "j2k", [pydicom_file("693_J2KR.dcm")]))
    raw = read_image(_folder(tmp_path, "raw", [pydicom_file("693_UNCR.dcm")]))
    np.testing.assert_array_equal(j2k.array, raw.array)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless"])
def test_series_compressed_with_pydicom_reads_like_the_original(tmp_path, syntax):
    """pydicom's bundled CT slices re-encoded (RLE, JPEG-LS): the same HU volume. (JPEG 2000 and
    JPEG Lossless are covered by real files above; openjpeg cannot encode 16×16 slices.)"""
    from pydicom import uid

    files = [pydicom_file(f"dicomdirtests/77654033/CT2/{n}") for n in CT2[1:]]
    original = read_image(_folder(tmp_path, "orig", files))
    folder = tmp_path / syntax
    folder.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(getattr(uid, syntax))
        ds.save_as(folder / f.name)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == getattr(
        uid, syntax
    )
    np.testing.assert_array_equal(read_image(folder).array, original.array)


# ------------------------------------------------------------------------------------ Enhanced CT
def test_enhanced_ct_reads_like_simpleitk_and_like_a_series(tmp_path):
    path = pydicom_file("eCT_Supplemental.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames == 2
    ref = _sitk_lps(path)
    for source in (path, _folder(tmp_path, "enhanced", [path])):  # the file, or its folder
        vol = read_image(source)
        np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref).astype(np.float32))
        np.testing.assert_allclose(vol.spacing[::-1], ref.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(vol.direction.ravel(), ref.GetDirection(), atol=1e-6)
        grid = cio.read_image_grid(source)  # header only
        assert grid.shape == vol.shape and np.allclose(grid.origin, vol.origin)
    # the same frames as a classic one-file-per-slice series give the same volume
    series = cio.write_dicom_series(vol, tmp_path / "as_series", "P")
    np.testing.assert_array_equal(read_image(series).array, vol.array)


# ------------------------------------------------------------------------------------ DICOM SEG
@pytest.fixture
def ct2(tmp_path):
    """The 3 regularly spaced slices of pydicom's CT2 series (the 4th lies 200 mm away)."""
    files = [pydicom_file(f"dicomdirtests/77654033/CT2/{n}") for n in CT2[1:]]
    return read_image(_folder(tmp_path, "ct2", files))


def _raw_frames(seg_path, segment: int) -> dict[float, np.ndarray]:
    """Oracle: the SEG's frames of one segment by z position (raw pydicom)."""
    ds = pydicom.dcmread(seg_path)
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    out = {}
    for frame, fg in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        if int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == segment:
            out[round(float(fg.PlanePositionSequence[0].ImagePositionPatient[2]), 2)] = frame
    return out


def test_binary_seg_placed_on_its_real_ct(ct2):
    seg = realdata("highdicom", "seg_image_ct_binary.dcm")
    mask = read_mask(seg, reference=ct2)
    frames = _raw_frames(seg, 1)
    zs = [round(ct2.origin[2] + k * ct2.spacing[0], 2) for k in range(ct2.shape[0])]
    np.testing.assert_array_equal(mask.array, np.stack([frames[z] for z in zs]).astype(np.int32))
    own = read_mask(seg)  # without reference: the SEG's own grid, here the same 3 slices
    np.testing.assert_array_equal(own.array, mask.array)
    np.testing.assert_allclose(own.origin, ct2.origin, atol=1e-3)


def test_seg_frame_missing_from_the_ct_is_refused_naming_it(ct2):
    """The overlap SEG also annotates slice 17106 (z = -99.48), which this CT lacks."""
    seg = realdata("highdicom", "seg_image_ct_binary_overlap.dcm")
    with pytest.raises(InputError) as err:
        read_mask(seg, reference=ct2, segments=[2])
    msg = str(err.value)
    assert "seg_image_ct_binary_overlap.dcm" in msg and "-99.48" in msg
    assert "1 frame(s)" in msg and "outside the image" in msg


def test_seg_on_a_thicker_reconstruction_is_refused_not_thinned(tmp_path):
    """CT of slices 1 and 3 only (2.5 mm): the SEG's middle frame lies between them."""
    files = [pydicom_file(f"dicomdirtests/77654033/CT2/{n}") for n in (CT2[1], CT2[3])]
    thick = read_image(_folder(tmp_path, "thick", files))
    seg = realdata("highdicom", "seg_image_ct_binary.dcm")
    with pytest.raises(
        InputError, match=r"1 frame\(s\).*between the image's voxel positions.*104\.27"
    ):
        read_mask(seg, reference=thick)
    resampled = read_mask(seg, reference=thick, options=ReadOptions(resample_mask=True))
    frames = _raw_frames(seg, 1)
    np.testing.assert_array_equal(resampled.array[0], frames[103.02])
    np.testing.assert_array_equal(resampled.array[1], frames[105.52])
    assert resampled.resampled


def test_overlapping_segments_need_naming(ct2):
    """Segments 1 and 2 overlap: refused as a whole, fine once the lesion segment is named."""
    seg = realdata("highdicom", "seg_image_ct_binary_overlap.dcm")
    z0 = -99.48  # a grid spanning all its frames: 165 slices of 1.25 mm up to 105.52
    big = Volume(
        np.broadcast_to(np.zeros((), np.uint8), (165, *ct2.shape[1:])),
        ct2.spacing,
        (ct2.origin[0], ct2.origin[1], z0),
        ct2.direction,
    )
    with pytest.raises(InputError, match=r"segments 1 \('first segment'\) and 2 .* overlap"):
        read_mask(seg, reference=big)
    for named in ([2], "second"):
        mask = read_mask(seg, reference=big, segments=named)
        frames = _raw_frames(seg, 2)
        assert set(np.unique(mask.array)) == {0, 2}  # value = segment number
        for z, frame in frames.items():
            k = round((z - z0) / ct2.spacing[0])
            np.testing.assert_array_equal(mask.array[k], frame.astype(np.int32) * 2)
    with pytest.raises(InputError, match=r"no segment label matches 'tumou\?r'.*first segment"):
        read_mask(seg, reference=big, segments="tumou?r")


def test_fractional_seg_refused():
    with pytest.raises(InputError, match=r"fractional.*BINARY"):
        read_mask(realdata("highdicom", "seg_image_ct_binary_fractional.dcm"))
