"""Reading a crop store written by ``python -m crc_lightning.preprocess`` (format: :mod:`.format`).

Crops are stored as int16 HU (square, at their stored pixel size), so the CT window and the model
resolution are read-time parameters (:mod:`crc_lightning.data.inputs`).

Two ways to read: :class:`CropStore` loads a whole case file on first use and keeps recent cases
(for reading everything once); :class:`CaseFileReader` reads one crop at a time — a case file is an
uncompressed ``.npz`` (a zip of ``.npy`` members), so one crop is one member read, and memory does
not depend on the cohort (the training data modules' ``cache=lazy``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.cropstore.format import BUILD_HINT, INDEX_FILE, is_store, read_meta
from crc_lightning.io.errors import InputError

__all__ = ["CaseFileReader", "CropStore"]


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


class CaseFileReader:
    """One crop at a time from case files, without loading the rest of the case.

    Keeps up to ``max_open`` case files open (least recently used closed first): opening parses
    the zip directory once, a read is then one member. Fork- and pickle-safe for DataLoader
    workers: open files belong to the process that opened them (a forked worker opens its own;
    they all share the operating system's page cache), and the reader pickles without them.
    """

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = int(max_open)
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_open"])

    def _npz(self, path: str) -> Any:
        if os.getpid() != self._pid:  # a forked worker: the parent's handles are not ours
            self._open = OrderedDict()
            self._pid = os.getpid()
        npz = self._open.get(path)
        if npz is not None:
            self._open.move_to_end(path)
            return npz
        if not os.path.isfile(path):
            raise InputError(path, f"case file listed in the index is missing; {BUILD_HINT}")
        npz = np.load(path, allow_pickle=False)
        self._open[path] = npz
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return npz

    def read(self, path: str | Path, key: str) -> np.ndarray:
        """The crop ``key`` of the case file ``path`` (int16 HU)."""
        npz = self._npz(str(path))
        try:
            return npz[key]
        except KeyError:
            raise InputError(path, f"case file has no crop {key!r}; {BUILD_HINT}") from None

    def close(self) -> None:
        for npz in self._open.values():
            npz.close()
        self._open.clear()
