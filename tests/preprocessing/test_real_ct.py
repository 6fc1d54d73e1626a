"""Algorithm 1 on a real abdominal CT (TotalSegmentator's example, with its organ label map), organs
standing in for lesions: one anatomy gives the same crops whatever the file format and axis order,
the crops are in the radiological view (SimpleITK DICOMOrient(…, "LPS") as the oracle), and a
0/255 mask gives the lesions of its 0/1 version. Skipped when shared/realdata is absent."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from crc_lightning.io import read_image, read_mask
from crc_lightning.preprocessing.algorithm import PreprocessParams, preprocess_scan
from crc_lightning.sources.case import Case
from tests.helpers.realdata import realdata

ORGANS = {1: "spleen", 4: "gallbladder", 5: "liver"}  # TotalSegmentator label values
PARAMS = PreprocessParams(border_mm=9.0)  # 3 mm voxels → a 3 px border


def _sitk_lps(path) -> sitk.Image:
    return sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")


def _write_sitk_series(image: sitk.Image, folder) -> None:
    """A CT series written by SimpleITK/GDCM (an independent writer), one file per slice."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    iop = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    uid = "1.2.826.0.1.3680043.8.498.77"
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        for tag, value in (
            ("0008|0060", "CT"),
            ("0020|000e", uid),
            ("0020|000d", uid + ".1"),
            ("0020|0037", iop),
            (
                "0020|0032",
                "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            ),
            ("0020|0013", str(k + 1)),
        ):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{(7 * k) % image.GetDepth():03d}.dcm"))
        writer.Execute(s)


def _reoriented(nib_img, codes):
    import nibabel as nib

    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(nib_img.affine), nib.orientations.axcodes2ornt(codes)
    )
    out = nib_img.as_reoriented(ornt)
    assert nib.aff2axcodes(out.affine) == tuple(codes)
    return out


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """The example CT as a DICOM series and as LPS, RAS and LAS NIfTI; one organ mask in PLI."""
    import nibabel as nib

    ct_path = realdata("totalsegmentator", "example_ct_sm.nii.gz")
    seg_path = realdata("totalsegmentator", "example_seg.nii.gz")
    tmp = tmp_path_factory.mktemp("real_ct")
    ct = nib.load(ct_path)
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    images = {"RAS": tmp / "ras.nii.gz", "LAS": tmp / "las.nii.gz", "LPS": tmp / "lps.nii.gz"}
    nib.save(ct, images["RAS"])
    nib.save(_reoriented(ct, ("L", "A", "S")), images["LAS"])  # dcm2niix's usual order
    sitk.WriteImage(_sitk_lps(ct_path), str(images["LPS"]))
    images["DICOM"] = tmp / "dicom"
    _write_sitk_series(sitk.Cast(_sitk_lps(ct_path), sitk.sitkInt16), images["DICOM"])
    seg = nib.load(seg_path)
    organs = np.asanyarray(seg.dataobj)
    organs = np.where(np.isin(organs, list(ORGANS)), organs, 0).astype(np.uint8)
    mask = tmp / "organs_pli.nii.gz"
    nib.save(_reoriented(nib.Nifti1Image(organs, seg.affine), ("P", "L", "I")), mask)
    return {"images": images, "mask": mask, "ct": ct_path, "seg": seg_path, "tmp": tmp}


def _crops(image, mask, rule="instance"):
    case = Case("c", "c", image, (mask,), None, "test", lesion_rule=rule)
    img, msk = case.load()
    crops, _ = preprocess_scan(img.array, msk.array, img.spacing, PARAMS, rule)
    return {(c.lesion, c.slice): c.array for c in crops}


def test_same_ct_as_dicom_and_three_nifti_orders_gives_identical_crops(scan):
    ref = _crops(scan["images"]["DICOM"], scan["mask"])
    assert {lesion for lesion, _ in ref} == set(ORGANS) and len(ref) > 30
    for name in ("LPS", "RAS", "LAS"):
        got = _crops(scan["images"][name], scan["mask"])
        assert got.keys() == ref.keys(), name
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{name} {key}")


