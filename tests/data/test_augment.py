"""Train augmentation (kornia, per-sample parameters) and the deterministic normalisation."""

from __future__ import annotations

import pytest
import torch

from crc_lightning.data.augment import ClassifierAugment, Normalize, normalize

NORM = {"mean": 0.449, "std": 0.226}  # conf/input/default.yaml

RES = 32
OFF = {  # every random transform disabled / identity
    "rotation_p": 0.0,
    "hflip_p": 0.0,
    "vflip_p": 0.0,
    "crop_scale": (1.0, 1.0),
    "crop_ratio": (1.0, 1.0),
}


def _asymmetric(res: int = RES) -> torch.Tensor:
    """A [1, res, res] image in [0, 1] with no rotation or flip symmetry."""
    yy, xx = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    img = (0.7 * xx / res + 0.25 * (yy / res) ** 2).float()
    img[2:6, 3:12] = 1.0
    return img[None]


def test_normalize_is_hand_formula_and_deterministic():
    x = torch.rand(4, 1, RES, RES, generator=torch.Generator().manual_seed(0))
    norm = Normalize(mean=0.3, std=0.2)
    expected = (x - 0.3) / 0.2
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x), norm(x), rtol=0, atol=0)
    torch.testing.assert_close(normalize(x, 0.3, 0.2), expected)
    torch.testing.assert_close(
        Normalize.from_config({"mean": 0.5, "std": 0.25})(x), (x - 0.5) / 0.25
    )
    torch.testing.assert_close(
        ClassifierAugment(RES, None, NORM).normalize(x), (x - NORM["mean"]) / NORM["std"]
    )


@pytest.mark.parametrize("in_res", [RES, 48])
def test_output_shape_and_dtype(in_res):
    aug = ClassifierAugment(RES, None, NORM)
    x = torch.rand(6, 1, in_res, in_res)
    out = aug(x)
    assert out.shape == (6, 1, RES, RES) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_identical_images_in_one_batch_get_different_parameters():
    torch.manual_seed(0)
    aug = ClassifierAugment(RES, None, NORM)
    x = _asymmetric().expand(8, 1, RES, RES).contiguous()
    out = aug(x)
    flat = out.flatten(1)
    diffs = [(flat[i] - flat[j]).abs().max().item() for i in range(8) for j in range(i + 1, 8)]
    assert min(diffs) > 1e-3, "per-sample parameters: no two outputs may be identical"


def test_flips_are_per_sample_and_exact():
    """Only flips on: each output is exactly one of the 4 flip combinations, and a batch of 64
    identical images shows all four (P(missing one) ≈ 4 · 0.75⁶⁴ ≈ 1e-8)."""
    torch.manual_seed(1)
    aug = ClassifierAugment(RES, {**OFF, "hflip_p": 0.5, "vflip_p": 0.5}, {"mean": 0.0, "std": 1.0})
    img = _asymmetric()
    x = img.expand(64, 1, RES, RES).contiguous()
    out = aug(x)
    variants = [img, img.flip(-1), img.flip(-2), img.flip(-1).flip(-2)]
    seen = set()
    for o in out:
        match = [k for k, v in enumerate(variants) if torch.allclose(o, v, atol=1e-4)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == {0, 1, 2, 3}


def test_all_transforms_off_is_normalize_only():
    aug = ClassifierAugment(RES, OFF, {"mean": 0.4, "std": 0.2})
    x = torch.rand(3, 1, RES, RES)
    torch.testing.assert_close(aug(x), (x - 0.4) / 0.2, atol=1e-4, rtol=1e-4)


def test_rotation_keeps_the_centre_pixel():
    """A rotation about the image centre leaves the centre pixel of an odd-sized image in place."""
    torch.manual_seed(2)
    res = 33
    aug = ClassifierAugment(res, {**OFF, "rotation_p": 1.0}, {"mean": 0.0, "std": 1.0})
    x = torch.rand(5, 1, res, res)
    out = aug(x)
    assert not torch.allclose(out, x, atol=1e-3)
    torch.testing.assert_close(out[:, 0, 16, 16], x[:, 0, 16, 16], atol=1e-4, rtol=0)


def test_bad_config_and_input_are_clear_errors():
    with pytest.raises(ValueError, match="unknown augment keys"):
        ClassifierAugment(RES, {"rotaton_degrees": 10}, NORM)
    with pytest.raises(ValueError, match="std"):
        ClassifierAugment(RES, None, {"mean": 0.0, "std": 0})
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        ClassifierAugment(RES, None, NORM)(torch.rand(2, 3, RES, RES))
