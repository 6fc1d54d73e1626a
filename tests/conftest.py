"""Test-wide settings: offline hubs, offline W&B, single-threaded BLAS for stable timings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch

torch.set_flush_denormal(True)
