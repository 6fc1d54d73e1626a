"""The mutation classifier (Perlo et al. 2024, Sec. IV.C–V): EfficientNet-B0 → [SA] → dropout → FC.

Multi-label: one sigmoid per class and ``BCEWithLogitsLoss``, because a lesion can carry several
mutations. The four paper variants differ only in where the backbone starts (ImageNet or the SimCLR
checkpoint of ``python -m crc_lightning.pretrain``) and whether the self-attention block (multi-head
attention + ReLU over the spatial tokens) sits before the FC layer; see ``conf/variant/``.

Optimizer and scheduler come from the config as partials (``_partial_: true``) so they are swapped
without code. Two recipe knobs sit beside them (paper values = off): ``label_smoothing`` ε turns the
*training* BCE targets into ``y (1 - ε) + ε / 2`` (validation and test losses keep the hard targets,
so ``val/loss`` — early stopping, the best checkpoint — is the same quantity whatever ε), and
``lr_schedule`` ``{name: constant | cosine, warmup_epochs, warmup_start_factor, min_lr_factor}``:
``cosine`` is torch's ``LinearLR`` warmup then ``CosineAnnealingLR`` down to ``lr · min_lr_factor``
(``SequentialLR``), stepped every optimizer step over the trainer's ``estimated_stepping_batches``. The checkpoint is self-describing: class names, label set, resolution, CT window,
preprocessing parameters, variant and weight provenance are in its hyper-parameters, and
:func:`crc_lightning.models.checkpoint.load_model` rebuilds the model from them (weights-only,
strict) without needing the ImageNet/SimCLR file that training started from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from crc_lightning.io.files import sha256_file
from crc_lightning.models.attention import make_pool
from crc_lightning.models.backbone import (
    WeightsInfo,
    WeightsNotFoundError,
    create_backbone,
    feature_dim,
)
from crc_lightning.models.simclr import load_simclr_weights, pretrain_command, simclr_weights_name

log = logging.getLogger(__name__)

__all__ = [
    "LR_SCHEDULES",
    "DefinedClassAUROC",
    "MutationClassifier",
    "load_simclr_into",
    "require_simclr_file",
    "simclr_file",
]


LR_SCHEDULES = ("constant", "cosine")
_LR_SCHEDULE_DEFAULTS = {
    "name": "constant",
    "warmup_epochs": 0.0,
    "warmup_start_factor": 0.01,
    "min_lr_factor": 0.0,
}


def smooth_targets(target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Binary label smoothing: ``y (1 - ε) + ε / 2`` (1 → 1 - ε/2, 0 → ε/2)."""
    return target * (1.0 - smoothing) + 0.5 * smoothing