def test_organ_cropped_in_radiological_orientation_against_simpleitk(scan):
    """The project's reader is not the oracle: SimpleITK's DICOMOrient(…, "LPS") arrays are, and
    each crop is cut from them by hand (box of the organ on that slice, 3 px border, square)."""
    ref_img = _sitk_lps(scan["ct"])
    hu = sitk.GetArrayFromImage(ref_img)
    labels = sitk.GetArrayFromImage(_sitk_lps(scan["seg"]))
    ours = read_image(scan["images"]["RAS"])
    mask = read_mask(scan["seg"], reference=ours)
    np.testing.assert_array_equal(ours.array, hu)
    np.testing.assert_array_equal(mask.array, labels)
    np.testing.assert_allclose(ours.origin, ref_img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.direction.ravel(), ref_img.GetDirection(), atol=1e-6)
    liver, spleen = (np.argwhere(labels == v).mean(axis=0) for v in (5, 1))
    assert liver[2] < spleen[2]  # the patient's right (liver) on the image's left
    gallbladder, kidney = (np.argwhere(labels == v).mean(axis=0) for v in (4, 2))
    assert gallbladder[1] < kidney[1]  # anterior up
    params = PreprocessParams(border_mm=9.0, opening_radius_px=0, epsilon=0.0)
    liver_only = np.where(mask.array == 5, 5, 0)
    crops, _ = preprocess_scan(ours.array, liver_only, ours.spacing, params, "instance")
    assert len(crops) == len(np.unique(np.argwhere(labels == 5)[:, 0]))
    for crop in crops:
        rows, cols = np.nonzero(labels[crop.slice] == 5)
        y0, y1, x0, x1 = rows.min() - 3, rows.max() + 4, cols.min() - 3, cols.max() + 4
        n = max(y1 - y0, x1 - x0)
        y0, x0 = y0 - (n - (y1 - y0)) // 2, x0 - (n - (x1 - x0)) // 2
        padded = np.pad(hu[crop.slice], n, constant_values=-1024)
        expected = padded[y0 + n : y0 + 2 * n, x0 + n : x0 + 2 * n]
        np.testing.assert_array_equal(crop.array, expected)


@pytest.mark.parametrize("value", [255, 1])
def test_binary_organ_mask_any_foreground_value_same_lesions(scan, value):
    """TotalSegmentator's binary liver mask as 0/1 and as 0/255, lesion rule 'components': the
    same lesions and crops (the 0/255 bug made it one lesion '255' … or merged everything)."""
    import nibabel as nib

    liver = nib.load(realdata("totalsegmentator", "example_seg_fast", "liver.nii.gz"))
    data = (np.asanyarray(liver.dataobj) > 0).astype(np.uint8)
    assert set(np.unique(data)) == {0, 1}
    path = scan["tmp"] / f"liver_{value}.nii.gz"
    nib.save(nib.Nifti1Image(data * value, liver.affine), path)
    original = realdata("totalsegmentator", "example_seg_fast", "liver.nii.gz")
    got = _crops(scan["images"]["RAS"], path, "components")
    ref = _crops(scan["images"]["RAS"], original, "components")
    assert got.keys() == ref.keys() and {lesion for lesion, _ in got} >= {1}
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])


def test_nan_in_a_real_ct_is_refused_naming_file_and_count(scan):
    import nibabel as nib

    from crc_lightning.io import InputError, ReadOptions

    ct = nib.load(scan["ct"])
    data = np.asanyarray(ct.dataobj).astype(np.float32)
    data[60, 50, 10:14] = np.nan  # 4 voxels lost in a float export
    data[0, 0, 0] = np.inf
    path = scan["tmp"] / "ct_nan.nii.gz"
    nib.save(nib.Nifti1Image(data, ct.affine), path)
    with pytest.raises(InputError, match=r"ct_nan\.nii\.gz: 5 voxel\(s\) are NaN or infinite"):
        read_image(path)
    filled = read_image(path, ReadOptions(nonfinite_hu=-1024))
    assert np.isfinite(filled.array).all()
    changed = filled.array != read_image(scan["ct"]).array
    assert 0 < changed.sum() <= 5 and (filled.array[changed] == -1024).all()
