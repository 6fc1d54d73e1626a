"""HU crops → the model's input: the CT window, the resize to ``res``, the [0, 1] grey tensor.

The same three steps for training (crops read from the store), SimCLR and ``predict`` (crops of a
new scan), so their inputs can never drift apart. The window's width/level and the normalisation
come from the one ``input`` config node every app interpolates (``conf/input/default.yaml``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["crops_to_tensor", "resize_square", "window"]


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """CT window: HU in [level - width/2, level + width/2] → [0, 255] float32, clipped outside."""
    lo = level - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / width)
    return np.clip(out, 0.0, 255.0, out=out)


def resize_square(img: np.ndarray, res: int) -> np.ndarray:
    """Resize a square 2D crop to ``res × res`` float32.

    ``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)``:
    anti-aliased (area-like) when shrinking, bilinear when enlarging. Crops are square in pixels
    and in mm, so the lesion keeps its aspect ratio.
    """
    import torch
    import torch.nn.functional as F

    img = np.asarray(img)
    if img.ndim != 2 or img.shape[0] != img.shape[1]:
        raise ValueError(f"resize_square expects a square 2D crop, got shape {img.shape}")
    if img.shape[0] == res:
        return img.astype(np.float32, copy=True)
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].numpy()


def crops_to_tensor(
    crops: Iterable[np.ndarray], n: int, res: int, width: float, level: float
) -> Any:
    """``n`` HU crops → a [n, 1, res, res] float32 torch tensor in [0, 1] — the model's grey input
    before normalisation, the same for training (the store) and ``predict`` (a new scan).

    Window first (HU → [0, 255]), then scale to [0, 1], then resize: the paper converts HU to grey
    levels before any resampling, and anti-aliased resizing of the clipped image keeps
    out-of-window HU from leaking into neighbouring pixels.
    """
    import torch

    out = torch.empty((int(n), 1, int(res), int(res)), dtype=torch.float32)
    i = -1
    for i, hu in enumerate(crops):
        grey = window(hu, width, level) / np.float32(255.0)
        out[i, 0] = torch.from_numpy(resize_square(grey, int(res)))
    if i + 1 != n:
        raise ValueError(f"crops_to_tensor: expected {n} crops, got {i + 1}")
    return out.clamp_(0.0, 1.0)  # bilinear upsampling may overshoot by rounding
