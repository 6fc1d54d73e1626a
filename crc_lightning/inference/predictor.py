"""The predictor behind ``python -m crc_lightning.predict``: a trained model on new patients' scans.

For one scan already read (image in HU, raw lesion mask on the same grid):

1. the mask becomes lesions by the scan's lesion rule (:mod:`crc_lightning.io.lesions`: for
   ``image=``/``mask=`` the 26-connected components of ``mask > 0`` unless told ``instance``; for a
   manifest what its rows say, exactly as in preprocessing), Algorithm 1 selects and crops each
   lesion's slices (:func:`~crc_lightning.preprocessing.algorithm.preprocess_scan`) with the
   parameters *read from the model card*, crops are windowed, resized and normalised exactly as
   ``CropDataModule`` does for the test set (:func:`model_inputs`);
2. slice probabilities (sigmoid per class) are computed in batches and averaged per lesion; with
   several members (:mod:`.ensemble`: the folds of a job, the jobs of a sweep, radiomics and fusion
   models) the scan is preprocessed once, every member scores it and the lesion probability is
   the members' mean, with their SD / min / max (:func:`predict_ensemble`);
3. optionally a saliency PNG per lesion (Grad-CAM, or the attention map of ``+SA`` models,
   :mod:`.saliency`) on the lesion's central crop (its included slice with the largest area).

:class:`Patient` / :func:`manifest_patients` / :func:`single_patient` describe what to read (with
the reading options of the model card: the training's ``resample_mask``, ``gantry_tilt``,
``nonfinite_hu``); :class:`CsvAppender` streams the per-lesion and per-slice tables to disk
atomically. A CT whose voxel spacing lies outside the training range the checkpoint records
(:func:`spacing_warning`) is predicted with a warning.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import torch
from torch import nn

from crc_lightning.cropstore.format import GENES
from crc_lightning.data.augment import normalize
from crc_lightning.data.inputs import crops_to_tensor, window
from crc_lightning.inference.ensemble import (
    CaseInputs,
    DeepMember,
    Ensemble,
    combine,
    spread_columns,
)
from crc_lightning.io import InputError, ReadOptions, Volume, read_image, read_mask
from crc_lightning.io.files import atomic_path
from crc_lightning.io.lesions import check_rule
from crc_lightning.preprocessing.algorithm import Crop, PreprocessParams, preprocess_scan
from crc_lightning.sources.manifest import BASE_COLUMNS, read_manifest

__all__ = [
    "LESION_ID_COLUMNS",
    "SLICE_ID_COLUMNS",
    "CsvAppender",
    "Patient",
    "format_info",
    "format_members",
    "manifest_patients",
    "model_inputs",
    "patient_id_from_path",
    "predict_case",
    "predict_ensemble",
    "predict_volumes",
    "prepare_case",
    "single_patient",
    "spacing_warning",
]

log = logging.getLogger(__name__)

SPACING_RTOL = 0.05  # spacing within 5 % of the training range counts as inside it

LESION_ID_COLUMNS = ["patient_id", "lesion", "n_slices"]
SLICE_ID_COLUMNS = ["patient_id", "lesion", "slice", "area_mm2"]
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


# --------------------------------------------------------------------------- preprocessing


def model_inputs(crops: Sequence[Crop], card: Mapping[str, Any]) -> torch.Tensor:
    """Crops → the normalised model input [N, 1, res, res]: the datamodule's test path
    (:func:`~crc_lightning.data.inputs.crops_to_tensor`, then ``normalize(mean, std)``)."""
    width, level = float(card["window"]["width"]), float(card["window"]["level"])
    grey = crops_to_tensor((c.array for c in crops), len(crops), int(card["res"]), width, level)
    return normalize(grey, card["normalize"]["mean"], card["normalize"]["std"])


# --------------------------------------------------------------------------- one patient


def prepare_case(
    card: Mapping[str, Any],
    image: Volume,
    raw_mask: Volume,
    patient_id: str,
    lesion_rule: str = "components",
    model_input: bool = True,
) -> CaseInputs:
    """One scan read and preprocessed once for every member of an ensemble: Algorithm 1 with the
    card's parameters and, when ``model_input`` (some member is a deep model), the model input."""
    params = PreprocessParams.from_config(card["preprocess"])
    rule = check_rule(lesion_rule)
    crops, stats = preprocess_scan(image.array, raw_mask.array, image.spacing, params, rule)
    x = model_inputs(crops, card) if crops and model_input else None
    return CaseInputs(str(patient_id), image, raw_mask, rule, crops, stats, x)


