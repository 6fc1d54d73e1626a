"""The one backbone factory used by the classifier, SimCLR and predict.

ImageNet weights never come from the network at run time: they are read from a local file
(``weights_file``) or from the user's Hugging Face cache, and a missing file is an error that says how
to provide one. ``weights="none"`` is the explicit opt-out (random init). A single-channel stem is made
by timm from the 3-channel ImageNet stem (weights summed over RGB), so ImageNet weights stay usable on
gray CT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
from torch import nn

from crc_lightning.io.files import sha256_file

WEIGHT_CHOICES = ("imagenet", "simclr", "none")


class WeightsNotFoundError(FileNotFoundError):
    """Backbone weights were asked for but cannot be found locally."""


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the weights a backbone started from (recorded in metrics.json)."""

    init: str  # imagenet | simclr | none
    file: str | None = None
    sha256: str | None = None

    def as_dict(self) -> dict:
        return {"init": self.init, "file": self.file, "sha256": self.sha256}


def _cached_imagenet_file(name: str) -> Path | None:
    """The user's HF-cache copy of timm's default ImageNet weights for ``name``, if any (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, filename)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def resolve_imagenet_file(name: str, weights_file: str | Path | None) -> Path:
    """Where the ImageNet weights for ``name`` are, or a clear error saying how to provide them."""
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"model.backbone.weights_file={path}: no such file. Give the path of a timm "
                f"'{name}' ImageNet checkpoint (.safetensors or .pth)."
            )
        return path
    cached = _cached_imagenet_file(name)
    if cached is not None:
        return cached
    raise WeightsNotFoundError(
        f"ImageNet weights for '{name}' were asked for (model.backbone.weights=imagenet) but no local "
        f"copy was found, and nothing is downloaded at run time. Either pass "
        f"model.backbone.weights_file=/path/to/{name}.safetensors, or fill your Hugging Face cache once "
        f"on a machine with internet (`python -c \"import timm; timm.create_model('{name}', "
        f'pretrained=True)"`), or opt out explicitly with model.backbone.weights=none (random init; '
        f"the report shows it)."
    )


def create_backbone(
    name: str = "efficientnet_b0",
    in_chans: int = 1,
    weights: str = "imagenet",
    weights_file: str | Path | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, WeightsInfo]:
    """A timm feature extractor: ``model.forward_features(x) -> [B, C, h, w]``, ``model.num_features``.

    ``weights="simclr"`` builds the random-init architecture only: the SimCLR checkpoint is loaded by
    the caller (it also holds the attention block), see ``crc_lightning.models.simclr``.
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"model.backbone.weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    kwargs = dict(
        in_chans=in_chans,
        num_classes=0,
        global_pool="",
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    if weights == "imagenet":
        path = resolve_imagenet_file(name, weights_file)
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
        return model, WeightsInfo("imagenet", str(path), sha256_file(path))
    model = timm.create_model(name, pretrained=False, **kwargs)
    return model, WeightsInfo(weights)


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)
