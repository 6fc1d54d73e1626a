"""Self-supervised (SimCLR) data: OOD crop stores → pairs of augmented views (Perlo et al., Sec. IV.B).

The paper joins the crops of IRCADb and LiTS17 (preprocessed with the same Algorithm 1) into one
unlabelled "OOD" pool. :class:`SSLDataModule` does that over any number of crop stores:

* labels are ignored; ``exclude_patients`` (every store) and ``exclude_by_store`` (one store) drop
  patients that must never be seen — the target cohort's *test* patients when the target store is
  part of the OOD pool (:func:`target_test_patients` computes them with the classifier's split code);
* identical crops (same int16 HU content and shape) are kept once across all stores; the number
  dropped is reported (``n_duplicates``): LiTS and IRCADb share scans;
* crops stay in **HU** (resized to ``res``, float32): the intensity augmentation is a random CT
  *window* per sample, so windowing happens inside :class:`SSLAugment`, after the geometric
  transforms, on the device. ``cache=lazy`` (default) reads each crop from its case file when a
  batch needs it (:class:`~crc_lightning.data.images.StoreImages`: memory flat in the pool size);
  ``cache=memory`` pre-loads the pool as one tensor. Same values either way; the duplicate check
  reads every crop once in both (streaming, nothing kept but a digest).

:class:`SSLAugment` is batched (``kornia.augmentation`` + torch) with per-sample parameters: rotation
(reflection padding: a rotated lesion crop's corners look like its surroundings, not like air or
water), flips, random resized crop, window level/width jitter (gray CT's "colour distortion"),
Gaussian blur and Gaussian noise. ``positives="slices"`` takes the second view from a neighbouring
slice (|Δslice| ≤ ``max_slice_gap``) of the same lesion (Azizi et al. 2021, multi-instance positives).
The datamodule then normalises the views like the classifier's input
(:func:`crc_lightning.data.augment.normalize`), so the backbone sees one input distribution.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from crc_lightning.cropstore.format import store_hash
from crc_lightning.cropstore.reader import CropStore
from crc_lightning.data.augment import normalize
from crc_lightning.data.images import StoreImages, check_cache_mode
from crc_lightning.data.inputs import resize_square
from crc_lightning.io.errors import InputError

__all__ = [
    "AUGMENT_DEFAULTS",
    "OODPool",
    "SSLAugment",
    "SSLDataModule",
    "affine_grid",
    "load_ood_pool",
    "resolve_ood_sources",
    "target_test_patients",
]

log = logging.getLogger(__name__)

AUGMENT_DEFAULTS: dict[str, Any] = {
    # the window jitter is centred on the classifier's window (``window`` = the input.window node)
    "level_jitter": 20.0,  # level ± this many HU, per sample
    "width_scale": (0.8, 1.25),  # width × log-uniform factor in this range, per sample
    "rotation_degrees": 180.0,  # lesions have no canonical in-plane orientation
    "hflip_p": 0.5,
    "vflip_p": 0.5,
    "crop_scale": (0.3, 1.0),  # RandomResizedCrop area fraction (SimCLR's key augmentation)
    "crop_ratio": (0.75, 4.0 / 3.0),
    "blur_p": 0.5,
    "blur_sigma": (0.1, 1.5),  # pixels at the model resolution
    "blur_kernel": 0,  # odd kernel size; 0 = auto (≈ 10 % of res, at least 3)
    "noise_p": 0.5,
    "noise_std": 0.03,  # max std of additive noise in [0, 1] grey units; per sample U(0, max)
}
POSITIVES = ("augment", "slices")


# ------------------------------------------------------------------------------ sources
def resolve_ood_sources(
    sources: Mapping[str, Any] | Sequence[str],
    data_dir: str | Path | None = None,
    allow_empty: bool = False,
) -> dict[str, Path]:
    """``{name: store folder}`` from the ``ood.sources`` mapping or a list of data names / folders.

    A list item with a path separator (or naming an existing folder) is a store folder; any other
    item is a data name resolved to ``<data_dir>/crops/<name>``, as ``data.store`` does.
    """
    out: dict[str, Path] = {}
    if isinstance(sources, Mapping):
        out = {str(k): Path(str(v)).expanduser() for k, v in sources.items() if v is not None}
    else:
        for item in sources:
            s = str(item)
            if "/" in s or Path(s).expanduser().is_dir():
                out[Path(s).name] = Path(s).expanduser()
            elif data_dir is None:
                raise ValueError(f"OOD source {s!r} is a data name but no data_dir was given")
            else:
                out[s] = Path(str(data_dir)) / "crops" / s
    if not out and not allow_empty:
        raise InputError(None, "no OOD crop store given (ood.sources is empty)")
    return out


def target_test_patients(
    store_dir: str | Path,
    labels: Any,
    split: Mapping[str, Any],
    seeds: Iterable[int],
    exclude_patients: Iterable[str] = (),
) -> list[str]:
    """Every patient a ``run`` job on the target cohort tests, for each seed in ``seeds`` (sorted
    union over seeds and folds).

    The run app's own rows and split function (:func:`~crc_lightning.data.datamodule.labelled_rows`,
    :func:`~crc_lightning.data.splits.plan_folds`: labelled crops minus ``exclude_patients`` — the
    run's ``datamodule.exclude_patients`` —, stratified on the five-gene matrix, so any label set
    gives the same patients), with ``split`` = the run's ``split`` node. Under ``mode: cv`` every
    labelled patient is tested; under ``kfold`` every fold of the partition is counted (a sweep over
    ``split.fold`` tests them all), under ``holdout`` the 10 % of each seed. One SimCLR checkpoint
    serves every seed of a grid, so pass every seed you will evaluate.
    """
    from crc_lightning.data.datamodule import labelled_rows
    from crc_lightning.data.labels import LabelSet
    from crc_lightning.data.splits import gene_matrix, plan_folds

    labelset = labels if isinstance(labels, LabelSet) else LabelSet.from_config(labels)
    store = CropStore(store_dir)
    rows = labelled_rows(store, labelset, exclude_patients)
    patients = gene_matrix(rows)
    out: set[str] = set()
    for seed in seeds:
        plan = plan_folds(dict(split), patients, int(seed))
        out.update(str(p) for s in plan.partition for p in s.test)
    return sorted(out)


# ------------------------------------------------------------------------------ the pool
@dataclass
class OODPool:
    """The OOD crops: HU resized to ``res`` + who they are (labels dropped)."""

    images: torch.Tensor | StoreImages  # [N, 1, res, res] float32 HU (pre-loaded or read lazily)
    index: pd.DataFrame  # source, patient_id, lesion_uid, slice, crop_id (row i ↔ images[i])
    n_duplicates: int = 0
    n_excluded: int = 0
    stores: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → path, hash, n_crops

    def __len__(self) -> int:
        return len(self.index)

    def neighbours(self, max_gap: int) -> list[np.ndarray]:
        """For each crop, the rows of the *other* crops of its lesion with |Δslice| ≤ ``max_gap``."""
        out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(self.index)
        key = self.index["source"].astype(str) + "|" + self.index["lesion_uid"].astype(str)
        slices = self.index["slice"].to_numpy(dtype=np.int64)
        for rows in key.groupby(key).indices.values():
            rows = np.asarray(rows, dtype=np.int64)
            s = slices[rows]
            near = np.abs(s[:, None] - s[None, :]) <= int(max_gap)
            np.fill_diagonal(near, False)
            for i, r in enumerate(rows):
                out[r] = rows[near[i]]
        return out


def _crop_digest(hu: np.ndarray) -> str:
    a = np.ascontiguousarray(hu, dtype=np.int16)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def load_ood_pool(
    stores: Mapping[str, str | Path],
    res: int,
    exclude_patients: Iterable[str] = (),
    exclude_by_store: Mapping[str, Iterable[str]] | None = None,
    hints: Mapping[str, str] | None = None,
    cache: str = "memory",
) -> OODPool:
    """Read every store, drop excluded patients and duplicate crops, resize HU crops to ``res``
    (``cache=memory``: all now, into one tensor; ``lazy``: when indexed, :class:`StoreImages`)."""
    lazy = check_cache_mode(cache) == "lazy"
    exclude_all = {str(p) for p in exclude_patients}
    by_store = {str(k): {str(p) for p in v} for k, v in (exclude_by_store or {}).items()}
    hints = dict(hints or {})
    seen: set[str] = set()
    frames, tensors, files, keys = [], [], [], []
    n_dup = n_excl = 0
    facts: dict[str, dict[str, Any]] = {}
    for name, path in stores.items():
        path = Path(path)
        try:
            store = CropStore(path)
        except InputError as err:
            hint = hints.get(name)
            if hint:
                raise InputError(
                    path, f"no crop store for OOD source {name!r}; build it with `{hint}`"
                ) from err
            raise
        df = store.index.reset_index(drop=True)
        drop = df["patient_id"].astype(str).isin(exclude_all | by_store.get(name, set()))
        n_excl += int(drop.sum())
        keep_rows, imgs = [], []
        for row in np.flatnonzero(~drop.to_numpy()):
            hu = store.load(str(df["crop_id"].iat[row]))
            digest = _crop_digest(hu)
            if digest in seen:
                n_dup += 1
                continue
            seen.add(digest)
            keep_rows.append(row)
            if not lazy:
                imgs.append(torch.from_numpy(resize_square(hu.astype(np.float32), int(res))))
        kept = df.iloc[keep_rows]
        if lazy:
            files += [str(path / f) for f in kept["case_file"].astype(str)]
            keys += kept["key"].astype(str).tolist()
        frames.append(
            pd.DataFrame(
                {
                    "source": name,
                    "patient_id": kept["patient_id"].astype(str).to_numpy(),
                    "lesion_uid": kept["lesion_uid"].astype(str).to_numpy(),
                    "slice": kept["slice"].to_numpy(dtype=np.int64),
                    "crop_id": kept["crop_id"].astype(str).to_numpy(),
                }
            )
        )
        if imgs:
            tensors.append(torch.stack(imgs)[:, None])
        facts[name] = {
            "path": str(path),
            "hash": store_hash(path),
            "version": store.meta.get("version"),
            "n_crops": len(keep_rows),
        }
    index = pd.concat(frames, ignore_index=True)
    if index.empty:
        raise InputError(None, f"the OOD stores {list(stores)} hold no usable crop after exclusion")
    log.info(
        "OOD pool: %d crops from %d store(s); %d duplicate and %d excluded crop(s) dropped",
        len(index),
        len(stores),
        n_dup,
        n_excl,
    )
    images = StoreImages(files, keys, int(res), None) if lazy else torch.cat(tensors)
    return OODPool(images, index, n_dup, n_excl, facts)


# ------------------------------------------------------------------------------ augmentation
def _aug_cfg(cfg: Mapping[str, Any] | None, window: Mapping[str, float]) -> dict[str, Any]:
    out = dict(AUGMENT_DEFAULTS)
    if cfg:
        unknown = set(cfg) - set(AUGMENT_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown ssl augment keys {sorted(unknown)}; known: {sorted(out)}")
        out.update({k: v for k, v in dict(cfg).items() if v is not None})
    out["level"], out["width"] = float(window["level"]), float(window["width"])
    if out["width"] <= 0 or min(out["width_scale"]) <= 0:
        raise ValueError("input.window.width and augment.width_scale must be > 0")
    return out


def affine_grid(mat: torch.Tensor, res: int) -> torch.Tensor:
    """``F.affine_grid(mat, [B, 1, res, res], align_corners=False)`` by broadcasting: the same
    sampling grid, 2.5× faster on CPU (the built-in runs a batched matmul with 3-wide matrices)."""
    u = (torch.arange(res, dtype=mat.dtype, device=mat.device) * 2 + 1) / res - 1
    m = mat[:, :, :, None, None]
    return torch.stack([m[:, i, 0] * u + m[:, i, 1] * u[:, None] + m[:, i, 2] for i in (0, 1)], -1)


class SSLAugment(nn.Module):
    """Two augmented views of a batch of HU crops → ``([B,1,res,res], [B,1,res,res])`` in [0, 1].

    Every parameter is drawn per sample (torch draws of shape [B]); the last draws are kept in
    ``last_params`` (``level``, ``width``, ``blur_sigma`` (0 = not blurred), ``noise_std``: [2, B],
    one row per view) for audits and tests.
    """

    def __init__(
        self, res: int, cfg: Mapping[str, Any] | None, window: Mapping[str, float]
    ) -> None:
        super().__init__()
        c = _aug_cfg(cfg, window)
        self.res, self.cfg = int(res), c
        self.kernel = int(c["blur_kernel"]) or max(3, round(0.1 * self.res) | 1)
        if self.kernel % 2 == 0 or self.kernel // 2 >= self.res:
            raise ValueError(f"augment.blur_kernel must be odd and < 2·res, got {self.kernel}")
        self.last_params: dict[str, torch.Tensor] = {}

    def geometry(self, hu: torch.Tensor) -> torch.Tensor:
        """Rotation, flips and random resized crop as ONE per-sample affine warp (one
        ``grid_sample`` to ``res``, reflection padding): output point u ∈ [-1, 1]² reads input point
        ``R(θ) · diag(±w, ±h) · u + t``, with (w, h) the crop's half-extent from its area fraction and
        aspect ratio, and ``t`` a centre that keeps the crop inside the image."""
        c, n, dev = self.cfg, hu.shape[0], hu.device
        u = lambda: torch.rand(n, device=dev)  # noqa: E731
        a_lo, a_hi = (float(v) for v in c["crop_scale"])
        r_lo, r_hi = (math.log(float(v)) for v in c["crop_ratio"])
        area = a_lo + u() * (a_hi - a_lo)
        ratio = torch.exp(r_lo + u() * (r_hi - r_lo))
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        tx, ty = (2 * u() - 1) * (1 - w), (2 * u() - 1) * (1 - h)
        theta = (2 * u() - 1) * math.radians(float(c["rotation_degrees"]))
        fx = torch.where(u() < float(c["hflip_p"]), -1.0, 1.0)
        fy = torch.where(u() < float(c["vflip_p"]), -1.0, 1.0)
        cos, sin = torch.cos(theta), torch.sin(theta)
        mat = torch.stack(
            [
                torch.stack([cos * w * fx, -sin * h * fy, tx], 1),
                torch.stack([sin * w * fx, cos * h * fy, ty], 1),
            ],
            1,
        ).to(hu.dtype)
        grid = affine_grid(mat, self.res)
        return F.grid_sample(
            hu, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    def blur(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian blur with a per-sample σ (``blur_p`` of the samples; σ = 0 marks the others).

        Same result as ``kornia.filters.gaussian_blur2d(..., border_type="reflect")`` with a [B]
        sigma, but 7× faster on CPU: each sample's separable kernel, reflection included, is a
        banded [res, res] matrix ``A`` and the blur is one batched ``A · x · Aᵀ``."""
        n, res, k, dev = x.shape[0], x.shape[-1], self.kernel, x.device
        lo, hi = (float(v) for v in self.cfg["blur_sigma"])
        on = torch.rand(n, device=dev) < float(self.cfg["blur_p"])
        sigma = (lo + torch.rand(n, device=dev) * (hi - lo)) * on
        r = torch.arange(k, device=dev) - k // 2
        ker = torch.exp(-(r.to(x.dtype) ** 2) / (2 * sigma.clamp(min=1e-6)[:, None] ** 2))
        ker = torch.where(on[:, None], ker / ker.sum(1, keepdim=True), (r == 0).to(x.dtype))
        src = (torch.arange(res, device=dev)[:, None] + r).abs()  # reflect, edge not repeated
        src = torch.where(src > res - 1, 2 * (res - 1) - src, src)
        a = torch.zeros(n, res, res, dtype=x.dtype, device=dev)
        a.scatter_add_(2, src.expand(n, res, k), ker[:, None, :].expand(n, res, k).contiguous())
        return (a @ x[:, 0] @ a.transpose(1, 2))[:, None], sigma

    def window_params(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (level, width): level ± ``level_jitter`` HU, width × log-uniform scale."""
        c = self.cfg
        jitter = (torch.rand(n, device=device) * 2 - 1) * float(c["level_jitter"])
        level = float(c["level"]) + jitter
        lo, hi = (math.log(float(s)) for s in c["width_scale"])
        width = float(c["width"]) * torch.exp(lo + torch.rand(n, device=device) * (hi - lo))
        return level, width

    def view(self, hu: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One view: geometry in HU → random window to [0, 1] → blur → noise."""
        n = hu.shape[0]
        x = self.geometry(hu)
        level, width = self.window_params(n, hu.device)
        lo = (level - width / 2)[:, None, None, None]
        x = x.sub_(lo).div_(width[:, None, None, None]).clamp_(0.0, 1.0)
        x, sigma = self.blur(x)
        on = torch.rand(n, device=hu.device) < float(self.cfg["noise_p"])
        std = torch.rand(n, device=hu.device) * float(self.cfg["noise_std"]) * on
        if bool(on.any()):  # noise drawn only for the samples that get it
            x[on] += torch.randn_like(x[on]) * std[on, None, None, None]
        params = {"level": level, "width": width, "blur_sigma": sigma, "noise_std": std}
        return x.clamp_(0.0, 1.0), params

    def forward(
        self, hu: torch.Tensor, hu2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if hu.ndim != 4 or hu.shape[1] != 1:
            raise ValueError(f"SSLAugment expects [B, 1, H, W] HU crops, got {tuple(hu.shape)}")
        v0, p0 = self.view(hu)
        v1, p1 = self.view(hu if hu2 is None else hu2)
        self.last_params = {k: torch.stack([p0[k], p1[k]]) for k in p0}
        return v0, v1


# ------------------------------------------------------------------------------ datamodule
class _PairDataset(Dataset):
    """Crop ``i`` (HU) and, with ``neighbours``, a random neighbouring slice of its lesion."""

    def __init__(
        self, images: torch.Tensor | StoreImages, neighbours: list[np.ndarray] | None
    ) -> None:
        self.images = images
        self.neighbours = neighbours

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"hu": self.images[i], "index": torch.tensor(i)}
        if self.neighbours is not None:
            near = self.neighbours[i]
            j = int(near[int(torch.randint(len(near), ()))]) if len(near) else i
            item["hu2"] = self.images[j]
        return item


class SSLDataModule(pl.LightningDataModule):
    """Unlabelled OOD crop stores → training batches of two augmented, normalised views.

    ``stores``: ``{name: folder}`` (:func:`resolve_ood_sources`); ``window`` / ``normalize``: the
    ``input`` config node (the jitter's centre, the classifier's normalisation); ``cache``: ``lazy``
    (read crops when batched) | ``memory`` (pre-load the pool). After the device transfer a
    training batch is ``{"view0", "view1": [B,1,res,res] normalised, "index": [B]}``.
    """

    def __init__(
        self,
        stores: Mapping[str, str | Path],
        res: int,
        window: Mapping[str, float],
        normalize: Mapping[str, float],
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        exclude_patients: Iterable[str] = (),
        exclude_by_store: Mapping[str, Iterable[str]] | None = None,
        positives: str = "augment",
        max_slice_gap: int = 2,
        augment: Mapping[str, Any] | None = None,
        hints: Mapping[str, str] | None = None,
        pin_memory: bool = False,
        cache: str = "lazy",
    ) -> None:
        super().__init__()
        self.cache = check_cache_mode(cache)
        if positives not in POSITIVES:
            raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
        self.stores = {str(k): Path(v) for k, v in stores.items()}
        self.res, self.batch_size = int(res), int(batch_size)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.exclude_patients = tuple(str(p) for p in exclude_patients)
        self.exclude_by_store = {str(k): list(v) for k, v in (exclude_by_store or {}).items()}
        self.positives, self.max_slice_gap = positives, int(max_slice_gap)
        self.augment = SSLAugment(self.res, augment, window)
        self.mean, self.std = float(normalize["mean"]), float(normalize["std"])
        self.hints = dict(hints or {})
        self.pin_memory = bool(pin_memory)
        self.pool: OODPool | None = None
        self._dataset: _PairDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.pool is not None:
            return
        pool = load_ood_pool(
            self.stores, self.res, self.exclude_patients, self.exclude_by_store, self.hints,
            cache=self.cache,
        )  # fmt: skip
        if len(pool) < self.batch_size:
            raise InputError(
                None,
                f"the OOD pool has {len(pool)} crops, fewer than batch_size={self.batch_size} "
                "(drop_last=True would give no batch): lower batch_size or add stores",
            )
        neighbours = pool.neighbours(self.max_slice_gap) if self.positives == "slices" else None
        self.pool, self._dataset = pool, _PairDataset(pool.images, neighbours)

    def summary(self) -> dict[str, Any]:
        """Counts and store ids for the checkpoint metadata (no patient ids, no paths)."""
        if self.pool is None:
            raise RuntimeError("call setup() first")
        stores = {
            k: {"hash": v["hash"], "n_crops": v["n_crops"], "version": v["version"]}
            for k, v in self.pool.stores.items()
        }
        return {
            "n_crops": len(self.pool),
            "n_duplicates": self.pool.n_duplicates,
            "n_excluded": self.pool.n_excluded,
            "stores": stores,
            "positives": self.positives,
        }

    def train_dataloader(self) -> DataLoader:
        if self._dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return DataLoader(
            self._dataset,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=True,  # NT-Xent wants full batches; a batch of one also breaks BatchNorm
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: two augmented views per crop, normalised like the classifier's input."""
        v0, v1 = self.augment(batch["hu"], batch.get("hu2"))
        return {
            "view0": normalize(v0, self.mean, self.std),
            "view1": normalize(v1, self.mean, self.std),
            "index": batch["index"],
        }
