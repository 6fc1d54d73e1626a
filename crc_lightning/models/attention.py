"""The paper's "+SA": multi-head self-attention over the backbone's spatial tokens, then ReLU.

Perlo et al. put a multi-head attention layer followed by ReLU before the final FC layer (and, for
SimCLR, before the projection head). Here the backbone's ``[B, C, h, w]`` feature map becomes ``h·w``
tokens of width ``C``; ``torch.nn.MultiheadAttention`` mixes them (with a residual connection so an
untrained block starts close to identity), ReLU follows, and the tokens are average-pooled to ``[B, C]``.
The attention weights are kept for saliency (``last_attention``).
"""

from __future__ import annotations

import torch
from torch import nn


class SpatialSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.0, residual: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.ReLU()
        self.residual = residual
        self.last_attention: torch.Tensor | None = None  # [B, h*w, h*w], averaged over heads

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` feature map → ``[B, C]`` pooled, attended features."""
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, hw, C]
        x = self.norm(tokens)
        attended, weights = self.attn(x, x, x, need_weights=True, average_attn_weights=True)
        self.last_attention = weights.detach()
        out = tokens + attended if self.residual else attended
        return self.act(out).mean(dim=1)


class GlobalPool(nn.Module):
    """The plain head's pooling: ``[B, C, h, w]`` → ``[B, C]`` (timm's default average pool)."""

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))


def make_pool(dim: int, attention: bool, num_heads: int = 8, dropout: float = 0.0) -> nn.Module:
    return SpatialSelfAttention(dim, num_heads, dropout) if attention else GlobalPool()
