"""Crop images read from the store when a batch needs them (``cache=lazy`` of the data modules).

:class:`StoreImages` stands where the in-memory mode keeps one ``[N, 1, res, res]`` tensor:
``images[i]`` is the same ``[1, res, res]`` float32 tensor, bit for bit, computed on read from crop
``i``'s int16 HU in its case file (:class:`~crc_lightning.cropstore.reader.CaseFileReader`) by the
same function as the in-memory mode — windowed to [0, 1] and resized
(:func:`~crc_lightning.data.inputs.crops_to_tensor`) for the classifier, or resized in HU for
SimCLR, whose window is an augmentation. So memory holds the crop *list* only (fixed-width numpy
strings, no Python objects: forked DataLoader workers share it without copy-on-write), not the
crops; the operating system's page cache keeps the case files every worker reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crc_lightning.cropstore.format import BUILD_HINT
from crc_lightning.cropstore.reader import CaseFileReader
from crc_lightning.data.inputs import crops_to_tensor, resize_square
from crc_lightning.io.errors import InputError

__all__ = ["CACHE_MODES", "StoreImages", "check_cache_mode"]

CACHE_MODES = ("lazy", "memory")


def check_cache_mode(mode: str) -> str:
    mode = str(mode)
    if mode not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {mode!r}")
    return mode


class StoreImages:
    """Crops ``(file, key)`` of crop stores as model inputs, read on indexing.

    ``window=(width, level)``: window → [0, 1] → resize (the classifier's input); ``None``: resize
    the HU crop (SimCLR's input, windowed by its augmentation).
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        keys: Sequence[str],
        res: int,
        window: tuple[float, float] | None,
        max_open: int = 64,
    ) -> None:
        if len(files) != len(keys):
            raise ValueError(f"{len(files)} files for {len(keys)} keys")
        names, codes = np.unique(
            np.asarray([str(f) for f in files], dtype=str), return_inverse=True
        )
        missing = [str(n) for n in names if not os.path.isfile(n)]
        if missing:  # now, not in the middle of an epoch
            raise InputError(
                missing[0],
                f"case file listed in the index is missing ({len(missing)} of {len(names)}); "
                f"{BUILD_HINT}",
            )
        self._names = names
        self._codes = codes.astype(np.int32)
        self._keys = np.asarray(list(keys), dtype=str)
        self.res = int(res)
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.reader = CaseFileReader(max_open)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 1, self.res, self.res)

    def hu(self, i: Any) -> np.ndarray:
        """Crop ``i`` as stored (int16 HU, its stored size)."""
        i = int(i)
        return self.reader.read(str(self._names[self._codes[i]]), str(self._keys[i]))

    def __getitem__(self, i: Any) -> torch.Tensor:
        hu = self.hu(i)
        if self.window is None:
            return torch.from_numpy(resize_square(hu.astype(np.float32), self.res))[None]
        width, level = self.window
        return crops_to_tensor([hu], 1, self.res, width, level)[0]