def predict_volumes(
    model: nn.Module,
    card: Mapping[str, Any],
    image: Volume,
    raw_mask: Volume,
    patient_id: str,
    **options: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(lesion rows, slice rows) for one scan already read (image HU, raw lesion mask, same grid).

    ``options`` (keyword only), as for :func:`predict_ensemble`: ``batch_size`` (64),
    ``saliency_dir`` / ``saliency_class`` (None), ``lesion_rule``: ``components`` (the default:
    26-connected components of ``mask > 0``) or ``instance`` (one lesion per mask value). A lesion
    none of whose slices passes Algorithm 1 (too small after cleaning / ε) gets a lesion row with
    ``n_slices = 0`` and empty probabilities, so no lesion silently disappears. When the CT's
    spacing is outside the training range a warning is logged (no patient id) and kept in
    ``lesions.attrs["spacing_warning"]``. One model: the lesion rows are
    ``patient_id, lesion, n_slices, p_<CLASS>...`` (:func:`predict_ensemble` adds the spread).
    """
    card = dict(card)
    source = Path(str((card.get("source") or {}).get("file") or "model"))
    ensemble = Ensemble(source, "checkpoint", [DeepMember(model, card, {"kind": "deep"})], card)
    lesions, slices = predict_ensemble(ensemble, image, raw_mask, patient_id, **options)
    pcols = [f"p_{c}" for c in ensemble.classes]
    out = lesions[[*LESION_ID_COLUMNS, *pcols]].copy()
    out.attrs["spacing_warning"] = lesions.attrs.get("spacing_warning")
    return out, slices


def predict_ensemble(
    ensemble: Ensemble,
    image: Volume,
    raw_mask: Volume,
    patient_id: str,
    *,
    batch_size: int = 64,
    saliency_dir: str | Path | None = None,
    saliency_class: str | None = None,
    lesion_rule: str = "components",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`predict_volumes` for every member of ``ensemble`` on one preprocessing of the scan.

    Lesion rows: ``patient_id, lesion, n_slices, p_<CLASS>...`` — the mean over members of each
    member's lesion probability — then ``p_<CLASS>_sd`` / ``_min`` / ``_max`` across members
    (population SD: 0 for one member) and ``n_members`` (members that scored the lesion). Slice
    rows: the mean over the members with a deep model (deep, and fusion's deep part) of their
    slice probabilities (NaN when no member has one). Saliency: the members' maps averaged.
    """
    card = ensemble.card
    classes = ensemble.classes
    pcols = [f"p_{c}" for c in classes]
    warning = spacing_warning(card, image.spacing)
    if warning:
        log.warning("%s", warning)
    models = ensemble.deep_models
    case = prepare_case(card, image, raw_mask, patient_id, lesion_rule, bool(models))
    outputs = [m.predict(case, batch_size) for m in ensemble.members]
    stats = combine([lesion_p for lesion_p, _ in outputs])
    per_slice = [slice_p for _, slice_p in outputs if slice_p is not None]
    if len(per_slice) == 1:
        slice_p = per_slice[0]
    elif per_slice:
        slice_p = np.mean(np.stack(per_slice), axis=0)
    else:
        slice_p = np.full((len(case.crops), len(classes)), np.nan, np.float32)
    slices = pd.DataFrame(
        {
            "patient_id": [case.patient_id] * len(case.crops),
            "lesion": [c.lesion for c in case.crops],
            "slice": [c.slice for c in case.crops],
            "area_mm2": [c.area_mm2 for c in case.crops],
        }
    )
    for i, col in enumerate(pcols):
        slices[col] = slice_p[:, i] if len(case.crops) else np.zeros(0, np.float32)
    counts = case.n_slices()
    lesions = pd.DataFrame(
        {
            "patient_id": [case.patient_id] * len(case.lesions),
            "lesion": case.lesions,
            "n_slices": [counts[lesion] for lesion in case.lesions],
        }
    )
    for i, c in enumerate(classes):
        lesions[f"p_{c}"] = stats["p"][:, i]
    for i, c in enumerate(classes):
        for key in ("sd", "min", "max"):
            lesions[f"p_{c}_{key}"] = stats[key][:, i]
    lesions["n_members"] = stats["n"]
    lesions = lesions[[*LESION_ID_COLUMNS, *pcols, *spread_columns(classes)]]
    lesions.attrs["spacing_warning"] = warning
    if saliency_dir is not None and case.x is not None and models:
        _write_saliency(
            models, card, case.crops, case.x, lesions, slices, Path(saliency_dir), saliency_class
        )
    return lesions, slices


def spacing_warning(card: Mapping[str, Any], spacing: Sequence[float]) -> str | None:
    """A message when ``spacing`` (sz, sy, sx) mm lies outside the training spacing range the
    model card records (5 % tolerance), else None (also when the card records no range)."""
    rng = card.get("spacing")
    if not rng:
        return None
    lo = np.asarray(rng["min"], float) * (1 - SPACING_RTOL)
    hi = np.asarray(rng["max"], float) * (1 + SPACING_RTOL)
    s = np.asarray(spacing, float)
    if np.all((s >= lo) & (s <= hi)):
        return None
    fmt = lambda v: "×".join(f"{x:.3g}" for x in v)  # noqa: E731
    return (
        f"CT voxel spacing {fmt(s)} mm (z×y×x) is outside the training range "
        f"{fmt(rng['min'])} – {fmt(rng['max'])} mm of this model; its predictions for this scan "
        "are an extrapolation"
    )


def _write_saliency(
    models: Sequence[nn.Module],
    card: Mapping[str, Any],
    crops: Sequence[Crop],
    x: torch.Tensor,
    lesions: pd.DataFrame,
    slices: pd.DataFrame,
    out_dir: Path,
    saliency_class: str | None,
) -> list[Path]:
    """One PNG per lesion on its central crop: the included slice with the largest area."""
    from crc_lightning.inference.saliency import save_overlay
    from crc_lightning.inference.summary import saliency_name

    classes = [str(c) for c in card["class_names"]]
    if saliency_class is not None and saliency_class not in classes:
        raise ValueError(f"saliency_class={saliency_class!r} is not one of {classes}")
    width, level = card["window"]["width"], card["window"]["level"]
    written = []
    for _, les in lesions[lesions["n_slices"] > 0].iterrows():
        rows = slices.index[slices["lesion"] == les["lesion"]]
        k = int(rows[np.argmax(slices.loc[rows, "area_mm2"].to_numpy())])  # first max on ties
        probs = les[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
        target = classes.index(saliency_class) if saliency_class else int(np.argmax(probs))
        cam, method = _mean_saliency(models, x[k : k + 1], target)
        grey = window(crops[k].array, width, level) / np.float32(255.0)
        title = (
            f"{les['patient_id']} lesion {les['lesion']} slice {crops[k].slice} — {method}, "
            f"{classes[target]} p={probs[target]:.2f}"
        )
        name = saliency_name(str(les["patient_id"]), int(les["lesion"]))
        written.append(save_overlay(grey, cam, out_dir / name, title))
    return written


def _mean_saliency(models: Sequence[nn.Module], x: torch.Tensor, target: int) -> tuple[Any, str]:
    """One model's saliency map, or the mean of several models' maps rescaled to [0, 1]."""
    from crc_lightning.inference.saliency import saliency_map

    maps, methods = [], []
    for model in models:
        cam, method = saliency_map(model, x.to(next(model.parameters()).device), target)
        maps.append(cam)
        methods.append(method)
    if len(maps) == 1:
        return maps[0], methods[0]
    cam = np.mean(np.stack(maps), axis=0)
    span = float(cam.max() - cam.min())
    cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
    kinds = " / ".join(sorted(set(methods)))
    return cam.astype(np.float32), f"mean {kinds} of {len(maps)} models"


def patient_id_from_path(image_path: str | Path) -> str:
    """Default patient id: the image file name without its NIfTI suffix, or the DICOM folder name."""
    name = Path(image_path).name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def predict_case(
    model: nn.Module,
    meta: Mapping[str, Any],
    image_path: str | Path,
    mask_path: str | Path,
    patient_id: str | None = None,
    **kwargs: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read one patient's image and mask (with the card's reading options) and predict; see
    :func:`predict_volumes` (``lesion_rule`` defaults to ``components``)."""
    patient = single_patient(
        Path(image_path), Path(mask_path), patient_id, options=read_options(meta)
    )
    image, mask = patient.load()
    return predict_volumes(model, meta, image, mask, patient.patient_id, **kwargs)


def read_options(card: Mapping[str, Any]) -> ReadOptions:
    """The reading options the model was trained with (from its preprocessing parameters)."""
    return PreprocessParams.from_config(card["preprocess"]).read_options()


# --------------------------------------------------------------------------- inputs


@dataclass
class Patient:
    """A scan to predict: its patient id, how to read (image, raw lesion mask), its lesion rule."""

    patient_id: str
    load: Callable[[], tuple[Volume, Volume]]
    lesion_rule: str = "components"


def single_patient(
    image: Path,
    mask: Path,
    patient_id: str | None = None,
    lesion_rule: str = "components",
    options: ReadOptions | None = None,
    segments: Any = None,
) -> Patient:
    """One scan given by its image and mask paths (patient id: the image's name by default;
    lesions: the 26-connected components of ``mask > 0`` unless ``lesion_rule="instance"``)."""

    def load() -> tuple[Volume, Volume]:
        img = read_image(image, options)
        return img, read_mask(mask, reference=img, options=options, segments=segments)

    pid = str(patient_id) if patient_id is not None else patient_id_from_path(image)
    return Patient(pid, load, check_rule(lesion_rule))


def manifest_patients(
    manifest: Path, card: Mapping[str, Any], segments: Any = None
) -> list[Patient]:
    """The manifest's scans (headers and grids validated up front; gene columns optional and
    ignored); each carries the lesion rule its rows give (``*`` → components, ids → instance)."""
    if not manifest.is_file():
        raise InputError(manifest, "manifest not found")
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    known = set(GENES) | set((card.get("labels") or {}).get("genes") or [])
    genes = tuple(c.strip() for c in header if c.strip() in known and c not in BASE_COLUMNS)
    options = read_options(card)
    cases = read_manifest(
        manifest,
        genes=genes,
        check_lesions=False,
        source="predict",
        options=options,
        segments=segments,
    )
    seen: dict[str, int] = {}
    for case in cases:
        seen[case.patient_id] = seen.get(case.patient_id, 0) + 1
    dupes = sorted(p for p, n in seen.items() if n > 1)
    if dupes:
        raise InputError(
            manifest,
            f"patient(s) {dupes} have several (image, mask) scans; lesions are identified by "
            "patient_id + lesion in the predictions, so give each scan its own patient_id",
        )
    return [
        Patient(case.patient_id, functools.partial(case.load, options), case.lesion_rule)
        for case in cases
    ]


# --------------------------------------------------------------------------- output


class CsvAppender:
    """A CSV written patient by patient into a temporary file that replaces ``path`` only when the
    ``with`` block ends cleanly (:func:`crc_lightning.io.files.atomic_path`); on an error nothing
    is left. Memory does not grow with the cohort."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        self._stack = ExitStack()

    def __enter__(self) -> CsvAppender:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self.file: TextIO = self._stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
        self.file.write(",".join(self.columns) + "\n")
        return self

    def append(self, df: pd.DataFrame) -> None:
        df[self.columns].to_csv(self.file, header=False, index=False, lineterminator="\n")
        self.file.flush()

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)


