"""Reading a crop store written by ``python -m crc_lightning.preprocess`` (format: :mod:`.format`).

Crops are stored as int16 HU (square, at their stored pixel size), so the CT window and the model
resolution are read-time parameters (:mod:`crc_lightning.data.inputs`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.cropstore.format import BUILD_HINT, INDEX_FILE, is_store, read_meta
from crc_lightning.io.errors import InputError

__all__ = ["CropStore"]


class CropStore:
    """A crop store folder, read lazily.

    ``load`` reads a whole case file on first use and keeps the ``cache_cases`` most recently used
    cases in memory (a case holds all crops of one patient scan: typically well under 10 MB).
    """

    def __init__(self, path: str | Path, cache_cases: int = 64) -> None:
        self.path = Path(path)
        if not is_store(self.path):
            raise InputError(self.path, f"no crop store here; {BUILD_HINT}")
        self.meta: dict[str, Any] = read_meta(self.path)
        self.index: pd.DataFrame = pd.read_parquet(self.path / INDEX_FILE)
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
