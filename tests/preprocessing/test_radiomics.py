"""Radiomics features of a lesion: hand-computed values, lesion ids, axis-order invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from crc_lightning.preprocessing.radiomics import (
    FEATURE_CLASSES,
    N_VOXELS,
    RadiomicsParams,
    lesion_features,
    resample_lesion,
    scan_features,
)

NATIVE = RadiomicsParams(resample_mm=None)
# the features bound to an array axis (maximum diameter in the plane normal to z, y or x)
AXIS_DIAMETERS = {0: "shape_Maximum2DDiameterSlice", 1: "shape_Maximum2DDiameterColumn"}
AXIS_DIAMETERS[2] = "shape_Maximum2DDiameterRow"


def _cube_case() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A 2×2×2 lesion with HU 10, 20, 30, 40, 60, 80, 90, 110 amid extreme background values."""
    image = np.full((6, 6, 6), 3000.0, np.float32)
    image[::2] = -1000.0
    values = np.array([10, 20, 30, 40, 60, 80, 90, 110], np.float32).reshape(2, 2, 2)
    image[2:4, 1:3, 3:5] = values
    mask = np.zeros(image.shape, np.uint8)
    mask[2:4, 1:3, 3:5] = 1
    return image, mask, (2.0, 0.5, 1.5)


def test_hand_computed_volume_mean_entropy():
    image, mask, spacing = _cube_case()
    feats = scan_features(image, mask, spacing, NATIVE)
    assert list(feats) == [1]
    f = feats[1]
    # 8 voxels of 2.0 × 0.5 × 1.5 mm = 12 mm³
    assert f[N_VOXELS] == 8
    assert f["shape_VoxelVolume"] == pytest.approx(12.0, rel=1e-12)
    assert f["firstorder_Mean"] == pytest.approx(55.0, rel=1e-12)  # 440 / 8
    assert f["firstorder_Median"] == pytest.approx(50.0, rel=1e-12)
    assert (f["firstorder_Minimum"], f["firstorder_Maximum"]) == (10.0, 110.0)
    # bins of 25 HU: [0,25): 10 20 | [25,50): 30 40 | [50,75): 60 | [75,100): 80 90 | [100,125): 110
    p = np.array([2, 2, 1, 2, 1]) / 8
    assert f["firstorder_Entropy"] == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-9)  # 2.25
    assert f["firstorder_Entropy"] == pytest.approx(2.25, rel=1e-9)
    assert f["firstorder_Uniformity"] == pytest.approx((p**2).sum(), rel=1e-12)


def test_bin_width_changes_the_histogram_only():
    image, mask, spacing = _cube_case()
    f = scan_features(image, mask, spacing, RadiomicsParams(resample_mm=None, bin_width=50))[1]
    p = np.array([4, 3, 1]) / 8  # [0,50): 10 20 30 40 | [50,100): 60 80 90 | [100,150): 110
    assert f["firstorder_Entropy"] == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-9)
    assert f["firstorder_Mean"] == pytest.approx(55.0)


def test_every_feature_class_is_computed_and_named():
    image, mask, spacing = _cube_case()
    f = scan_features(image, mask, spacing, NATIVE)[1]
    assert {k.split("_", 1)[0] for k in f if k != N_VOXELS} == set(FEATURE_CLASSES)
    only = scan_features(
        image, mask, spacing, RadiomicsParams(resample_mm=None, feature_classes=("shape",))
    )
    assert {k.split("_", 1)[0] for k in only[1] if k != N_VOXELS} == {"shape"}


def test_resampled_block_keeps_the_physical_volume():
    """A 4×4×4 box of 2 × 1 × 1 mm voxels resampled to 1 mm (linear mask, threshold 0.5,
    lesion-centred grid) is 8 × 4 × 4 voxels: 128 mm³, as before."""
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 2:6, 2:6] = True
    image = np.where(mask, 50.0, -100.0).astype(np.float32)
    img, msk, spacing = resample_lesion(image, mask, (2.0, 1.0, 1.0), RadiomicsParams())
    assert spacing == (1.0, 1.0, 1.0)
    zs, ys, xs = (
        np.flatnonzero(msk.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)
    )
    assert (len(zs), len(ys), len(xs)) == (8, 4, 4) and msk.sum() == 128
    assert np.array_equal(img, np.rint(img))  # HU rounded after B-spline interpolation
    feats = lesion_features(image, mask.astype(np.int32), (2.0, 1.0, 1.0), RadiomicsParams())
    assert feats[1]["shape_VoxelVolume"] == pytest.approx(128.0)


def test_lesion_ids_follow_the_crop_store_rule():
    """Binary mask → components numbered like scipy.ndimage.label (26-connectivity); an instance
    mask keeps its values."""
    mask = np.zeros((12, 20, 20), np.uint8)
    mask[6:9, 2:6, 2:6] = 1  # first in raster order: lesion 1
    mask[1:4, 12:17, 12:18] = 1  # but this one starts on an earlier slice → it is lesion 1
    image = np.random.default_rng(0).normal(40, 20, mask.shape).astype(np.float32)
    spacing = (2.0, 0.8, 0.8)
    feats = scan_features(image, mask, spacing, NATIVE, connectivity=26)
    ref, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert sorted(feats) == list(range(1, n + 1)) == [1, 2]
    for lesion, f in feats.items():
        assert f[N_VOXELS] == np.count_nonzero(ref == lesion)
        assert f["shape_VoxelVolume"] == pytest.approx(f[N_VOXELS] * 2.0 * 0.8 * 0.8)
    instance = np.where(ref == 1, 7, np.where(ref == 2, 4, 0)).astype(np.int32)
    feats = scan_features(image, instance, spacing, NATIVE, lesion_rule="instance")
    assert sorted(feats) == [4, 7]
    assert feats[7][N_VOXELS] == np.count_nonzero(ref == 1)