# --------------------------------------------------------------------------- info


def _spacing_text(rng: Any) -> str:
    if not rng:
        return "not recorded"
    axes = [f"{lo:g}–{hi:g}" for lo, hi in zip(rng["min"], rng["max"])]
    return " × ".join(axes) + " mm (z × y × x)"


def format_info(card: Mapping[str, Any]) -> Any:
    """A rich table of what a checkpoint describes (``--info``)."""
    from rich.table import Table

    from crc_lightning import __version__

    def text(v: Any) -> str:
        if v is None:
            return "not recorded"
        if isinstance(v, (dict, list)):
            return json.dumps(v)
        return str(v)

    labels = card.get("labels") or {}
    reading_keys = ("resample_mask", "gantry_tilt", "nonfinite_hu")
    pre = dict(card.get("preprocess") or {})
    algorithm = {k: v for k, v in pre.items() if k not in reading_keys}
    reading = {k: v for k, v in pre.items() if k in reading_keys}
    arch = card.get("architecture") or {}
    data = card.get("data") or {}
    source = card.get("source") or {}
    weights = card.get("weights") or {}
    win, norm = card.get("window"), card.get("normalize")
    rows = [
        ("checkpoint", f"{source.get('file')}  sha256 {source.get('sha256')}"),
        ("label set", text(labels.get("name"))),
        ("class names", ", ".join(card["class_names"])),
        ("label groups", text(labels.get("classes"))),
        ("resolution", f"{card['res']} × {card['res']} px" if card.get("res") else "–"),
        (
            "CT window",
            f"width {win['width']:g} HU, level {win['level']:g} HU" if win else "–",
        ),
        ("normalisation", f"mean {norm['mean']:g}, std {norm['std']:g}" if norm else "–"),
        ("preprocessing (Algorithm 1)", text(algorithm)),
        ("reading options", text(reading)),
        (
            "training cohort",
            f"{text(data.get('name'))}, crop store hash {text(data.get('store_hash'))}",
        ),
        ("training spacing", _spacing_text(card.get("spacing"))),
        ("variant", text(card.get("variant"))),
        ("architecture", text(arch)),
        (
            "weights provenance",
            f"init {text(weights.get('init'))}, file {text(weights.get('file'))}, "
            f"sha256 {text(weights.get('sha256'))}",
        ),
        *([("radiomics features", text(card["radiomics"]))] if card.get("radiomics") else []),
        ("seed", text(card.get("seed"))),
        ("trained with crc-lightning", text(card.get("package_version"))),
        ("exported with crc-lightning", text(card.get("exported_with"))),
        ("Lightning version", text(card.get("lightning_version"))),
        ("this crc-lightning", str(__version__)),
    ]
    table = Table(title="checkpoint", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    return table


def format_members(ensemble: Ensemble) -> Any:
    """A rich table of an ensemble's members (``--info`` of a job or sweep folder): job, fold,
    seed, variant, kind, the file(s) it is loaded from and how many patients it trained on."""
    from rich.table import Table

    table = Table(title=ensemble.describe(), title_justify="left")
    for name in ("#", "job", "fold", "seed", "variant", "kind", "trained on", "checkpoint"):
        table.add_column(name, overflow="fold")
    for i, m in enumerate(ensemble.members, 1):
        info = m.info
        n = info.get("n_train_patients")
        table.add_row(
            str(i),
            str(info.get("job") or "–"),
            "–" if info.get("fold") is None else str(info["fold"]),
            "–" if info.get("seed") is None else str(info["seed"]),
            str(info.get("variant") or "not recorded"),
            str(info.get("kind") or m.kind),
            "not recorded" if n is None else f"{n} patients",
            str(info.get("path") or "–"),
        )
    return table
