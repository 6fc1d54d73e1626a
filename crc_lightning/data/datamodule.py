"""The classifier's LightningDataModule over a crop store.

``setup()`` does, once per instance (all stages share it, so fit → test sees the same split):

1. read the store index, keep labelled rows (every gene column present), drop ``exclude_patients``
   (:func:`labelled_rows`, which the run app and the pretraining exclusion share);
2. class matrix via :meth:`LabelSet.encode`; the patient-grouped split is the ``split`` given (a
   :class:`~crc_lightning.data.splits.Split`: one fold of the run app's plan), or computed from the
   ``split`` config, stratified on the five-gene matrix whatever the label set (:mod:`.splits`);
3. median balancing of the *training* rows (:mod:`.balance`), **once per setup**, drawn from the
   seed — the paper balances "at the beginning of the training phase"; re-drawing per epoch would
   make the epoch content depend on how many epochs ran, and a fixed set is easier to audit.
   ``sampling`` then says how an epoch is drawn: ``image`` (paper) = every image of the balanced
   set once, shuffled; ``lesion`` = as many draws as the balanced set holds, with replacement, by
   :class:`torch.utils.data.WeightedRandomSampler` over *every* training row with
   :func:`~crc_lightning.data.balance.lesion_weights`: each sampling group keeps its balanced
   budget and, inside it, every lesion gets the same expected number of draws whatever its slice
   count (README "Training recipe");
4. the images, windowed (``window``: the ``input.window`` node) and resized to ``res``, float32 in
   [0, 1] (window → /255 → :func:`resize_square`), by ``cache``:

   * ``lazy`` (default): each crop is read from its case file when a batch needs it
     (:class:`~crc_lightning.data.images.StoreImages`): memory does not grow with the cohort, and
     DataLoader workers share the case files through the page cache. ``benchmarks/memory.py``:
     peak RSS flat from 1× to 16× the synthetic cohort, training images/s as in memory;
   * ``memory``: every crop pre-loaded as one tensor (64 KB a crop at res 128: 4 000 crops =
     256 MB, 1 GB at res 256), cached per process under (store folder, index file stamp, res,
     window), so folds/seeds run in one process reuse it — for small cohorts and many short jobs.

   Both give the same tensors, bit for bit.

Batches are dicts ``{"image": [B,1,res,res] float32 in [0,1], "target": [B,C] float32,
"index": [B] long}`` where ``index`` is the row of ``train_index`` / ``val_index`` / ``test_index``
of that stage (to write ``predictions.csv``). After the transfer to the device,
``on_after_batch_transfer`` applies :class:`ClassifierAugment` while the trainer is training, and
only the deterministic :class:`Normalize` otherwise (validation, test, sanity checks).

Determinism: split and balancing are functions of ``seed``; the training loader shuffles (or
draws, ``sampling=lesion``) with its own ``torch.Generator`` seeded by ``seed`` (advanced epoch by
epoch); augmentation draws from torch's
global RNG (seeded by ``lightning.seed_everything`` in the run app).

Labels: ``labels`` is a :class:`LabelSet` or the ``conf/labels/<name>.yaml`` mapping (the Hydra
config passes ``${labels}`` and it is turned into a LabelSet here).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from crc_lightning.cropstore.format import GENES, INDEX_FILE
from crc_lightning.cropstore.reader import CropStore
from crc_lightning.data.augment import ClassifierAugment, Normalize
from crc_lightning.data.balance import lesion_weights, median_balance
from crc_lightning.data.images import StoreImages, check_cache_mode
from crc_lightning.data.inputs import crops_to_tensor
from crc_lightning.data.labels import LabelSet
from crc_lightning.data.splits import Split, gene_matrix, split_for
from crc_lightning.io.errors import InputError

__all__ = [
    "SAMPLING",
    "CropDataModule",
    "clear_cache",
    "labelled_rows",
    "lesion_keys",
    "load_images",
    "store_images",
]

log = logging.getLogger(__name__)

_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_CACHE_SIZE = 2  # (store, res, window) entries kept; a run uses one
SAMPLING = ("image", "lesion")  # datamodule.sampling


def lesion_keys(frame: pd.DataFrame) -> np.ndarray:
    """One id per crop row naming its lesion: ``<patient_id>/<lesion>``."""
    return (frame["patient_id"].astype(str) + "/" + frame["lesion"].astype(str)).to_numpy()


def clear_cache() -> None:
    """Forget the pre-loaded crop tensors (tests; or to free memory between runs)."""
    _CACHE.clear()


def _cache_key(store: CropStore, res: int, width: float, level: float) -> tuple:
    stat = (store.path / INDEX_FILE).stat()
    return (
        str(store.path.resolve()),
        stat.st_mtime_ns,
        stat.st_size,
        int(res),
        float(width),
        float(level),
    )


def load_images(store: CropStore, res: int, width: float, level: float) -> torch.Tensor:
    """Every crop of ``store`` (index order) → [N, 1, res, res] float32 in [0, 1]
    (:func:`~crc_lightning.data.inputs.crops_to_tensor`); cached."""
    key = _cache_key(store, res, width, level)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    ids = store.index["crop_id"].astype(str)
    out = crops_to_tensor((store.load(c) for c in ids), len(ids), res, width, level)
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def labelled_rows(
    store: CropStore, labels: LabelSet, exclude_patients: Iterable[str] = ()
) -> pd.DataFrame:
    """The crop rows a classifier job uses: the store index (column ``store_row`` added) with every
    gene of the label set and of the five-gene matrix present, ``exclude_patients`` dropped,
    ``patient_id`` as str. The run app splits exactly these rows' patients."""
    index_file = store.path / INDEX_FILE
    genes = list(dict.fromkeys([*labels.genes, *GENES]))
    missing = [g for g in (*genes, "patient_id", "crop_id") if g not in store.index.columns]
    if missing:
        raise InputError(
            index_file, f"crop index lacks columns {missing} needed by label set {labels.name!r}"
        )
    df = store.index.reset_index(drop=True).copy()
    df.insert(0, "store_row", np.arange(len(df), dtype=np.int64))
    labelled = df[genes].notna().all(axis=1)
    if not labelled.any():
        raise InputError(
            store.path,
            "the crop store has no gene labels (an unlabelled / OOD source?); the classifier "
            "needs a labelled cohort, e.g. `data=synthetic` or `data=manifest`",
        )
    if (~labelled).any():
        log.info("dropping %d unlabelled crops of %d", int((~labelled).sum()), len(df))
    df = df[labelled]
    exclude = {str(p) for p in exclude_patients}
    if exclude:
        df = df[~df["patient_id"].astype(str).isin(exclude)]
        if df.empty:
            raise InputError(store.path, "every labelled patient is in exclude_patients")
    df = df.reset_index(drop=True)
    df["patient_id"] = df["patient_id"].astype(str)
    return df