def test_lesion_too_small_gets_missing_features():
    image, mask, spacing = _cube_case()
    mask[:] = 0
    mask[3, 3, 3] = 1
    f = scan_features(image, mask, spacing, NATIVE)[1]
    assert f[N_VOXELS] == 1
    others = [v for k, v in f.items() if k != N_VOXELS]
    assert len(others) > 90 and all(math.isnan(v) for v in others)
    assert scan_features(image, np.zeros_like(mask), spacing, NATIVE) == {}


def _textured_lesion() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    rng = np.random.default_rng(7)
    shape, spacing = (22, 54, 50), (2.5, 0.75, 0.8)
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    d2 = (
        ((zz - 10.3) * spacing[0]) ** 2
        + ((yy - 25.6) * spacing[1]) ** 2 / 1.3
        + ((xx - 23.2) * spacing[2]) ** 2 * 1.2
    )
    mask = (d2 <= 12.0**2).astype(np.uint8)
    image = 60 + rng.normal(0, 30, shape) + 25 * np.sin(xx / 4) + 15 * np.cos(yy / 3 + zz / 2)
    return np.rint(image).astype(np.float32), mask, spacing


@pytest.mark.parametrize("resample", [None, (1.0, 1.0, 1.0)], ids=["native", "resampled"])
def test_features_do_not_depend_on_axis_order_or_direction(resample):
    """The same lesion stored flipped and with its axes permuted (spacing permuted alike) has the
    same features; only the axis-bound 2D diameters trade places with their axes."""
    image, mask, spacing = _textured_lesion()
    params = RadiomicsParams(resample_mm=resample)
    ref = scan_features(image, mask, spacing, params)[1]
    for perm, flips in (((0, 1, 2), (0, 2)), ((2, 1, 0), ()), ((1, 2, 0), (1,))):
        img, msk = image, mask
        for axis in flips:
            img, msk = np.flip(img, axis), np.flip(msk, axis)
        img, msk = np.transpose(img, perm), np.transpose(msk, perm)
        moved = scan_features(
            np.ascontiguousarray(img), np.ascontiguousarray(msk), [spacing[a] for a in perm], params
        )[1]
        assert set(moved) == set(ref)
        for name, value in ref.items():
            if name in AXIS_DIAMETERS.values():
                continue
            assert moved[name] == pytest.approx(value, rel=1e-6, abs=1e-9), (perm, flips, name)
        for new_axis, old_axis in enumerate(perm):  # new axis k holds old axis perm[k]
            assert moved[AXIS_DIAMETERS[new_axis]] == pytest.approx(
                ref[AXIS_DIAMETERS[old_axis]], rel=1e-9
            )


def test_sphere_volume_and_mean_against_the_analytic_values():
    """A 10 mm ball of uniform 70 HU: mesh volume within 2 % of 4/3 π r³, mean 70, entropy 0."""
    shape, spacing = (16, 40, 40), (2.0, 0.7, 0.7)
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    d2 = ((zz - 7.5) * spacing[0]) ** 2 + ((yy - 19.5) * spacing[1]) ** 2
    d2 += ((xx - 19.5) * spacing[2]) ** 2
    mask = (d2 <= 100.0).astype(np.uint8)
    image = np.where(mask, 70.0, -50.0).astype(np.float32)
    f = scan_features(image, mask, spacing, RadiomicsParams(resample_mm=None))[1]
    assert f["shape_MeshVolume"] == pytest.approx(4 / 3 * math.pi * 1000, rel=0.02)
    assert f["firstorder_Mean"] == 70.0 and f["firstorder_Entropy"] == pytest.approx(0, abs=1e-9)


def test_params_from_config():
    p = RadiomicsParams.from_config({"resample_mm": 2, "feature_classes": ["shape", "glcm"]})
    assert p.resample_mm == (2.0, 2.0, 2.0) and p.feature_classes == ("shape", "glcm")
    assert RadiomicsParams.from_config({"resample_mm": None}).resample_mm is None
    assert RadiomicsParams.from_config(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown radiomics parameter"):
        RadiomicsParams.from_config({"binwidth": 25})
    with pytest.raises(ValueError, match="feature_classes"):
        RadiomicsParams.from_config({"feature_classes": ["glcm", "wavelet"]})
    with pytest.raises(ValueError, match="bin_width"):
        RadiomicsParams(bin_width=0)


def test_complex_results_become_missing_not_their_real_part():
    from crc_lightning.preprocessing.radiomics import _number

    assert _number(np.float64(2.5)) == 2.5 and _number(np.complex128(3 + 0j)) == 3.0
    assert math.isnan(_number(np.complex128(1e-3 + 2j)))  # sqrt of a negative eigenvalue
