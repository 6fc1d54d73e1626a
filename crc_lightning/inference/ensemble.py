"""Fold and seed ensembles behind ``predict checkpoint=<.ckpt | job folder | sweep folder>``.

What ``checkpoint=`` may name (:func:`load_ensemble`):

* a single ``.ckpt`` / exported ``.safetensors`` file → one deep member (predict as before);
* a **job folder** of ``python -m crc_lightning.run`` (it holds ``metrics.json``) → one member per
  trained fold: ``checkpoints/fold<f>/best.ckpt`` (deep variants), ``models/fold<f>/radiomics.*``
  (``variant=radiomics``), or both plus ``models/fold<f>/fusion.json`` (fusion:
  ``p = w·p_deep + (1 − w)·p_radiomics`` per class, at lesion level);
* a **sweep folder** → every finished job folder below it (``metrics.json`` written: a job writes it
  last), whatever its variant or seed, as long as the members' model cards agree on what the
  input must look like (:data:`CARD_KEYS`: classes, resolution, CT window, normalisation,
  Algorithm 1 parameters); disagreeing members are refused in one line naming the folders.

Every member implements :class:`Member`: ``predict(case)`` → its lesion probabilities (one row per
lesion of the case, lesion order) and, for members with a deep model, its slice probabilities.
The case is read and preprocessed **once** (:class:`CaseInputs`: Algorithm 1 crops with the shared
card's parameters, the model input tensor, radiomics features computed lazily once per feature
setting), every member scores the same inputs, and the ensemble's probability of a lesion is the
mean of its members' lesion probabilities (each the mean of that member's slice probabilities);
the spread across members (population SD, min, max) is reported beside it (:func:`combine`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from crc_lightning.io.volume import Volume
from crc_lightning.models.checkpoint import CheckpointError, load_model
from crc_lightning.preprocessing.algorithm import Crop, LesionStats, PreprocessParams

__all__ = [
    "CARD_KEYS",
    "CaseInputs",
    "DeepMember",
    "Ensemble",
    "FusionMember",
    "Member",
    "RadiomicsMember",
    "combine",
    "load_ensemble",
    "spread_columns",
]

METRICS_FILE = "metrics.json"
CKPT_NAME = "best.ckpt"
FUSION_FILE = "fusion.json"
# what every member must agree on (where it records it): the input the models expect
CARD_KEYS = ("class_names", "res", "window", "normalize", "preprocess")
_FOLD_DIR = re.compile(r"^fold(\d+)$")


def spread_columns(classes: Sequence[str]) -> list[str]:
    """The spread columns of predict's ``predictions.csv`` after the ``p_<CLASS>`` columns."""
    return [f"p_{c}_{s}" for c in classes for s in ("sd", "min", "max")] + ["n_members"]


# --------------------------------------------------------------------------- one case


@dataclass
class CaseInputs:
    """One scan, read and preprocessed once for every member: Algorithm 1 crops and lesion stats
    (with the shared card's parameters), the normalised model input (None without crops or
    without a deep member), and radiomics features per feature setting, computed on first use."""

    patient_id: str
    image: Volume
    mask: Volume
    lesion_rule: str
    crops: list[Crop]
    stats: list[LesionStats]
    x: torch.Tensor | None
    _features: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def lesions(self) -> list[int]:
        """Every lesion of the mask, in lesion order (the rows of every member's output)."""
        return sorted(int(s.lesion) for s in self.stats)

    def n_slices(self) -> dict[int, int]:
        counts = Counter(int(c.lesion) for c in self.crops)
        return {lesion: counts.get(lesion, 0) for lesion in self.lesions}

    def features(self, params: Any, connectivity: int) -> pd.DataFrame:
        """Radiomics features of every lesion (rows indexed by lesion id, in lesion order), the
        function the training job's feature cache calls, with its settings."""
        from crc_lightning.preprocessing.radiomics import scan_features

        key = json.dumps([params.to_dict(), int(connectivity)], sort_keys=True)
        if key not in self._features:
            feats = scan_features(
                self.image.array,
                self.mask.array,
                self.image.spacing,
                params,
                self.lesion_rule,
                connectivity,
            )
            frame = pd.DataFrame.from_dict(feats, orient="index")
            self._features[key] = frame.reindex(self.lesions)
        return self._features[key]


# --------------------------------------------------------------------------- members