def store_images(store: CropStore, res: int, width: float, level: float) -> StoreImages:
    """Every crop of ``store`` (index order) as a lazily read ``[N, 1, res, res]`` sequence: item
    ``i`` equals ``load_images(store, res, width, level)[i]``."""
    files = [str(store.path / f) for f in store.index["case_file"].astype(str)]
    return StoreImages(files, store.index["key"].astype(str).tolist(), res, (width, level))


class _CropDataset(Dataset):
    """Rows ``sample`` of one stage (repeats allowed) over the shared images of the store
    (the pre-loaded tensor, or :class:`StoreImages` reading them on demand)."""

    def __init__(
        self,
        images: torch.Tensor | StoreImages,
        store_rows: np.ndarray,
        targets: np.ndarray,
        sample: np.ndarray,
    ) -> None:
        self.images = images
        # torch.tensor copies: pandas' copy-on-write hands out read-only arrays
        self.store_rows = torch.tensor(np.asarray(store_rows, dtype=np.int64))
        self.targets = torch.tensor(np.asarray(targets, dtype=np.float32))
        self.sample = torch.tensor(np.asarray(sample, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.sample)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.sample[i]
        return {
            "image": self.images[int(self.store_rows[row])],
            "target": self.targets[row],
            "index": row,
        }


class CropDataModule(pl.LightningDataModule):
    """Train/val/test loaders of a labelled crop store, split by patient (see module docstring).

    ``split``: a :class:`~crc_lightning.data.splits.Split` (the run app passes each fold's), or
    the config ``mode`` (holdout | kfold | cv: fold ``fold`` of the partition), ``test_size``,
    ``val_size``, ``n_splits``, ``fold``, ``repeat`` (``conf/split/*.yaml``). ``window`` (``width``, ``level``) and ``normalize``
    (``mean``, ``std``): the ``input`` config node. ``augment``: :class:`ClassifierAugment` keys.
    ``cache``: ``lazy`` (read crops when batched) | ``memory`` (pre-load them; module docstring).
    ``sampling``: ``image`` (paper: each balanced image once per epoch) | ``lesion`` (each lesion
    of a sampling group equally often, module docstring).
    """

    def __init__(
        self,
        store_dir: str | Path,
        labels: LabelSet | Mapping[str, Any],
        res: int,
        window: Mapping[str, float],
        normalize: Mapping[str, float],
        batch_size: int = 16,
        num_workers: int = 0,
        split: Mapping[str, Any] | Split | None = None,
        seed: int = 0,
        balance: bool = True,
        augment: Mapping[str, Any] | None = None,
        exclude_patients: Iterable[str] = (),
        pin_memory: bool = False,
        cache: str = "lazy",
        sampling: str = "image",
    ) -> None:
        super().__init__()
        self.cache = check_cache_mode(cache)
        if sampling not in SAMPLING:
            raise ValueError(f"datamodule.sampling={sampling!r}: choose one of {SAMPLING}")
        self.sampling = str(sampling)
        self.store_dir = Path(store_dir)
        self.labels = labels if isinstance(labels, LabelSet) else LabelSet.from_config(labels)
        self.res = int(res)
        self.window_width, self.window_level = float(window["width"]), float(window["level"])
        if self.window_width <= 0:
            raise ValueError(f"input.window.width must be > 0, got {self.window_width}")
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.given_split = split if isinstance(split, Split) else None
        self.split_cfg = (
            {} if self.given_split else dict(split) if split is not None else {"mode": "holdout"}
        )
        self.seed, self.balance = int(seed), bool(balance)
        self.augment_cfg = dict(augment) if augment is not None else {}
        self.exclude_patients = tuple(str(p) for p in exclude_patients)
        self.pin_memory = bool(pin_memory)
        self.augment = ClassifierAugment(self.res, self.augment_cfg, normalize)
        self.normalize = Normalize.from_config(normalize)
        self.split: Split | None = None
        self.train_index = self.val_index = self.test_index = pd.DataFrame()
        self.train_sample = np.zeros(0, dtype=np.int64)
        # sampling=lesion: expected draws per epoch of every training row (they sum to the epoch)
        self.train_weights: np.ndarray | None = None
        self._datasets: dict[str, _CropDataset] = {}

    # ------------------------------------------------------------------ properties
    @property
    def class_names(self) -> list[str]:
        return list(self.labels.classes)

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    # ------------------------------------------------------------------ setup
    def _labelled_index(self, store: CropStore) -> tuple[pd.DataFrame, np.ndarray]:
        """:func:`labelled_rows` of the store + their class matrix."""
        df = labelled_rows(store, self.labels, self.exclude_patients)
        y = self.labels.encode(df[list(self.labels.genes)].astype(np.int64))
        return df, y

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        store = CropStore(self.store_dir)
        df, y = self._labelled_index(store)
        if self.given_split is not None:
            split = self.given_split
        else:
            try:
                split = split_for(self.split_cfg, gene_matrix(df), self.seed)
            except ValueError as e:
                raise InputError(store.path, f"cannot split its patients: {e}") from e

        read = load_images if self.cache == "memory" else store_images
        images = read(store, self.res, self.window_width, self.window_level)
        side = split.side_of(df["patient_id"].to_numpy())
        if (side == "").any():
            log.info("%d labelled crop(s) of patients in no side of the split", (side == "").sum())
        frames: dict[str, pd.DataFrame] = {}
        for name in ("train", "val", "test"):
            rows = np.flatnonzero(side == name)
            frame = df.iloc[rows].reset_index(drop=True)
            frames[name] = frame
            targets = y[rows]
            if name == "train" and self.sampling == "lesion":
                self.train_weights = lesion_weights(targets, lesion_keys(frame), self.balance)
                sample = np.arange(len(rows), dtype=np.int64)
                self.train_sample = sample
            elif name == "train" and self.balance:
                rng = np.random.default_rng([self.seed, 0xBA1])
                sample = median_balance(targets, rng)
                self.train_sample = sample
            else:
                sample = np.arange(len(rows), dtype=np.int64)
            self._datasets[name] = _CropDataset(
                images, frame["store_row"].to_numpy(), targets, sample
            )
        if not self.balance and self.sampling == "image":
            self.train_sample = np.arange(len(frames["train"]), dtype=np.int64)
        self.train_index, self.val_index, self.test_index = (
            frames["train"],
            frames["val"],
            frames["test"],
        )
        self.split = split
        log.info(
            "split %s: %d/%d/%d patients, %d/%d/%d crops (train: %d draws an epoch, %s sampling)",
            split.mode,
            len(split.train),
            len(split.val),
            len(split.test),
            len(frames["train"]),
            len(frames["val"]),
            len(frames["test"]),
            self.train_epoch_length,
            self.sampling,
        )

    @property
    def train_epoch_length(self) -> int:
        """Training samples drawn per epoch: the balanced set's size (either sampling)."""
        if self.train_weights is not None:
            return round(float(self.train_weights.sum()))
        return len(self.train_sample)

    def split_summary(self) -> dict[str, Any]:
        """The ``split`` block of ``metrics.json`` (counts only, no patient ids)."""
        if self.split is None:
            raise RuntimeError("call setup() first")
        return self.split.summary()

    # ------------------------------------------------------------------ loaders
    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self._datasets:
            raise RuntimeError("call setup() before asking for a dataloader")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        dataset = self._datasets[name]
        sampler, n = None, len(dataset)
        if name == "train" and self.train_weights is not None:
            n = self.train_epoch_length
            sampler = WeightedRandomSampler(
                torch.as_tensor(self.train_weights, dtype=torch.double),
                num_samples=n,
                replacement=True,
                generator=generator,
            )
            shuffle = False  # the sampler draws the epoch (DDP: Lightning shards it per rank)
        # A training batch of one sample breaks BatchNorm (EfficientNet's squeeze-excite sees 1×1
        # maps): drop the ragged last training batch only when it would hold a single sample, so
        # small training sets keep every sample otherwise.
        drop_last = name == "train" and n > self.batch_size and n % self.batch_size == 1
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=None if sampler is not None else generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # ------------------------------------------------------------------ device transforms
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        training = trainer is not None and bool(trainer.training)
        batch = dict(batch)
        batch["image"] = (
            self.augment(batch["image"]) if training else self.normalize(batch["image"])
        )
        return batch