def check_lr_schedule(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``model.lr_schedule`` node with its defaults, checked (ValueError naming the key)."""
    out = dict(_LR_SCHEDULE_DEFAULTS)
    given = dict(_plain(schedule) or {})
    unknown = set(given) - set(out)
    if unknown:
        raise ValueError(f"model.lr_schedule: unknown keys {sorted(unknown)}; known: {sorted(out)}")
    out.update({k: v for k, v in given.items() if v is not None})
    if out["name"] not in LR_SCHEDULES:
        raise ValueError(f"model.lr_schedule.name={out['name']!r}: choose one of {LR_SCHEDULES}")
    if float(out["warmup_epochs"]) < 0:
        raise ValueError(
            f"model.lr_schedule.warmup_epochs must be >= 0, got {out['warmup_epochs']}"
        )
    if not 0 < float(out["warmup_start_factor"]) <= 1:
        raise ValueError("model.lr_schedule.warmup_start_factor must be in (0, 1]")
    if not 0 <= float(out["min_lr_factor"]) <= 1:
        raise ValueError("model.lr_schedule.min_lr_factor must be in [0, 1]")
    return out


class DefinedClassAUROC(Metric):
    """Support-weighted mean one-vs-rest AUROC over the classes that have a positive *and* a
    negative among the samples seen (NaN when none has): ``val/auc`` and ``test/auc``.

    Why not ``MultilabelAUROC(average="weighted")``: it scores a class without negatives (or
    positives) 0 and keeps it in the mean, so a small validation fold in which every patient is,
    say, RAS-negative drags the selection metric down for nothing the model did. Same convention
    as ``evaluation/metrics.py`` and sklearn's ``roc_auc_score(average="weighted")`` on the
    defined columns. Predictions and targets are concatenated across ranks (DDP) before computing.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_labels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_labels = int(num_labels)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds.detach().float())
        self.target.append(target.detach().long())

    def compute(self) -> torch.Tensor:
        # a list before DDP synchronisation; one concatenated tensor after it (dist_reduce_fx=cat)
        if isinstance(self.preds, list) and not self.preds:
            return torch.tensor(float("nan"))
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        support = target.sum(dim=0)
        defined = (support > 0) & (support < target.shape[0])
        if not bool(defined.any()):
            return torch.tensor(float("nan"), device=preds.device)
        aucs = torch.stack(
            [
                binary_auroc(preds[:, c], target[:, c])
                for c in torch.nonzero(defined).flatten().tolist()
            ]
        )
        weights = support[defined].to(aucs.dtype)
        return (aucs * weights).sum() / weights.sum()