@torch.inference_mode()
def slice_probabilities(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """Sigmoid probabilities [N, C] of the model input ``x`` [N, 1, res, res], in batches."""
    device = next(model.parameters()).device
    parts = [
        torch.sigmoid(model(x[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(x), max(int(batch_size), 1))
    ]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)


class Member:
    """One model of an ensemble. ``predict(case)`` → (lesion probabilities [n_lesions, C] in
    ``case.lesions`` order, NaN for a lesion none of whose slices passes Algorithm 1; slice
    probabilities [n_crops, C] or None when the member has no deep model)."""

    kind = "member"
    card: dict[str, Any]
    info: dict[str, Any]
    model: nn.Module | None = None  # the deep model (saliency), if any

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.card["class_names"]]

    def predict(
        self, case: CaseInputs, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def predict_lesions(self, case: CaseInputs, batch_size: int = 64) -> pd.DataFrame:
        """The member's lesion probabilities as a frame: ``lesion, p_<CLASS>...``."""
        lesion_p, _ = self.predict(case, batch_size)
        frame = pd.DataFrame(lesion_p, columns=[f"p_{c}" for c in self.classes])
        frame.insert(0, "lesion", case.lesions)
        return frame


def lesion_means(case: CaseInputs, slice_p: np.ndarray) -> np.ndarray:
    """Mean slice probability per lesion [n_lesions, C] (NaN for a lesion without slices)."""
    lesions = case.lesions
    out = np.full((len(lesions), slice_p.shape[1] if slice_p.ndim == 2 else 0), np.nan)
    if len(case.crops):
        frame = pd.DataFrame(slice_p)
        frame["lesion"] = [int(c.lesion) for c in case.crops]
        means = frame.groupby("lesion", sort=True).mean()
        for i, lesion in enumerate(lesions):
            if lesion in means.index:
                out[i] = means.loc[lesion].to_numpy(dtype=np.float64)
    return out


class DeepMember(Member):
    """A trained classifier checkpoint: lesion p = mean of its slice probabilities."""

    kind = "deep"

    def __init__(self, model: nn.Module, card: dict[str, Any], info: dict[str, Any]) -> None:
        self.model, self.card, self.info = model, card, info

    def predict(
        self, case: CaseInputs, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray | None]:
        n_classes = len(self.classes)
        if case.x is None or not len(case.crops):
            return np.full((len(case.lesions), n_classes), np.nan), np.zeros((0, n_classes))
        slice_p = slice_probabilities(self.model, case.x, batch_size)
        return lesion_means(case, slice_p), slice_p


class RadiomicsMember(Member):
    """A radiomics model (:class:`crc_lightning.models.radiomics.RadiomicsModel`) on the lesion's
    IBSI features of the same CT and mask. Like the deep members, and like the training job (whose
    rows are the lesions with crops), a lesion none of whose slices passes Algorithm 1 gets NaN."""

    kind = "radiomics"

    def __init__(self, model: Any, params: Any, card: dict[str, Any], info: dict[str, Any]) -> None:
        self.radiomics, self.params, self.card, self.info = model, params, card, info
        self.connectivity = PreprocessParams.from_config(card["preprocess"]).connectivity

    def predict(
        self, case: CaseInputs, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray | None]:
        out = np.full((len(case.lesions), len(self.classes)), np.nan)
        counts = case.n_slices()
        keep = [i for i, lesion in enumerate(case.lesions) if counts[lesion] > 0]
        if keep:
            feats = case.features(self.params, self.connectivity).iloc[keep]
            out[keep] = self.radiomics.predict_proba(feats)
        return out, None


class FusionMember(Member):
    """Late fusion of one fold's deep and radiomics models:
    ``p = w·p_deep + (1 − w)·p_radiomics`` per class (``weights``), at lesion level."""

    kind = "fusion"

    def __init__(
        self,
        deep: DeepMember,
        radiomics: RadiomicsMember,
        weights: Mapping[str, float],
        info: dict[str, Any],
    ) -> None:
        self.deep, self.radiomics_member, self.info = deep, radiomics, info
        self.card, self.model = deep.card, deep.model
        self.weights = np.array([float(weights[c]) for c in deep.classes])

    def predict(
        self, case: CaseInputs, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray | None]:
        p_deep, slice_p = self.deep.predict(case, batch_size)
        p_rad, _ = self.radiomics_member.predict(case, batch_size)
        return self.weights * p_deep + (1.0 - self.weights) * p_rad, slice_p


# --------------------------------------------------------------------------- combining


def combine(per_member: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Ensemble of members' lesion probabilities [n_lesions, C] each: ``p`` (mean), ``sd``
    (population SD, ddof 0: 0 for one member), ``min``, ``max`` over the members with a value,
    and ``n`` (how many had one; 0 → NaN everywhere)."""
    stack = np.stack([np.asarray(p, np.float64) for p in per_member])  # [M, L, C]
    finite = np.isfinite(stack)
    n = finite.all(axis=2).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN lesions → NaN
        return {
            "p": np.nanmean(stack, axis=0),
            "sd": np.nanstd(stack, axis=0),
            "min": np.nanmin(stack, axis=0),
            "max": np.nanmax(stack, axis=0),
            "n": n.astype(int),
        }


# --------------------------------------------------------------------------- the ensemble


@dataclass
class Ensemble:
    """The members ``checkpoint=`` names and the card they share (preprocessing, window, res …,
    taken from the first member with a deep model, else from the first member)."""

    source: Path
    kind: str  # checkpoint | job | sweep
    members: list[Member]
    card: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # unfinished job folders of a sweep

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.card["class_names"]]

    @property
    def deep_models(self) -> list[nn.Module]:
        return [m.model for m in self.members if m.model is not None]

    def describe(self) -> str:
        """One line: how many members of which variants and seeds (for the console)."""
        jobs = {m.info.get("job") for m in self.members}
        variants = Counter(str(m.info.get("variant") or "not recorded") for m in self.members)
        seeds = sorted({m.info.get("seed") for m in self.members}, key=str)
        parts = ", ".join(f"{v} ×{n}" for v, n in sorted(variants.items()))
        text = (
            f"ensemble of {len(self.members)} member(s) from {len(jobs)} job(s) in "
            f"{self.source}: variants {parts}; seeds {', '.join(map(str, seeds))}"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} unfinished job folder(s) skipped: " + ", ".join(
                self.skipped
            )
        return text


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """The members ``checkpoint=`` names (module docstring); every problem is a one-line
    :class:`CheckpointError` naming the file or folder."""
    path = Path(path)
    if path.is_file():
        model, card = load_model(path, device=device)
        info = _member_info_of_file(path, card)
        return Ensemble(path, "checkpoint", [DeepMember(model, card, info)], card)
    if not path.is_dir():
        raise CheckpointError(path, "no such checkpoint file or job/sweep folder (checkpoint=)")
    if (path / METRICS_FILE).is_file():
        members = _job_members(path, path.name, device)
        return Ensemble(path, "job", members, _shared_card(path, members))
    jobs, skipped = _sweep_jobs(path)
    if not jobs:
        raise CheckpointError(
            path,
            "neither a checkpoint file nor a job folder (no metrics.json) nor a sweep folder "
            "holding finished job folders"
            + (f" (unfinished: {', '.join(skipped)})" if skipped else ""),
        )
    members = [m for job in jobs for m in _job_members(job, _rel(job, path), device)]
    return Ensemble(path, "sweep", members, _shared_card(path, members), skipped)


def _rel(job: Path, root: Path) -> str:
    return str(job.relative_to(root)) if job != root else job.name


def _sweep_jobs(root: Path) -> tuple[list[Path], list[str]]:
    """Finished job folders below ``root`` (sorted) and unfinished ones (checkpoints or models,
    no metrics.json yet) — temporary and hidden folders ignored."""

    def visible(p: Path) -> bool:
        return not any(part.startswith(".") for part in p.relative_to(root).parts)

    jobs = sorted(p.parent for p in root.rglob(METRICS_FILE) if visible(p.parent))
    done = set(jobs)
    started = {
        p.parent
        for pattern in ("checkpoints", "models")
        for p in root.rglob(pattern)
        if p.is_dir() and visible(p.parent) and p.parent not in done
    }
    return jobs, sorted(_rel(p, root) for p in started)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(path, f"not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


def _job_folds(job: Path, metrics: Mapping[str, Any]) -> list[int]:
    """The folds the job trained: metrics.json's ``folds`` (else the fold folders on disk)."""
    listed = [int(f["fold"]) for f in metrics.get("folds") or [] if "fold" in f]
    if listed:
        return sorted(listed)
    found = {
        int(m.group(1))
        for sub in ("checkpoints", "models")
        if (job / sub).is_dir()
        for p in (job / sub).iterdir()
        if (m := _FOLD_DIR.match(p.name))
    }
    return sorted(found)


def _n_train_patients(job: Path, metrics: Mapping[str, Any], fold: int) -> int | None:
    for f in metrics.get("folds") or []:
        if int(f.get("fold", -1)) == fold and f.get("n_train_patients") is not None:
            return int(f["n_train_patients"])
    splits = job / "splits.json"
    if splits.is_file():
        for f in _read_json(splits).get("folds") or []:
            if int(f.get("fold", -1)) == fold:
                return len(f.get("train") or [])
    return None


def _job_members(job: Path, label: str, device: str | torch.device) -> list[Member]:
    """One member per trained fold of a finished job folder."""
    metrics = _read_json(job / METRICS_FILE)
    folds = _job_folds(job, metrics)
    if not folds:
        raise CheckpointError(job, "job folder without trained folds (checkpoints/ or models/)")
    members: list[Member] = []
    for fold in folds:
        ckpt = job / "checkpoints" / f"fold{fold}" / CKPT_NAME
        models = job / "models" / f"fold{fold}"
        info = {
            "job": label,
            "fold": fold,
            "seed": metrics.get("seed"),
            "variant": metrics.get("variant"),
            "n_train_patients": _n_train_patients(job, metrics, fold),
        }
        has_rad = (models / "radiomics.json").is_file()
        deep = None
        if ckpt.is_file():
            model, card = load_model(ckpt, device=device)
            deep = DeepMember(model, card, {**info, "kind": "deep", "path": str(ckpt)})
        if deep is not None and (models / FUSION_FILE).is_file() and has_rad:
            rad = _radiomics_member(job, models, metrics, deep.card, info)
            weights = _fusion_weights(models / FUSION_FILE, deep.classes)
            members.append(
                FusionMember(
                    deep, rad, weights, {**info, "kind": "fusion", "path": f"{ckpt} + {models}"}
                )
            )
        elif deep is not None:
            members.append(deep)
        elif has_rad:
            members.append(_radiomics_member(job, models, metrics, None, info))
        else:
            raise CheckpointError(
                job,
                f"fold {fold} has neither checkpoints/fold{fold}/{CKPT_NAME} nor "
                f"models/fold{fold}/radiomics.json",
            )
    return members


def _fusion_weights(path: Path, classes: Sequence[str]) -> dict[str, float]:
    weights = _read_json(path).get("weights")
    if not isinstance(weights, Mapping) or sorted(map(str, weights)) != sorted(classes):
        raise CheckpointError(path, f"expected {{'weights': {{class: w}}}} for classes {classes}")
    out = {str(c): float(w) for c, w in weights.items()}
    bad = {c: w for c, w in out.items() if not 0.0 <= w <= 1.0}
    if bad:
        raise CheckpointError(path, f"fusion weights must lie in [0, 1], got {bad}")
    return out


def _radiomics_member(
    job: Path,
    folder: Path,
    metrics: Mapping[str, Any],
    deep_card: Mapping[str, Any] | None,
    info: dict[str, Any],
) -> RadiomicsMember:
    """The radiomics model of one fold, with the feature settings and Algorithm 1 parameters its
    job trained with (a fusion fold: the deep checkpoint's card supplies the latter)."""
    from crc_lightning.models.radiomics import MODEL_META_FILE, RadiomicsModel
    from crc_lightning.preprocessing.radiomics import RadiomicsParams

    model = RadiomicsModel.load(folder)
    saved = _read_json(folder / MODEL_META_FILE)
    hydra_cfg = _hydra_config(job)
    features = saved.get("features")
    if features is None:
        features = (hydra_cfg.get("radiomics") or {}).get("features")
    if features is None:
        raise CheckpointError(
            folder / MODEL_META_FILE,
            "records no radiomics feature settings (and the job's .hydra/config.yaml has no "
            "radiomics.features): its features cannot be recomputed the way it was trained",
        )
    try:
        params = RadiomicsParams.from_config(features)
    except (TypeError, ValueError) as err:
        raise CheckpointError(job, f"radiomics feature settings invalid: {err}") from None
    if deep_card is not None:
        card = {k: deep_card[k] for k in ("class_names", "preprocess", "labels") if k in deep_card}
    else:
        card = {
            "class_names": list(model.classes),
            "preprocess": _job_preprocess(job, metrics, saved, hydra_cfg),
            "labels": hydra_cfg.get("labels"),
            "variant": metrics.get("variant"),
            "seed": metrics.get("seed"),
            "data": metrics.get("data"),
        }
    if [str(c) for c in card["class_names"]] != list(model.classes):
        raise CheckpointError(
            folder, f"radiomics classes {list(model.classes)} != the job's {card['class_names']}"
        )
    card["radiomics"] = params.to_dict()
    if info.get("n_train_patients") is None:
        info = {**info, "n_train_patients": model.n_train_patients}
    return RadiomicsMember(model, params, card, {**info, "kind": "radiomics", "path": str(folder)})


def _hydra_config(job: Path) -> dict[str, Any]:
    path = job / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
        return dict(OmegaConf.to_container(cfg, resolve=False) or {})  # type: ignore[arg-type]
    except Exception as err:  # a YAML error of any kind: name the file
        raise CheckpointError(path, f"not a readable resolved config ({err})") from None


def _job_preprocess(
    job: Path,
    metrics: Mapping[str, Any],
    saved: Mapping[str, Any],
    hydra_cfg: Mapping[str, Any],
) -> dict[str, Any]:
    """Algorithm 1 parameters a radiomics job was trained with: recorded in its metrics.json or
    radiomics.json, else those of its crop store (``data.store`` of its resolved config), which
    must still be the store it trained on (content hash in metrics.json)."""
    from crc_lightning.cropstore.format import is_store, store_facts

    for source in (metrics, saved):
        if isinstance(source.get("preprocess"), Mapping):
            return PreprocessParams.from_config(source["preprocess"]).to_dict()
    store = (hydra_cfg.get("data") or {}).get("store")
    if store and is_store(store):
        facts = store_facts(store)
        want = (metrics.get("data") or {}).get("store_hash")
        if want and want != facts["hash"]:
            raise CheckpointError(
                job,
                f"its crop store {store} changed since it trained (hash {facts['hash'][:12]} ≠ "
                f"{str(want)[:12]}), so its Algorithm 1 parameters are not known",
            )
        return PreprocessParams.from_config(facts["params"]).to_dict()
    raise CheckpointError(
        job,
        "radiomics job records no Algorithm 1 parameters (metrics.json / radiomics.json) and its "
        "crop store (data.store of .hydra/config.yaml) is not there to read them from",
    )


def _member_info_of_file(path: Path, card: Mapping[str, Any]) -> dict[str, Any]:
    """A single checkpoint's member info; inside a job folder (``<job>/checkpoints/fold<f>/``)
    also its job, fold and trained-on patient count."""
    info: dict[str, Any] = {
        "job": None,
        "fold": None,
        "seed": card.get("seed"),
        "variant": card.get("variant"),
        "kind": "deep",
        "path": str(path),
        "n_train_patients": None,
    }
    m = _FOLD_DIR.match(path.parent.name)
    job = path.parent.parent.parent
    if m and path.parent.parent.name == "checkpoints" and (job / METRICS_FILE).is_file():
        fold = int(m.group(1))
        with_metrics = _read_json(job / METRICS_FILE)
        info.update(
            job=job.name, fold=fold, n_train_patients=_n_train_patients(job, with_metrics, fold)
        )
    return info


def _shared_card(source: Path, members: Sequence[Member]) -> dict[str, Any]:
    """The card every member agrees with (:data:`CARD_KEYS`, compared where a member records
    it); any disagreement is one line naming the folders on each side."""
    for key in CARD_KEYS:
        groups: dict[str, list[str]] = {}
        for m in members:
            if m.card.get(key) is None:
                continue
            value = json.dumps(m.card[key], sort_keys=True)
            where = str(m.info.get("job") or m.info.get("path"))
            if where not in groups.setdefault(value, []):
                groups[value].append(where)
        if len(groups) > 1:
            sides = "; ".join(
                f"{value} in {', '.join(sorted(where))}" for value, where in groups.items()
            )
            raise CheckpointError(
                source,
                f"its members disagree on {key} ({sides}): an ensemble needs one input "
                "preparation; give checkpoint= one of these job folders, or a sweep folder of "
                "agreeing jobs",
            )
    deep = [m for m in members if m.model is not None]
    return dict((deep or list(members))[0].card)
