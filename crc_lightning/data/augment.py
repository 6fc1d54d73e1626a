"""Train-time augmentation and the deterministic input normalisation (Perlo et al. 2024, Sec. IV.C).

"Each data mini-batch passes through multiple augmentation transformations, like random rotation,
image flipping, image cropping and then tensor normalization." The augmentations run batched on the
device (``kornia.augmentation``, called from ``CropDataModule.on_after_batch_transfer``) with
*per-sample* random parameters, on images already windowed to [0, 1] at ``res × res``.

:class:`Normalize` / :func:`normalize` is the only transform of the evaluation and predict paths,
so it is kept separate and deterministic: ``(x - mean) / std`` with the 1-channel mean/std of the
``input.normalize`` config node (``conf/input/default.yaml``: the mean of ImageNet's per-channel
statistics, what an ImageNet-pretrained backbone collapsed to one input channel expects).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kornia.augmentation as K
import torch
from kornia.enhance import normalize as _kornia_normalize
from torch import nn

__all__ = ["DEFAULTS", "ClassifierAugment", "Normalize", "normalize"]

DEFAULTS: dict[str, Any] = {
    "rotation_degrees": 180.0,  # lesions have no canonical in-plane orientation
    "rotation_p": 1.0,
    "hflip_p": 0.5,
    "vflip_p": 0.5,
    "crop_scale": (0.7, 1.0),  # area fraction kept by RandomResizedCrop, then resized back to res
    "crop_ratio": (0.9, 1.0 / 0.9),
    "crop_p": 1.0,
}


def _cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(DEFAULTS)
    if cfg is not None:
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown augment keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        out.update({k: v for k, v in dict(cfg).items() if v is not None})
    return out


def normalize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(x - mean) / std`` for a [B, 1, H, W] batch in [0, 1]; deterministic."""
    m = torch.tensor([float(mean)], dtype=x.dtype, device=x.device)
    s = torch.tensor([float(std)], dtype=x.dtype, device=x.device)
    return _kornia_normalize(x, m, s)


class Normalize(nn.Module):
    """The evaluation / predict transform: :func:`normalize` with the config's mean and std."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        if float(std) <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Normalize:
        """From the ``input.normalize`` node (``mean``, ``std``)."""
        return cls(float(cfg["mean"]), float(cfg["std"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class ClassifierAugment(nn.Module):
    """Random rotation → horizontal/vertical flips → random resized crop to ``res`` → normalize.

    Parameters are drawn per sample (``same_on_batch=False``) from torch's global RNG, so a run is
    reproducible under ``lightning.seed_everything``. Input and output: [B, 1, H, W] → [B, 1, res, res].
    ``cfg`` keys (all optional, see :data:`DEFAULTS`): ``rotation_degrees``, ``rotation_p``,
    ``hflip_p``, ``vflip_p``, ``crop_scale``, ``crop_ratio``, ``crop_p``; ``normalize``: the
    ``input.normalize`` node (``mean``, ``std``).
    """

    def __init__(
        self, res: int, cfg: Mapping[str, Any] | None, normalize: Mapping[str, Any]
    ) -> None:
        super().__init__()
        c = _cfg(cfg)
        self.res = int(res)
        self.augment = nn.Sequential(
            K.RandomRotation(degrees=float(c["rotation_degrees"]), p=float(c["rotation_p"])),
            K.RandomHorizontalFlip(p=float(c["hflip_p"])),
            K.RandomVerticalFlip(p=float(c["vflip_p"])),
            K.RandomResizedCrop(
                size=(self.res, self.res),
                scale=tuple(float(v) for v in c["crop_scale"]),
                ratio=tuple(float(v) for v in c["crop_ratio"]),
                p=float(c["crop_p"]),
            ),
        )
        self.normalize = Normalize.from_config(normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"ClassifierAugment expects [B, 1, H, W], got {tuple(x.shape)}")
        out = self.augment(x)
        if out.shape[-2:] != (self.res, self.res):  # crop_p < 1 leaves some inputs uncropped
            out = torch.nn.functional.interpolate(
                out, size=(self.res, self.res), mode="bilinear", align_corners=False
            )
        return self.normalize(out)