def _plain(value: Any) -> Any:
    """DictConfig/ListConfig → plain containers (checkpoints must load with ``weights_only``-safe data)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def simclr_file(
    weights_file: str | Path | None, weights_dir: str | Path | None, res: int, attention: bool
) -> Path | None:
    """The SimCLR checkpoint a classifier loads: ``weights_file`` if given, else
    ``<weights_dir>/simclr_res<res>[_sa].ckpt`` (what ``python -m crc_lightning.pretrain`` writes)."""
    if weights_file:
        return Path(weights_file).expanduser()
    if weights_dir:
        return Path(weights_dir).expanduser() / simclr_weights_name(res, attention)
    return None


def require_simclr_file(path: Path | None, res: int, attention: bool) -> Path:
    """``path`` if it is a file, else :class:`WeightsNotFoundError` naming the command that makes it
    (also the apps' check before any work: ``run -m variant=oodp_sa …`` on a fresh checkout)."""
    if path is None or not path.is_file():
        raise WeightsNotFoundError(
            f"model.backbone.weights=simclr needs a SimCLR checkpoint, but {path} does not exist. "
            f"Make it with `{pretrain_command(res, attention)}`, or pass "
            "model.backbone.weights_file=/path/to/simclr.ckpt, or use variant=baseline."
        )
    return path


def load_simclr_into(
    backbone: nn.Module, pool: nn.Module, path: Path | None, res: int, attention: bool
) -> WeightsInfo:
    """Load the SimCLR checkpoint into ``backbone`` (and the SA ``pool``); never falls back silently.

    A missing checkpoint raises :class:`WeightsNotFoundError` naming the
    command that makes the checkpoint.
    """
    path = require_simclr_file(path, res, attention)
    bb_state, pool_state, _meta = load_simclr_weights(path, res, attention)
    backbone.load_state_dict(bb_state, strict=True)
    if attention:
        if pool_state:
            pool.load_state_dict(pool_state, strict=True)
        else:
            log.warning(
                "SimCLR checkpoint %s holds no attention block: SA starts random", path.name
            )
    return WeightsInfo("simclr", str(path), sha256_file(path))


class MutationClassifier(L.LightningModule):
    """Backbone → pool (global average, or spatial self-attention + ReLU) → dropout → FC (C logits).

    ``backbone``: ``{name, weights: imagenet|simclr|none, weights_file, imagenet_file, weights_dir,
    drop_path_rate}``. ``weights_file`` is the file of the chosen init; when null, ImageNet weights
    come from ``imagenet_file`` or the timm/HF cache, SimCLR weights from ``weights_dir`` by name.
    ``meta``: facts about the data the model was trained on (res, label set, window, preprocessing
    parameters, variant, ...), stored in the checkpoint for the predict app.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        backbone: Mapping[str, Any] | None = None,
        in_chans: int = 1,
        attention: bool = False,
        num_heads: int = 8,
        attention_dropout: float = 0.0,
        dropout: float = 0.2,
        res: int = 64,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_monitor: str = "val/loss",
        label_smoothing: float = 0.0,
        lr_schedule: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        weights_info: Mapping[str, Any] | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        bb = dict(_plain(backbone) or {})
        bb.setdefault("name", "efficientnet_b0")
        bb.setdefault("weights", "imagenet")
        bb.setdefault("weights_file", None)
        bb.setdefault("imagenet_file", None)
        bb.setdefault("weights_dir", None)
        bb.setdefault("drop_path_rate", 0.0)
        class_names = [str(c) for c in class_names]
        if not class_names:
            raise ValueError("class_names is empty")
        self._optimizer_factory = optimizer
        self._scheduler_factory = scheduler
        self.scheduler_monitor = scheduler_monitor
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.lr_schedule = check_lr_schedule(lr_schedule)
        if self.lr_schedule["name"] != "constant" and scheduler is not None:
            raise ValueError(
                "model.scheduler and model.lr_schedule.name="
                f"{self.lr_schedule['name']} both set: keep one (model.scheduler=null)"
            )

        weights = str(bb["weights"]) if init_weights else "none"
        self.backbone, info = create_backbone(
            name=str(bb["name"]),
            in_chans=int(in_chans),
            weights="none" if weights == "simclr" else weights,
            weights_file=(bb["weights_file"] or bb["imagenet_file"])
            if weights == "imagenet"
            else None,
            drop_path_rate=float(bb["drop_path_rate"]),
        )
        dim = feature_dim(self.backbone)
        self.pool = make_pool(dim, bool(attention), int(num_heads), float(attention_dropout))
        if weights == "simclr":
            path = simclr_file(bb["weights_file"], bb["weights_dir"], int(res), bool(attention))
            info = load_simclr_into(self.backbone, self.pool, path, int(res), bool(attention))
        self.dropout = nn.Dropout(float(dropout))
        self.fc = nn.Linear(dim, len(class_names))
        self.criterion = nn.BCEWithLogitsLoss()
        n = len(class_names)
        self.val_auc = DefinedClassAUROC(n)
        self.test_auc = DefinedClassAUROC(n)
        # the last validation / test epoch's probabilities, gathered over ranks (run app)
        self.val_outputs: dict[str, torch.Tensor] = {}
        self.test_outputs: dict[str, torch.Tensor] = {}
        self._stage_outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
            "val": [],
            "test": [],
        }

        provenance = dict(weights_info) if not init_weights and weights_info else info.as_dict()
        self.save_hyperparameters(
            {
                "class_names": class_names,
                "backbone": bb,
                "in_chans": int(in_chans),
                "attention": bool(attention),
                "num_heads": int(num_heads),
                "attention_dropout": float(attention_dropout),
                "dropout": float(dropout),
                "res": int(res),
                "scheduler_monitor": scheduler_monitor,
                "label_smoothing": self.label_smoothing,
                "lr_schedule": self.lr_schedule,
                "meta": _plain(dict(meta or {})),
                "weights_info": provenance,
            }
        )

    # ---- model -------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.hparams["class_names"])

    @property
    def weights_info(self) -> dict[str, Any]:
        return dict(self.hparams["weights_info"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` → pooled ``[B, C_feat]``."""
        return self.pool(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.fc(self.dropout(self.features(x)))

    def _step(
        self, batch: Mapping[str, torch.Tensor], smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        target = batch["target"].to(logits.dtype)
        if smoothing:
            target = smooth_targets(target, smoothing)
        loss = self.criterion(logits, target)
        return loss, logits

    # ---- loops -------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self._step(batch, self.label_smoothing)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=logits.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._stage_outputs["val"] = []

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._step(batch)
        bs = logits.shape[0]
        prob = torch.sigmoid(logits)
        self.val_auc.update(prob, batch["target"].long())
        self.log("val/loss", loss, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log("val/auc", self.val_auc, on_step=False, on_epoch=True, batch_size=bs)
        self._stage_outputs["val"].append((batch["index"].detach(), prob.detach(), batch["target"]))

    def on_validation_epoch_end(self) -> None:
        """Keep this epoch's validation probabilities (all ranks) in ``self.val_outputs``: after
        ``trainer.validate(ckpt_path=best)`` they are the best epoch's (``val_predictions.csv``)."""
        self.val_outputs = self._gather("val")

    def on_test_epoch_start(self) -> None:
        self._stage_outputs["test"] = []
        self.test_outputs = {}

    def test_step(
        self, batch: Mapping[str, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        loss, logits = self._step(batch)
        prob = torch.sigmoid(logits)
        bs = logits.shape[0]
        self.test_auc.update(prob, batch["target"].long())
        self.log("test/loss", loss, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log("test/auc", self.test_auc, on_step=False, on_epoch=True, batch_size=bs)
        out = {"index": batch["index"], "prob": prob, "target": batch["target"]}
        self._stage_outputs["test"].append(tuple(t.detach() for t in out.values()))  # type: ignore[arg-type]
        return out

    def on_test_epoch_end(self) -> None:
        """Collect this epoch's test probabilities (all ranks) into ``self.test_outputs``."""
        self.test_outputs = self._gather("test")

    def _gather(self, stage: str) -> dict[str, torch.Tensor]:
        """``{"index", "prob", "target"}`` of the stage's buffered batches, over every rank."""
        parts, self._stage_outputs[stage] = self._stage_outputs[stage], []
        if not parts:
            return {}
        index, prob, target = (torch.cat(p) for p in zip(*parts))
        if self.trainer.world_size > 1:
            index, prob, target = (self.all_gather(t).flatten(0, 1) for t in (index, prob, target))
        return {"index": index.cpu(), "prob": prob.float().cpu(), "target": target.cpu()}

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self._optimizer_factory is None:
            raise ValueError("model.optimizer is not set (expected a `_partial_: true` optimizer)")
        opt = self._optimizer_factory(params=self.parameters())
        if self.lr_schedule["name"] == "cosine":
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": self._cosine(opt), "interval": "step"},
            }
        if self._scheduler_factory is None:
            return opt
        sched = self._scheduler_factory(optimizer=opt)
        return {
            "optimizer": opt,
            "lr_scheduler": {
                "scheduler": sched,
                "monitor": self.scheduler_monitor,
                "interval": "epoch",
            },
        }

    def _cosine(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Linear warmup over ``warmup_epochs`` (from ``lr · warmup_start_factor``), then cosine
        annealing to ``lr · min_lr_factor`` at the last step (torch schedulers, per step)."""
        from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

        steps = float(self.trainer.estimated_stepping_batches)
        if not np.isfinite(steps) or steps <= 0:
            raise ValueError("lr_schedule=cosine needs a finite trainer.max_epochs or max_steps")
        total = int(steps)
        epochs = max(1, int(self.trainer.max_epochs or 1))
        warmup = min(round(float(self.lr_schedule["warmup_epochs"]) * total / epochs),
                     total - 1)  # fmt: skip
        eta_min = float(opt.param_groups[0]["lr"]) * float(self.lr_schedule["min_lr_factor"])
        cosine = CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=eta_min)
        if warmup == 0:
            return cosine
        start = float(self.lr_schedule["warmup_start_factor"])
        ramp = LinearLR(opt, start_factor=start, end_factor=1.0, total_iters=warmup)
        return SequentialLR(opt, [ramp, cosine], milestones=[warmup])
