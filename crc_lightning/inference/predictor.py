"""The predictor behind ``python -m crc_lightning.predict``: a trained model on new patients' scans.

For one scan already read (image in HU, raw lesion mask on the same grid):

1. the mask becomes lesions by the scan's lesion rule (:mod:`crc_lightning.io.lesions`: for
   ``image=``/``mask=`` the 26-connected components of ``mask > 0`` unless told ``instance``; for a
   manifest what its rows say, exactly as in preprocessing), Algorithm 1 selects and crops each
   lesion's slices (:func:`~crc_lightning.preprocessing.algorithm.preprocess_scan`) with the
   parameters *read from the model card*, crops are windowed, resized and normalised exactly as
   ``CropDataModule`` does for the test set (:func:`model_inputs`);
2. slice probabilities (sigmoid per class) are computed in batches and averaged per lesion;
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
from crc_lightning.io import InputError, ReadOptions, Volume, read_image, read_mask
from crc_lightning.io.files import atomic_path
from crc_lightning.io.lesions import check_rule
from crc_lightning.preprocessing.algorithm import (
    Crop,
    LesionStats,
    PreprocessParams,
    preprocess_scan,
)
from crc_lightning.sources.manifest import BASE_COLUMNS, read_manifest

__all__ = [
    "LESION_ID_COLUMNS",
    "SLICE_ID_COLUMNS",
    "CsvAppender",
    "Patient",
    "format_info",
    "manifest_patients",
    "model_inputs",
    "patient_id_from_path",
    "predict_case",
    "predict_volumes",
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


@torch.inference_mode()
def _probabilities(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    device = next(model.parameters()).device
    parts = [
        torch.sigmoid(model(x[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(x), max(int(batch_size), 1))
    ]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------- one patient


def predict_volumes(
    model: nn.Module,
    card: Mapping[str, Any],
    image: Volume,
    raw_mask: Volume,
    patient_id: str,
    *,
    batch_size: int = 64,
    saliency_dir: str | Path | None = None,
    saliency_class: str | None = None,
    lesion_rule: str = "components",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(lesion rows, slice rows) for one scan already read (image HU, raw lesion mask, same grid).

    ``lesion_rule``: ``components`` (26-connected components of ``mask > 0``) or ``instance``
    (one lesion per mask value). A lesion none of whose slices passes Algorithm 1 (too small after
    cleaning / ε) gets a lesion row with ``n_slices = 0`` and empty probabilities, so no lesion
    silently disappears. When the CT's spacing is outside the training range a warning is logged
    (no patient id) and kept in ``lesions.attrs["spacing_warning"]``.
    """
    classes = [str(c) for c in card["class_names"]]
    pcols = [f"p_{c}" for c in classes]
    params = PreprocessParams.from_config(card["preprocess"])
    warning = spacing_warning(card, image.spacing)
    if warning:
        log.warning("%s", warning)
    crops, stats = preprocess_scan(
        image.array, raw_mask.array, image.spacing, params, check_rule(lesion_rule)
    )
    if crops:
        x = model_inputs(crops, card)
        prob = _probabilities(model, x, batch_size)
    else:
        x, prob = None, np.zeros((0, len(classes)), np.float32)
    slices = pd.DataFrame(
        {
            "patient_id": [str(patient_id)] * len(crops),
            "lesion": [c.lesion for c in crops],
            "slice": [c.slice for c in crops],
            "area_mm2": [c.area_mm2 for c in crops],
        }
    )
    for i, col in enumerate(pcols):
        slices[col] = prob[:, i] if len(crops) else np.zeros(0, np.float32)
    lesions = _lesion_rows(slices, stats, str(patient_id), pcols)
    lesions.attrs["spacing_warning"] = warning
    if saliency_dir is not None and x is not None:
        _write_saliency(model, card, crops, x, lesions, slices, Path(saliency_dir), saliency_class)
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


def _lesion_rows(
    slices: pd.DataFrame, stats: Sequence[LesionStats], patient_id: str, pcols: list[str]
) -> pd.DataFrame:
    """Mean slice probability per lesion, every lesion of ``stats`` in lesion order."""
    means = slices.groupby("lesion", sort=True)[pcols].mean() if len(slices) else None
    counts = slices.groupby("lesion").size() if len(slices) else pd.Series(dtype=int)
    rows = []
    for s in sorted(stats, key=lambda s: s.lesion):
        row: dict[str, Any] = {
            "patient_id": patient_id,
            "lesion": int(s.lesion),
            "n_slices": int(counts.get(s.lesion, 0)),
        }
        for col in pcols:
            has = means is not None and s.lesion in means.index
            row[col] = float(means.at[s.lesion, col]) if has else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, columns=[*LESION_ID_COLUMNS, *pcols])


def _write_saliency(
    model: nn.Module,
    card: Mapping[str, Any],
    crops: Sequence[Crop],
    x: torch.Tensor,
    lesions: pd.DataFrame,
    slices: pd.DataFrame,
    out_dir: Path,
    saliency_class: str | None,
) -> list[Path]:
    """One PNG per lesion on its central crop: the included slice with the largest area."""
    from crc_lightning.inference.saliency import saliency_map, save_overlay
    from crc_lightning.inference.summary import saliency_name

    classes = [str(c) for c in card["class_names"]]
    if saliency_class is not None and saliency_class not in classes:
        raise ValueError(f"saliency_class={saliency_class!r} is not one of {classes}")
    device = next(model.parameters()).device
    width, level = card["window"]["width"], card["window"]["level"]
    written = []
    for _, les in lesions[lesions["n_slices"] > 0].iterrows():
        rows = slices.index[slices["lesion"] == les["lesion"]]
        k = int(rows[np.argmax(slices.loc[rows, "area_mm2"].to_numpy())])  # first max on ties
        probs = les[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
        target = classes.index(saliency_class) if saliency_class else int(np.argmax(probs))
        cam, method = saliency_map(model, x[k : k + 1].to(device), target)
        grey = window(crops[k].array, width, level) / np.float32(255.0)
        title = (
            f"{les['patient_id']} lesion {les['lesion']} slice {crops[k].slice} — {method}, "
            f"{classes[target]} p={probs[target]:.2f}"
        )
        name = saliency_name(str(les["patient_id"]), int(les["lesion"]))
        written.append(save_overlay(grey, cam, out_dir / name, title))
    return written


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
    with open(manifest, newline="") as f:
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
        self.file: TextIO = self._stack.enter_context(open(tmp, "w", newline=""))
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
    rows = [
        ("checkpoint", f"{source.get('file')}  sha256 {source.get('sha256')}"),
        ("label set", text(labels.get("name"))),
        ("class names", ", ".join(card["class_names"])),
        ("label groups", text(labels.get("classes"))),
        ("resolution", f"{card['res']} × {card['res']} px"),
        (
            "CT window",
            f"width {card['window']['width']:g} HU, level {card['window']['level']:g} HU",
        ),
        ("normalisation", f"mean {card['normalize']['mean']:g}, std {card['normalize']['std']:g}"),
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
