"""Algorithm 1 pieces against independent oracles (scipy.ndimage, hand-computed values)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import disk

from crc_lightning.io.lesions import lesion_labels, lesion_labels_in_box
from crc_lightning.preprocessing.algorithm import (
    PreprocessParams,
    border_px,
    clean_slices,
    extract_crop,
    preprocess_volume,
    select_slices,
    square_crop_box,
    to_square_pixels,
)


def _blobs(shape=(24, 40, 48), seed=0, p=0.78) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), 1.0) > np.quantile(
        ndi.gaussian_filter(rng.random(shape), 1.0), p
    )


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two label maps describe the same components (numbering aside)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


# --------------------------------------------------------------------------- components


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_match_scipy_26_connectivity(seed):
    mask = np.random.default_rng(seed).random((20, 30, 40)) > 0.8  # many diagonal contacts
    ours = lesion_labels(mask, "components")
    ref, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
    assert ours.dtype == np.int32
    assert ours.max() == n > 10
    assert _same_partition(ours, ref)
    # documented numbering: scipy's raster order, also for a Fortran-ordered input (nibabel)
    assert np.array_equal(ours, ref)
    fortran = np.asfortranarray(mask.astype(np.uint8))
    assert np.array_equal(lesion_labels(fortran, "components"), ref)
    # a reoriented view (negative strides) is labelled like its contiguous copy
    view = mask[:, ::-1, ::-1]
    assert np.array_equal(
        lesion_labels(view, "components"),
        ndi.label(np.ascontiguousarray(view), structure=np.ones((3, 3, 3)))[0],
    )


@pytest.mark.parametrize("value", [1, 255, 7])
def test_components_rule_ignores_mask_values(value):
    """0/1, 0/255 or a label map: with the components rule the lesions are those of mask > 0
    (the 0/255 bug: a max-value heuristic made 0/255 one lesion "255")."""
    mask = np.random.default_rng(4).random((12, 20, 20)) > 0.85
    ref, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
    got = lesion_labels(mask.astype(np.uint8) * value, "components")
    assert n > 3 and np.array_equal(got, ref)


def test_unknown_lesion_rule_refused():
    with pytest.raises(ValueError, match="lesion rule"):
        lesion_labels(np.zeros((2, 2, 2), np.uint8), "binary")


def test_components_6_connectivity_differs_and_matches_scipy():
    mask = np.zeros((3, 3, 3), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = 1  # corner contact only
    assert lesion_labels(mask, "components").max() == 1
    six = lesion_labels(mask, "components", connectivity=6)
    assert _same_partition(six, ndi.label(mask)[0]) and six.max() == 2


def test_instance_mask_is_kept_and_bad_masks_refused():
    inst = np.zeros((4, 5, 6), np.uint16)
    inst[0, :2, :2] = 7
    inst[3, 3:, 3:] = 7  # one instance in two pieces stays one lesion
    inst[2, 0, 5] = 3
    out = lesion_labels(inst, "instance")
    assert out.dtype == np.int32 and np.array_equal(out, inst)
    single = (inst == 7).astype(np.uint8)  # values {0, 1}: still one lesion, id 1, by the rule
    assert np.array_equal(lesion_labels(single, "instance"), single)
    assert lesion_labels(single, "components").max() == 2
    with pytest.raises(ValueError, match="non-negative"):
        lesion_labels(-inst.astype(np.int32), "instance")
    with pytest.raises(ValueError, match="whole"):
        lesion_labels(inst.astype(float) * 0.5, "instance")
    with pytest.raises(ValueError, match="3D"):
        lesion_labels(inst[0], "instance")


# --------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize("radius", [1, 2])
def test_per_slice_opening_matches_scipy(radius):
    mask = _blobs()
    ours = clean_slices(mask, radius)
    for z in range(mask.shape[0]):
        ref = ndi.binary_opening(mask[z], structure=disk(radius).astype(bool))
        assert np.array_equal(ours[z], ref), z
    assert np.array_equal(clean_slices(mask, 0), mask)


def test_volume_areas_equal_full_slice_opening():
    """Working inside padded lesion boxes gives the areas of a full-slice opening per lesion,
    including lesions touching the volume edge."""
    mask = _blobs(seed=3, p=0.85)
    mask[:, 0, :6] = True  # touch the border
    labels = lesion_labels(mask, "components")
    params = PreprocessParams(opening_radius_px=1, epsilon=0.0, border_mm=2.0)
    spacing = (0.8, 0.8)
    crops, stats = preprocess_volume(np.zeros(mask.shape, np.float32), labels, spacing, params)
    got = {(c.lesion, c.slice): c.area_mm2 for c in crops}
    want = {}
    for lesion in range(1, labels.max() + 1):
        for z in range(mask.shape[0]):
            area = ndi.binary_opening(labels[z] == lesion, structure=disk(1).astype(bool)).sum()
            if area:
                want[(lesion, z)] = area * 0.64
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k]) for k in want)
    assert sum(s.raw_slices for s in stats) >= len(want)


# --------------------------------------------------------------------------- slice inclusion


def test_slice_inclusion_at_exactly_epsilon():
    # μ over non-empty slices = (10 + 40 + 40 + 10) / 4 = 25; 0.4 · 25 = 10 → both 10s included
    areas = np.array([0, 10, 40, 40, 10, 0])
    assert select_slices(areas, 0.4).tolist() == [False, True, True, True, True, False]
    # μ = (9 + 41 + 40 + 10) / 4 = 25 → threshold 10: 9 is just below, 10 exactly at it
    areas = np.array([9, 41, 40, 10])
    assert select_slices(areas, 0.4).tolist() == [False, True, True, True]
    # reference areas decide μ (raw mode): μ = (20 + 20) / 2 = 20 → threshold 8
    assert select_slices(np.array([8, 7, 0]), 0.4, np.array([20, 20, 0])).tolist() == [
        True,
        False,
        False,
    ]
    assert select_slices(np.array([30, 10]), 0.0, min_area=11).tolist() == [True, False]
    assert not select_slices(np.zeros(3), 0.4).any()


def test_slice_inclusion_in_a_volume_hand_computed():
    """Rectangles of 10, 40, 40, 9 pixels (no cleaning): μ = 99/4 = 24.75, ε·μ = 9.9."""
    labels = np.zeros((6, 30, 30), np.int32)
    labels[1, 5:7, 5:10] = 1  # 10
    labels[2, 5:10, 5:13] = 1  # 40
    labels[3, 5:10, 5:13] = 1  # 40
    labels[4, 5:8, 5:8] = 1  # 9
    params = PreprocessParams(opening_radius_px=0, epsilon=0.4, border_mm=1.0)
    crops, stats = preprocess_volume(np.zeros(labels.shape, np.float32), labels, (0.5, 0.5), params)
    assert [c.slice for c in crops] == [1, 2, 3]
    assert [c.area_mm2 for c in crops] == [2.5, 10.0, 10.0]
    assert stats[0].raw_slices == 4 and stats[0].kept_slices == 3 and stats[0].dropped_slices == 1


# --------------------------------------------------------------------------- border and crop


def test_border_pixels_anisotropic():
    assert border_px(10.0, (1.0, 0.5)) == (10, 20)
    assert border_px(10.0, (0.7, 0.78125)) == (15, 13)  # ceil(14.29), ceil(12.8)
    assert border_px(10.0, (0.1, 0.1)) == (100, 100)  # 10/0.1 float noise does not add a pixel


def test_square_crop_in_mm_hand_computed():
    # rows 50..59 (10 px × 1 mm), cols 40..79 (40 px × 0.5 mm); border 10 mm = 10 px / 20 px
    # bordered: rows 40..69 → 30 mm, cols 20..99 → 40 mm; side 40 mm → 40 rows × 80 cols
    y0, x0, ny, nx = square_crop_box((50, 60, 40, 80), (1.0, 0.5), 10.0)
    assert (y0, x0, ny, nx) == (35, 20, 40, 80)
    assert ny * 1.0 == nx * 0.5 == 40.0
    # isotropic, taller than wide: 30×10 px box at 0.8 mm, border 4 mm = 5 px → 40×20 → 40×40
    assert square_crop_box((0, 30, 100, 110), (0.8, 0.8), 4.0) == (-5, 85, 40, 40)


def test_extract_crop_pads_with_air_and_copies_values():
    img = np.arange(100, dtype=np.float32).reshape(10, 10)
    crop = extract_crop(img, -2, 7, 5, 6)
    assert crop.shape == (5, 6)
    assert (crop[:2] == -1024).all() and (crop[:, 3:] == -1024).all()
    assert np.array_equal(crop[2:, :3], img[0:3, 7:10])


def test_to_square_pixels_keeps_physical_positions():
    # value = y position (mm) of each pixel centre; rows are 1 mm, columns 0.5 mm
    ny, nx = 40, 80
    crop = np.repeat(((np.arange(ny) + 0.5) * 1.0)[:, None], nx, axis=1).astype(np.float32)
    out, spacing = to_square_pixels(crop, (1.0, 0.5))
    assert out.shape == (80, 80) and spacing == (0.5, 0.5)
    centres = (np.arange(80) + 0.5) * 0.5
    inner = slice(1, 79)  # the first/last half pixel is clamped at the edge
    np.testing.assert_allclose(out[inner, 10], centres[inner], atol=1e-4)
    same, sp = to_square_pixels(crop[:40, :40], (0.7, 0.7))
    assert same is not None and sp == (0.7, 0.7) and same.shape == (40, 40)


def test_crops_are_the_image_window_and_anisotropic_crops_are_square():
    rng = np.random.default_rng(0)
    image = rng.integers(-200, 300, size=(8, 64, 64)).astype(np.float32)
    labels = np.zeros(image.shape, np.int32)
    labels[2:6, 20:30, 24:34] = 4
    params = PreprocessParams(opening_radius_px=1, epsilon=0.4, border_mm=5.0)
    crops, _ = preprocess_volume(image, labels, (1.0, 1.0), params)
    assert [c.slice for c in crops] == [2, 3, 4, 5] and {c.lesion for c in crops} == {4}
    c = crops[0]
    # 10×10 box (the opening keeps a square) + 5 px each side → 20×20 at rows 15.., cols 19..
    assert c.array.dtype == np.int16 and c.array.shape == (20, 20)
    assert np.array_equal(c.array, image[2, 15:35, 19:39].astype(np.int16))
    # anisotropic: the stored crop is square in pixels and in mm, covering box + 2 borders
    crops, _ = preprocess_volume(image, labels, (1.0, 0.5), params)
    c = crops[0]
    n = c.size_px
    assert c.array.shape == (n, n)
    assert c.spacing_y == pytest.approx(c.spacing_x, rel=0.05)
    assert n * c.spacing_y >= 10 * 1.0 + 2 * 5.0 and n * c.spacing_x >= 10 * 0.5 + 2 * 5.0


def test_params_from_config_rejects_typos():
    p = PreprocessParams.from_config({"epsilon": "0.3", "border_mm": 5})
    assert p.epsilon == 0.3 and p.border_mm == 5.0 and p.connectivity == 26
    with pytest.raises(ValueError, match="unknown"):
        PreprocessParams.from_config({"epsilonn": 0.4})
    with pytest.raises(ValueError, match="whole"):
        PreprocessParams.from_config({"opening_radius_px": 1.5})


def test_no_full_volume_copies_per_lesion():
    """Peak extra memory stays far below one volume although there are several lesions."""
    image = np.zeros((64, 256, 256), np.float32)  # 16 MiB
    labels = np.zeros(image.shape, np.int32)  # 16 MiB
    for i in range(5):
        labels[10 + 8 * i : 16 + 8 * i, 30 + 40 * i : 45 + 40 * i, 100:115] = i + 1
    params = PreprocessParams()
    tracemalloc.start()
    crops, _ = preprocess_volume(image, labels, (0.8, 0.8), params)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len({c.lesion for c in crops}) == 5
    assert peak < image.nbytes / 8, peak


@pytest.mark.parametrize("instance", [False, True])
def test_box_only_labelling_gives_the_full_volume_result(instance):
    """Labelling the lesions' box + offset = labelling and processing the whole volume."""
    mask = np.zeros((30, 60, 70), np.uint8)
    mask[3:20, 10:40, 20:50] = _blobs((17, 30, 30), seed=5, p=0.7)
    if instance:
        mask = mask * 9
    image = np.random.default_rng(1).normal(40, 50, mask.shape).astype(np.float32)
    rule = "instance" if instance else "components"
    full = lesion_labels(mask, rule)
    inner, box = lesion_labels_in_box(mask, rule)
    assert np.array_equal(full[box], inner) and not full[mask == 0].any()
    assert lesion_labels_in_box(np.zeros((3, 4, 5), np.uint8), rule)[1] is None
    params = PreprocessParams(border_mm=3.0)
    a, sa = preprocess_volume(image, full, (0.7, 0.7), params)
    offset = tuple(b.start for b in box)
    b, sb = preprocess_volume(image, inner, (0.7, 0.7), params, offset)
    assert sa == sb and len(a) == len(b) > 0
    for ca, cb in zip(a, b):
        assert (ca.lesion, ca.slice, ca.area_mm2) == (cb.lesion, cb.slice, cb.area_mm2)
        assert np.array_equal(ca.array, cb.array)
    with pytest.raises(ValueError, match="does not fit"):
        preprocess_volume(image, inner, (0.7, 0.7), params, (29, 0, 0))
