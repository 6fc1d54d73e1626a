"""Safe loading and export of trained classifiers, and the metadata ("model card") they carry.

Why: a checkpoint handed to a clinical ``predict`` run may come from anywhere, and Python pickles
execute code on load. Nothing here ever unpickles arbitrary objects:

* Lightning ``.ckpt`` files written by ``python -m crc_lightning.run`` are read with
  ``torch.load(..., weights_only=True)`` — PyTorch's restricted unpickler, which only rebuilds
  tensors and plain containers and refuses any other global (so a crafted ``__reduce__`` never runs).
  This works because :class:`~crc_lightning.models.classifier.MutationClassifier` stores plain
  Python values as hyper-parameters;
* :func:`export_model` writes a ``.safetensors`` file (no pickle at all): the state dict as tensors
  plus the model card as JSON in the header. It drops optimizer state, so it is ~4× smaller.

The *model card* (:func:`model_card`) is the flat, JSON-able description ``predict`` works from:
class names, label set, input resolution, CT window, input normalisation, Algorithm 1 parameters
(with the reading options), variant, training cohort (data name + crop-store hash), the training
CTs' voxel spacing range (``spacing``: ``{"min": [sz, sy, sx], "max": [...]}`` mm, ``None`` when
not recorded; ``predict`` warns outside it), weight provenance, architecture, versions.
A checkpoint lacking any required entry is refused with :class:`CheckpointError` — predict never
guesses preprocessing, it reads it from the checkpoint.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crc_lightning.io.errors import InputError
from crc_lightning.io.files import atomic_path, sha256_file

__all__ = [
    "FORMAT",
    "CheckpointError",
    "check_expectations",
    "export_model",
    "load_model",
    "model_card",
    "read_checkpoint",
]

FORMAT = "crc_lightning.model"
FORMAT_VERSION = 1
SAFETENSORS_META_KEY = "crc_lightning"
_ARCH_KEYS = ("backbone", "in_chans", "attention", "num_heads", "attention_dropout", "dropout")
_REQUIRED_META = ("window", "normalize", "preprocess")
_FLOAT_RTOL = 1e-6


class CheckpointError(InputError):
    """A checkpoint cannot be used (unsafe, unreadable, incomplete, or not what the input needs)."""


# --------------------------------------------------------------------------- reading


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _unsafe_reason(err: Exception) -> str:
    """The line of PyTorch's weights-only refusal that names the offending global (its other lines
    advise loading with ``weights_only=False``, which is exactly what must not be done here)."""
    for line in str(err).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()[:200]
    return "weights-only loading rejected it"


def _torch_load_safe(path: Path) -> Any:
    """``torch.load(weights_only=True)``; any refusal becomes a :class:`CheckpointError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            path,
            "refused: the file holds Python objects other than tensors and plain values, which "
            f"could run code when loaded ({_unsafe_reason(err)}). It was not loaded. Only "
            "checkpoints written by `python -m crc_lightning.run` or by "
            "crc_lightning.models.checkpoint.export_model are accepted.",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            path, f"not a readable PyTorch/Lightning checkpoint ({str(err)[:200]})"
        ) from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, model card) of a Lightning ``.ckpt`` or an exported ``.safetensors`` file.

    Never unpickles arbitrary objects; raises :class:`CheckpointError` naming the file and the
    problem (unsafe content, unreadable, missing metadata).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    if _is_safetensors(path):
        state, card = _read_safetensors(path)
    else:
        obj = _torch_load_safe(path)
        if not isinstance(obj, Mapping):
            raise CheckpointError(path, f"expected a checkpoint dict, found {type(obj).__name__}")
        if "hyper_parameters" in obj and "state_dict" in obj:
            card = model_card(obj["hyper_parameters"], path)
            card["lightning_version"] = obj.get("pytorch-lightning_version")
            card["epoch"] = obj.get("epoch")
            state = dict(obj["state_dict"])
        elif obj.get("format") == FORMAT and "state_dict" in obj and "card" in obj:
            card, state = _validate_card(dict(obj["card"]), path), dict(obj["state_dict"])
        else:
            raise CheckpointError(
                path,
                "not a crc_lightning classifier checkpoint: expected Lightning's "
                "'state_dict' + 'hyper_parameters' (from `python -m crc_lightning.run`) or an "
                f"exported model; top-level keys are {sorted(map(str, obj))[:12]}",
            )
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "state_dict holds values that are not tensors")
    card["source"] = {"file": path.name, "sha256": sha256_file(path)}
    return state, card


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(path, f"not a readable safetensors file ({err})") from None
    raw = header.get(SAFETENSORS_META_KEY)
    if raw is None:
        raise CheckpointError(
            path,
            "safetensors file without crc_lightning metadata (class names, resolution, window, "
            "preprocessing): a bare weights file cannot be used for prediction; export the "
            "trained model with crc_lightning.models.checkpoint.export_model",
        )
    try:
        card = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(path, f"crc_lightning metadata is not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise CheckpointError(path, "crc_lightning metadata is not a JSON object")
    return state, _validate_card(card, path)


# --------------------------------------------------------------------------- the model card


def model_card(hparams: Mapping[str, Any], path: str | Path | None = None) -> dict[str, Any]:
    """The flat model card built from MutationClassifier hyper-parameters; validated.

    ``meta`` (written by the run app) supplies window, normalisation, Algorithm 1 parameters,
    variant, label set, training cohort and seed; the architecture keys come from the top level.
    """
    hp = dict(hparams)
    meta = hp.get("meta")
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    missing = [k for k in ("class_names", "res", *_ARCH_KEYS) if k not in hp]
    missing += [f"meta.{k}" for k in _REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(
            path,
            f"checkpoint lacks required metadata {missing}: prediction must repeat the training "
            "preprocessing exactly and cannot guess it. Use a checkpoint written by "
            "`python -m crc_lightning.run` (which records it), or re-train.",
        )
    backbone = dict(hp["backbone"]) if isinstance(hp["backbone"], Mapping) else {}
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": meta.get("package_version"),
        "class_names": list(hp["class_names"]),
        "labels": meta.get("labels"),
        "res": hp["res"],
        "window": dict(meta["window"]),
        "normalize": dict(meta["normalize"]),
        "preprocess": dict(meta["preprocess"]),
        "variant": meta.get("variant"),
        "data": meta.get("data"),
        "spacing": meta.get("spacing"),
        "seed": meta.get("seed"),
        "weights": hp.get("weights_info"),
        "architecture": {
            "backbone": backbone.get("name"),
            "in_chans": hp["in_chans"],
            "attention": hp["attention"],
            "num_heads": hp["num_heads"],
            "attention_dropout": hp["attention_dropout"],
            "dropout": hp["dropout"],
        },
    }
    return _validate_card(card, path)


def _validate_card(card: dict[str, Any], path: str | Path | None) -> dict[str, Any]:
    """Type-check every entry predict relies on; normalise the preprocessing parameters."""
    from crc_lightning.preprocessing.algorithm import PreprocessParams

    problems: list[str] = []
    for key in ("class_names", "res", "window", "normalize", "preprocess", "architecture"):
        if card.get(key) is None:
            problems.append(f"missing {key!r}")
    if problems:
        raise CheckpointError(path, f"checkpoint metadata incomplete: {'; '.join(problems)}")
    names = card["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
        problems.append(f"class_names must be a non-empty list of names, got {names!r}")
    if not _is_int(card["res"]) or card["res"] <= 0:
        problems.append(f"res must be a positive integer, got {card['res']!r}")
    win, norm = card["window"], card["normalize"]
    if not _numbers(win, ("width", "level")) or win["width"] <= 0:
        problems.append(f"window must hold width > 0 and level, got {win!r}")
    if not _numbers(norm, ("mean", "std")) or norm["std"] <= 0:
        problems.append(f"normalize must hold mean and std > 0, got {norm!r}")
    arch = card["architecture"]
    if not isinstance(arch, Mapping) or not isinstance(arch.get("backbone"), str):
        problems.append(f"architecture.backbone must be a model name, got {arch!r}")
    spacing = card.get("spacing")
    if spacing is not None and not (
        isinstance(spacing, Mapping)
        and all(
            isinstance(spacing.get(k), (list, tuple))
            and len(spacing[k]) == 3
            and all(isinstance(v, (int, float)) and v > 0 for v in spacing[k])
            for k in ("min", "max")
        )
    ):
        problems.append(
            f"spacing must hold min and max as three positive mm values, got {spacing!r}"
        )
    try:
        params = PreprocessParams.from_config(card["preprocess"])
        card["preprocess"] = params.to_dict()
    except (ValueError, TypeError) as err:
        problems.append(f"preprocess parameters invalid: {err}")
    if problems:
        raise CheckpointError(path, "checkpoint metadata invalid: " + "; ".join(problems))
    card["res"] = int(card["res"])
    card["window"] = {"width": float(win["width"]), "level": float(win["level"])}
    card["normalize"] = {"mean": float(norm["mean"]), "std": float(norm["std"])}
    return card


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numbers(d: Any, keys: tuple[str, ...]) -> bool:
    return isinstance(d, Mapping) and all(
        isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool) for k in keys
    )


# --------------------------------------------------------------------------- building


def build_model(card: Mapping[str, Any]) -> nn.Module:
    """The classifier architecture described by ``card`` (random init, no weight file read)."""
    from crc_lightning.models.classifier import MutationClassifier

    arch = card["architecture"]
    weights = dict(card.get("weights") or {"init": "none", "file": None, "sha256": None})
    meta = {k: card.get(k) for k in ("variant", "labels", "window", "normalize", "preprocess")}
    meta.update(data=card.get("data"), seed=card.get("seed"), spacing=card.get("spacing"))
    meta["package_version"] = card.get("package_version")
    return MutationClassifier(
        class_names=list(card["class_names"]),
        backbone={"name": arch["backbone"], "weights": str(weights.get("init", "none"))},
        in_chans=int(arch["in_chans"]),
        attention=bool(arch["attention"]),
        num_heads=int(arch["num_heads"]),
        attention_dropout=float(arch["attention_dropout"]),
        dropout=float(arch["dropout"]),
        res=int(card["res"]),
        meta=meta,
        weights_info=weights,
        init_weights=False,
    )


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on ``device``, model card) from a checkpoint; weights loaded strictly."""
    path = Path(path)
    state, card = read_checkpoint(path)
    try:
        model = build_model(card)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(path, f"cannot build the architecture it describes: {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            path, f"weights do not match the architecture it describes: {str(err)[:500]}"
        ) from None
    return model.to(device).eval(), card


# --------------------------------------------------------------------------- export


def export_model(module: nn.Module, path: str | Path) -> Path:
    """Write ``module`` (a MutationClassifier) as a weights-only-safe ``.safetensors`` file.

    The model card (from its hyper-parameters) goes into the safetensors header as JSON, with the
    package version doing the export. Written atomically (:func:`~crc_lightning.io.files.atomic_path`).
    """
    from safetensors.torch import save_file

    from crc_lightning import __version__

    path = Path(path)
    hparams = getattr(module, "hparams", None)
    if not hparams:
        raise ValueError("export_model needs a MutationClassifier (with saved hyper-parameters)")
    card = model_card(dict(hparams), path)
    card.pop("source", None)
    card["exported_with"] = str(__version__)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={SAFETENSORS_META_KEY: json.dumps(card)})
    return path


# --------------------------------------------------------------------------- expectations


def _differs(stored: Any, given: Any) -> bool:
    if isinstance(stored, (int, float)) and isinstance(given, (int, float)):
        return not math.isclose(float(stored), float(given), rel_tol=_FLOAT_RTOL, abs_tol=1e-12)
    return str(stored) != str(given)


def check_expectations(
    card: Mapping[str, Any], expected: Mapping[str, Any], path: str | Path | None = None
) -> None:
    """Refuse a checkpoint whose preprocessing differs from what the caller explicitly expects.

    ``expected`` mirrors the card: ``res``, ``window.{width,level}``, ``normalize.{mean,std}``,
    ``preprocess.<Algorithm 1 key>``, ``class_names``; ``None`` entries are "no expectation".
    """
    problems: list[str] = []

    def compare(name: str, stored: Any, given: Any) -> None:
        if given is None:
            return
        if isinstance(given, Mapping):
            for k, v in given.items():
                if v is None:
                    continue
                if not isinstance(stored, Mapping) or k not in stored:
                    problems.append(f"{name}.{k}: given {v!r}, the checkpoint does not record it")
                else:
                    compare(f"{name}.{k}", stored[k], v)
        elif isinstance(given, (list, tuple)):
            if [str(x) for x in given] != [str(x) for x in (stored or [])]:
                problems.append(f"{name}: checkpoint {stored!r}, given {list(given)!r}")
        elif _differs(stored, given):
            problems.append(f"{name}: checkpoint {stored!r}, given {given!r}")

    for key, given in expected.items():
        compare(key, card.get(key), given)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise CheckpointError(
            path,
            "the checkpoint's preprocessing differs from the expectations given:\n"
            f"{lines}\npredict always applies the preprocessing the model was trained with "
            "(read from the checkpoint); drop these overrides, or use a checkpoint trained with "
            "them.",
        )
