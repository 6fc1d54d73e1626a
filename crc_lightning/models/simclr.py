"""SimCLR pretraining of the classifier's backbone on OOD liver CT (Perlo et al. 2024, Sec. IV.B, V).

``backbone.forward_features → pool → SimCLRProjectionHead → NT-Xent`` (lightly). The backbone comes
from the same factory as the classifier (:func:`create_backbone`), and the pool is the classifier's
(:func:`make_pool`): with ``attention=True`` the spatial self-attention block + ReLU sits before the
projection head, as the paper does for OODp+SA, so the classifier inherits a *trained* SA block.

Both views go through the network in one forward pass (``torch.cat``): one BatchNorm statistic over
the 2B images, half the kernel launches.

Hand-off to the classifier: :func:`export_simclr_weights` writes a plain dict —
``{"format": FORMAT, "state_dict": {"backbone.<k>": tensor, "pool.<k>": tensor}, "meta": {...}}`` —
with ``torch.save``; :func:`load_simclr_weights` reads it back with ``torch.load(weights_only=True)``
(no pickled code ever runs) and refuses a file made for another resolution, attention setting or
backbone.

The export also records **who was in the pool** without naming anyone: ``meta["pool"]`` holds a
random per-file salt and the sorted ``sha256(salt + "<source>/<patient_id>")`` of every pool patient
(:func:`pool_record`; ``source`` = the crop index's ``source`` column, i.e. the ``data.name`` it was
preprocessed under, so two cohorts that both number their patients ``P001`` do not collide). The
run app refuses a checkpoint whose pool holds one of its test patients (:func:`pool_overlap`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from crc_lightning.io.errors import InputError
from crc_lightning.io.files import write_atomic
from crc_lightning.models.attention import make_pool
from crc_lightning.models.backbone import WeightsNotFoundError, create_backbone, feature_dim

__all__ = [
    "FORMAT",
    "SimCLRModule",
    "export_simclr_weights",
    "load_simclr_weights",
    "patient_key",
    "pool_overlap",
    "pool_record",
    "pretrain_command",
    "read_simclr_meta",
    "simclr_weights_name",
]

log = logging.getLogger(__name__)

FORMAT = "crc_lightning.simclr/1"


def simclr_weights_name(res: int, attention: bool) -> str:
    """``simclr_res<res>.ckpt`` or ``simclr_res<res>_sa.ckpt``: the file ``variant=oodp|oodp_sa``
    reads from ``paths.weights_dir`` by default."""
    return f"simclr_res{int(res)}{'_sa' if attention else ''}.ckpt"


def pretrain_command(res: int, attention: bool) -> str:
    """The command that makes the SimCLR weights for (res, attention)."""
    return f"python -m crc_lightning.pretrain res={int(res)}" + (
        " model.attention=true" if attention else ""
    )


def _plain_mapping(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(dict(value), default=str))


class SimCLRModule(L.LightningModule):
    """EfficientNet-B0 (1-channel) → [SA + ReLU | global average pool] → MLP head; NT-Xent loss.

    ``backbone``: ``{name, weights: none|imagenet, weights_file}`` (``simclr`` is refused: continue
    a SimCLR run with ``ckpt_path`` instead). ``optimizer``: a partial taking ``params`` and ``lr``;
    the learning rate is ``base_lr · batch_size · world_size / 256`` (linear scaling, SimCLR).
    ``scheduler``: a partial taking ``optimizer``, ``warmup_epochs`` and ``max_epochs`` **in steps**
    (e.g. ``lightly.utils.scheduler.CosineWarmupScheduler``), stepped every optimizer step; None =
    constant lr.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any] | None = None,
        in_chans: int = 1,
        attention: bool = False,
        num_heads: int = 8,
        attention_dropout: float = 0.0,
        hidden_dim: int | None = None,
        output_dim: int = 128,
        temperature: float = 0.5,
        base_lr: float = 0.06,
        batch_size: int = 256,
        warmup_epochs: int = 10,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        res: int = 64,
    ) -> None:
        super().__init__()
        # plain containers only: Lightning checkpoints then load with torch.load(weights_only=True)
        backbone = _plain_mapping(backbone)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        bb = dict(backbone or {})
        weights = str(bb.get("weights", "none"))
        if weights == "simclr":
            raise ValueError(
                "SimCLR pretraining starts from model.backbone.weights=none|imagenet; to continue "
                "a SimCLR run use ckpt_path=last"
            )
        self.backbone_name = str(bb.get("name", "efficientnet_b0"))
        self.backbone, self.weights_info = create_backbone(
            self.backbone_name, int(in_chans), weights, bb.get("weights_file")
        )
        dim = feature_dim(self.backbone)
        self.pool = make_pool(dim, bool(attention), int(num_heads), float(attention_dropout))
        self.projection_head = SimCLRProjectionHead(dim, int(hidden_dim or dim), int(output_dim))
        self.temperature = float(temperature)
        self.criterion = NTXentLoss(temperature=self.temperature)
        self._optimizer_factory = optimizer
        self._scheduler_factory = scheduler
        self.epoch_losses: list[float] = []  # mean training loss of each finished epoch
        self._epoch_sum = 0.0
        self._epoch_n = 0

    # ------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled representation ``[B, C]`` (what the classifier's FC layer will see)."""
        return self.pool(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.embed(x))

    def setup(self, stage: str) -> None:
        # Negatives from every GPU: NT-Xent with gather_distributed when world_size > 1.
        if self.trainer is not None and self.trainer.world_size > 1:
            self.criterion = NTXentLoss(temperature=self.temperature, gather_distributed=True)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        v0, v1 = batch["view0"], batch["view1"]
        z0, z1 = self(torch.cat([v0, v1])).chunk(2)
        loss = self.criterion(z0, z1)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(v0))
        self._epoch_sum += float(loss.detach())
        self._epoch_n += 1
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_sum, self._epoch_n = 0.0, 0

    def on_train_epoch_end(self) -> None:
        if self._epoch_n:
            self.epoch_losses.append(self._epoch_sum / self._epoch_n)

    # ------------------------------------------------------------------ optimisation
    def learning_rate(self) -> float:
        world = self.trainer.world_size if self._trainer is not None else 1
        return float(self.hparams.base_lr) * int(self.hparams.batch_size) * world / 256.0

    def configure_optimizers(self) -> Any:
        if self._optimizer_factory is None:
            raise ValueError("model.optimizer is not set (expected a `_partial_: true` optimizer)")
        opt = self._optimizer_factory(params=self.parameters(), lr=self.learning_rate())
        if self._scheduler_factory is None:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, int(self.trainer.max_epochs or 1)))
        warmup = min(int(self.hparams.warmup_epochs) * per_epoch, max(0, total - 1))
        sched = self._scheduler_factory(optimizer=opt, warmup_epochs=warmup, max_epochs=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ hand-off
    def export_state(self) -> dict[str, torch.Tensor]:
        """``backbone.*`` (+ ``pool.*`` when the SA block has weights) as detached CPU tensors."""
        out = {
            f"backbone.{k}": v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()
        }
        out.update(
            {f"pool.{k}": v.detach().cpu().clone() for k, v in self.pool.state_dict().items()}
        )
        return out


# ------------------------------------------------------------------------------ export / load
def _jsonable(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON: refuses anything that would need pickle to load."""
    return json.loads(json.dumps(dict(meta)))


POOL_SCHEME = "sha256(salt + source + '/' + patient_id)"


def patient_key(source: Any, patient_id: Any) -> str:
    """A patient's identity across crop stores: ``<source>/<patient_id>`` (the index columns)."""
    return f"{source}/{patient_id}"


def _salted(salt: str, key: str) -> str:
    return hashlib.sha256((salt + key).encode()).hexdigest()


def pool_record(keys: Iterable[str], salt: str | None = None) -> dict[str, Any]:
    """``meta["pool"]`` of a SimCLR export: a random salt (per file) and the sorted salted sha256
    of each :func:`patient_key` in the pool, so a run can test membership but nobody can list the
    patients (the salt stops matching against a table of hashed ids made for another file)."""
    salt = salt or secrets.token_hex(16)
    hashes = sorted({_salted(salt, str(k)) for k in keys})
    return {"scheme": POOL_SCHEME, "salt": salt, "n_patients": len(hashes), "patients": hashes}


def pool_overlap(meta: Mapping[str, Any], keys: Iterable[str]) -> int | None:
    """How many of ``keys`` (:func:`patient_key`) the checkpoint's pool holds; None when the
    checkpoint records no pool (made before pool records existed, or by other code)."""
    pool = meta.get("pool")
    if not isinstance(pool, Mapping) or not isinstance(pool.get("salt"), str):
        return None
    held = set(pool.get("patients") or ())
    return sum(_salted(pool["salt"], str(k)) in held for k in set(keys))


def export_simclr_weights(
    module: SimCLRModule,
    path: str | Path,
    meta: Mapping[str, Any],
    pool_patients: Iterable[str] | None = None,
) -> Path:
    """Write the backbone (+ attention) weights and ``meta`` to ``path`` atomically (tmp + replace).

    ``meta`` must hold at least ``res``, ``attention``, ``backbone``, ``in_chans``; it is stored as
    JSON-able values only, so the file loads with ``torch.load(weights_only=True)``.
    ``pool_patients``: the :func:`patient_key` of every pool patient, stored salted-hashed as
    ``meta["pool"]`` (:func:`pool_record`).
    """
    required = {"res", "attention", "backbone", "in_chans"}
    missing = required - set(meta)
    if missing:
        raise ValueError(f"SimCLR weights metadata lacks {sorted(missing)}")
    meta = dict(meta)
    if pool_patients is not None:
        meta["pool"] = pool_record(pool_patients)
    payload = {"format": FORMAT, "state_dict": module.export_state(), "meta": _jsonable(meta)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_atomic(path, buffer.getvalue())


def _read_payload(path: Path) -> dict[str, Any]:
    """The export's dict, loaded weights-only; anything else is an InputError naming the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        raise InputError(
            path,
            f"not a SimCLR weights file, or it holds pickled objects other than tensors and plain "
            f"metadata (refused, nothing in it was run): {str(err).splitlines()[0][:200]}",
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(path, f"not a SimCLR weights file (expected format {FORMAT!r})")
    return payload


def read_simclr_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a SimCLR weights file (weights-only load, format checked)."""
    return dict(_read_payload(Path(path).expanduser()).get("meta") or {})


def load_simclr_weights(
    path: str | Path, res: int, attention: bool, backbone_name: str = "efficientnet_b0"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """``(backbone_state, pool_state | None, meta)`` of a SimCLR weights file, checked.

    Refuses (``InputError`` naming the file): a file that is not a plain tensors+metadata dict
    (``torch.load(weights_only=True)`` — a crafted pickle never runs), and a file made for another
    ``res``, ``attention`` or backbone. A missing file raises :class:`WeightsNotFoundError` naming the
    command that makes it. ``pool_state`` is None when the file has no attention block.
    """
    path = Path(path).expanduser()
    cmd = pretrain_command(res, attention)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: no SimCLR weights file. Make it with `{cmd}` (it writes "
            f"${{paths.weights_dir}}/{simclr_weights_name(res, attention)})."
        )
    payload = _read_payload(path)
    meta = dict(payload.get("meta") or {})
    problems = []
    if int(meta.get("res", -1)) != int(res):
        problems.append(f"it was pretrained at res={meta.get('res')}, this model uses res={res}")
    if bool(meta.get("attention")) != bool(attention):
        have = "with" if meta.get("attention") else "without"
        want = "with" if attention else "without"
        problems.append(f"it was pretrained {have} the attention block, this model is {want} it")
    if str(meta.get("backbone")) != str(backbone_name):
        problems.append(
            f"its backbone is {meta.get('backbone')!r}, this model's is {backbone_name!r}"
        )
    if problems:
        raise InputError(
            path,
            "SimCLR weights do not fit: "
            + "; ".join(problems)
            + f". Make matching ones with `{cmd}`.",
        )
    state = payload.get("state_dict") or {}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise InputError(path, "SimCLR weights file has no tensors (or non-tensor entries)")
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    pool = {k[len("pool.") :]: v for k, v in state.items() if k.startswith("pool.")}
    if not backbone:
        raise InputError(path, "SimCLR weights file holds no backbone tensors")
    if attention and not pool:
        raise InputError(path, f"SimCLR weights file has no attention block; make it with `{cmd}`")
    return backbone, (pool or None), meta
