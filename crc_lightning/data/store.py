"""Reading the crop store written by ``python -m crc_lightning.preprocess``.

Crops are stored as int16 HU (square, at their stored pixel size), so the CT window and the model
resolution are read-time parameters: :func:`window` maps HU to [0, 255] and :func:`resize_square`
brings a crop to ``res × res``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.io.errors import InputError

__all__ = ["CropStore", "crops_to_tensor", "resize_square", "window"]

BUILD_HINT = "build it with `python -m crc_lightning.preprocess data=<synthetic|manifest|lits|...>`"


class CropStore:
    """A crop store folder: ``index.parquet`` + ``store.json`` + ``cases/*.npz``.

    ``load`` reads a whole case file on first use and keeps the ``cache_cases`` most recently used
    cases in memory (a case holds all crops of one patient scan: typically well under 10 MB).
    """

    def __init__(self, path: str | Path, cache_cases: int = 64) -> None:
        self.path = Path(path)
        index_path, meta_path = self.path / "index.parquet", self.path / "store.json"
        if not index_path.is_file() or not meta_path.is_file():
            raise InputError(
                self.path, f"no crop store here (index.parquet/store.json); {BUILD_HINT}"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.index: pd.DataFrame = pd.read_parquet(index_path)
        self._rows = pd.Series(np.arange(len(self.index)), index=self.index["crop_id"].to_numpy())
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._cache_cases = int(cache_cases)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.meta.get("params", {}))

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self.meta.get("summary", {}))

    def __len__(self) -> int:
        return len(self.index)

    def _case(self, case_file: str) -> dict[str, np.ndarray]:
        if case_file in self._cache:
            self._cache.move_to_end(case_file)
            return self._cache[case_file]
        path = self.path / case_file
        if not path.is_file():
            raise InputError(path, f"case file listed in the index is missing; {BUILD_HINT}")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if not k.startswith("__")}
        self._cache[case_file] = arrays
        while len(self._cache) > self._cache_cases:
            self._cache.popitem(last=False)
        return arrays

    def load(self, crop_id: str) -> np.ndarray:
        """The int16 HU crop ``crop_id`` (``"{patient_id}/{lesion}/{slice}"``)."""
        try:
            row = int(self._rows[crop_id])
        except KeyError:
            raise KeyError(f"crop {crop_id!r} is not in the store {self.path}") from None
        case_file = str(self.index["case_file"].iat[row])
        return self._case(case_file)[str(self.index["key"].iat[row])]

    def load_many(self, crop_ids: Sequence[str]) -> list[np.ndarray]:
        return [self.load(c) for c in crop_ids]


def window(hu: np.ndarray, width: float = 400.0, level: float = 40.0) -> np.ndarray:
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
    crops: Iterable[np.ndarray], n: int, res: int, width: float = 400.0, level: float = 40.0
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
