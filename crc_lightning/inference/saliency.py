"""Where the classifier looked: Grad-CAM for plain models, the attention map for ``+SA`` models.

Why two methods: the plain head averages the last feature map, so Grad-CAM on the last conv block
(``pytorch-grad-cam``, the maintained implementation) is the standard explanation; the ``+SA`` head
mixes tokens with attention, and its own attention weights (``SpatialSelfAttention.last_attention``,
averaged over heads) say directly which spatial tokens the pooled feature drew from — averaged over
queries, reshaped to the token grid and upsampled to the input.

Maps are [H, W] float32 in [0, 1]. :func:`save_overlay` writes the crop beside the crop with the map
overlaid (matplotlib, Agg backend, no display needed), atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crc_lightning.io.files import atomic_path
from crc_lightning.models.attention import SpatialSelfAttention

__all__ = ["attention_map", "gradcam_map", "gradcam_target_layer", "saliency_map", "save_overlay"]


def gradcam_target_layer(model: nn.Module) -> nn.Module:
    """The last conv block of the backbone: the layer whose output ``forward_features`` returns.

    timm EfficientNets end with ``conv_head`` → ``bn2`` (BatchNorm + activation); ResNets with
    ``layer4``; otherwise the last child of ``blocks`` / ``stages``.
    """
    backbone = getattr(model, "backbone", model)
    for name in ("bn2", "conv_head", "layer4", "final_conv"):
        layer = getattr(backbone, name, None)
        if isinstance(layer, nn.Module) and not isinstance(layer, nn.Identity):
            return layer
    for name in ("blocks", "stages", "features"):
        seq = getattr(backbone, name, None)
        if isinstance(seq, nn.Sequential) and len(seq):
            return seq[-1]
    raise ValueError(f"no last conv block found in {type(backbone).__name__}")


def _normalise01(cam: np.ndarray) -> np.ndarray:
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32))
    lo, hi = float(cam.min()), float(cam.max())
    return (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)


def gradcam_map(model: nn.Module, x: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM of logit ``class_index`` for one normalised input ``x`` [1, C, H, W] → [H, W]."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with (
        torch.enable_grad(),
        GradCAM(model=model, target_layers=[gradcam_target_layer(model)]) as cam,
    ):
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(class_index))])
    return _normalise01(out[0])


@torch.no_grad()
def attention_map(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Attention received by each spatial token (mean over queries) for one input → [H, W]."""
    pool = getattr(model, "pool", None)
    if not isinstance(pool, SpatialSelfAttention):
        raise ValueError("attention_map needs a model whose pool is SpatialSelfAttention (+SA)")
    fmap = model.backbone.forward_features(x)
    pool(fmap)
    att = pool.last_attention  # [B, hw, hw], averaged over heads
    h, w = fmap.shape[-2:]
    grid = att[0].float().mean(dim=0).reshape(1, 1, h, w)
    up = F.interpolate(grid, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return _normalise01(up[0, 0].cpu().numpy())


def saliency_map(model: nn.Module, x: torch.Tensor, class_index: int) -> tuple[np.ndarray, str]:
    """(map, method name): the attention map for ``+SA`` models, Grad-CAM otherwise."""
    if isinstance(getattr(model, "pool", None), SpatialSelfAttention):
        return attention_map(model, x), "attention"
    return gradcam_map(model, x, class_index), "grad-cam"


def save_overlay(image: np.ndarray, cam: np.ndarray, path: str | Path, title: str = "") -> Path:
    """PNG: the grey crop (values in [0, 1]) and the crop with ``cam`` overlaid (jet, alpha 0.45).

    ``cam`` is resized to the crop when their sizes differ. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    image = np.asarray(image, dtype=np.float32)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != image.shape:
        t = torch.from_numpy(cam)[None, None]
        cam = F.interpolate(t, size=image.shape, mode="bilinear", align_corners=False)[0, 0]
        cam = np.clip(cam.numpy(), 0.0, 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.6), dpi=100)
    try:
        for ax in axes:
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_axis_off()
        axes[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
