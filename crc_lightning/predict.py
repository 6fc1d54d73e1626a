"""``python -m crc_lightning.predict``: per-lesion mutation probabilities for new patients.

A thin Hydra shell over :func:`predict`; the typed core is :func:`predict_case` /
:func:`predict_volumes`. For one patient (``image=`` + ``mask=``) or a manifest of many
(``manifest=``, streamed one patient at a time):

1. the checkpoint is loaded safely (:func:`crc_lightning.models.checkpoint.load_model`: weights-only,
   never arbitrary pickles) with its model card — Algorithm 1 parameters, CT window, resolution and
   input normalisation are *read from it*, so prediction repeats the training preprocessing exactly;
   explicitly given expectations (``res=``, ``window.width=``, ``preprocess.epsilon=`` …) that
   disagree with it are refused;
2. the mask becomes lesions (``lesion_labels``: instance values, or 26-components of a binary mask),
   Algorithm 1 selects and crops each lesion's slices (``preprocess_volume``), crops are windowed,
   resized and normalised exactly as ``CropDataModule`` does for the test set;
3. slice probabilities (sigmoid per class) are averaged per lesion; ``predictions.csv`` gets one
   row per lesion (``patient_id,lesion,n_slices,p_<CLASS>...``), ``predictions_slices.csv`` one
   row per included slice (``patient_id,lesion,slice,area_mm2,p_<CLASS>...``); rows are appended
   patient by patient into temporary files that replace the outputs only when all patients are
   done, so memory does not grow with the cohort and a failed run leaves nothing half-written;
4. optionally a saliency PNG per lesion (Grad-CAM, or the attention map of ``+SA`` models) on the
   lesion's central crop (its included slice with the largest area).

``--info`` (or ``info=true``) prints what the checkpoint describes and stops.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from crc_lightning.data.augment import normalize
from crc_lightning.data.store import crops_to_tensor, window
from crc_lightning.io import InputError, Volume, read_image, read_mask
from crc_lightning.models.checkpoint import CheckpointError, check_expectations, load_model
from crc_lightning.preprocessing.algorithm import (
    Crop,
    LesionStats,
    PreprocessParams,
    preprocess_scan,
)

log = logging.getLogger(__name__)

__all__ = [
    "LESION_ID_COLUMNS",
    "SLICE_ID_COLUMNS",
    "expectations_from_config",
    "format_info",
    "model_inputs",
    "predict",
    "predict_case",
    "predict_volumes",
]

LESION_ID_COLUMNS = ["patient_id", "lesion", "n_slices"]
SLICE_ID_COLUMNS = ["patient_id", "lesion", "slice", "area_mm2"]
_EXPECTATION_KEYS = ("res", "window", "normalize", "preprocess")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


# --------------------------------------------------------------------------- preprocessing


def model_inputs(crops: Sequence[Crop], card: Mapping[str, Any]) -> torch.Tensor:
    """Crops → the normalised model input [N, 1, res, res]: the datamodule's test path
    (:func:`~crc_lightning.data.store.crops_to_tensor`, then ``normalize(mean, std)``)."""
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(lesion rows, slice rows) for one scan already read (image HU, raw lesion mask, same grid).

    A lesion none of whose slices passes Algorithm 1 (too small after cleaning / ε) gets a lesion
    row with ``n_slices = 0`` and empty probabilities, so no lesion silently disappears.
    """
    classes = [str(c) for c in card["class_names"]]
    pcols = [f"p_{c}" for c in classes]
    params = PreprocessParams.from_config(card["preprocess"])
    crops, stats = preprocess_scan(image.array, raw_mask.array, image.spacing, params)
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
    if saliency_dir is not None and x is not None:
        _write_saliency(model, card, crops, x, lesions, slices, Path(saliency_dir), saliency_class)
    return lesions, slices


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
    from crc_lightning.evaluation.saliency import saliency_map, save_overlay
    from crc_lightning.preprocessing.manifest import safe_id

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
        name = f"{safe_id(str(les['patient_id']))}_{int(les['lesion'])}.png"
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
    """Read one patient's image and mask (grids must match) and predict; see :func:`predict_volumes`."""
    image = read_image(image_path)
    mask = read_mask(mask_path, reference=image)
    pid = str(patient_id) if patient_id is not None else patient_id_from_path(image_path)
    return predict_volumes(model, meta, image, mask, pid, **kwargs)


# --------------------------------------------------------------------------- inputs


@dataclass
class _Patient:
    patient_id: str
    load: Callable[[], tuple[Volume, Volume]]


def _single_patient(cfg: DictConfig) -> _Patient:
    image, mask = Path(str(cfg.image)), Path(str(cfg.mask))

    def load() -> tuple[Volume, Volume]:
        img = read_image(image)
        return img, read_mask(mask, reference=img)

    pid = cfg.get("patient_id")
    return _Patient(str(pid) if pid is not None else patient_id_from_path(image), load)


def _manifest_patients(manifest: Path, card: Mapping[str, Any]) -> list[_Patient]:
    """The manifest's scans (validated up front; gene columns optional and ignored)."""
    from crc_lightning.preprocessing.manifest import BASE_COLUMNS, DEFAULT_GENES, read_manifest

    if not manifest.is_file():
        raise InputError(manifest, "manifest not found")
    with open(manifest, newline="") as f:
        header = next(csv.reader(f), [])
    known = set(DEFAULT_GENES) | set((card.get("labels") or {}).get("genes") or [])
    genes = tuple(c.strip() for c in header if c.strip() in known and c not in BASE_COLUMNS)
    cases = read_manifest(manifest, genes=genes, check_lesions=False, source="predict")
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
    return [_Patient(case.patient_id, case.load) for case in cases]


# --------------------------------------------------------------------------- output


class _CsvAppender:
    """Rows appended to ``<dir>/.tmp-*`` and moved onto ``path`` by :meth:`commit` (atomic)."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".csv", dir=path.parent)
        self.tmp = Path(tmp)
        self.file: TextIO = os.fdopen(fd, "w", newline="")
        self.file.write(",".join(columns) + "\n")

    def append(self, df: pd.DataFrame) -> None:
        df[self.columns].to_csv(self.file, header=False, index=False, lineterminator="\n")
        self.file.flush()

    def commit(self) -> None:
        self.file.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get normal permissions
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _fmt_p(x: float) -> str:
    return "  -  " if not np.isfinite(x) else f"{x:.3f}"


def _patient_table(lesions: pd.DataFrame, classes: list[str]) -> Any:
    from rich.table import Table

    pid = lesions["patient_id"].iat[0] if len(lesions) else ""
    table = Table(title=f"patient {pid}", title_justify="left")
    table.add_column("lesion", justify="right")
    table.add_column("slices", justify="right")
    for c in classes:
        table.add_column(f"p({c})", justify="right")
    table.add_column("most likely")
    for _, r in lesions.iterrows():
        p = np.array([r[f"p_{c}"] for c in classes], dtype=float)
        best = classes[int(np.argmax(p))] if r["n_slices"] > 0 else "no slice passed Algorithm 1"
        table.add_row(str(r["lesion"]), str(r["n_slices"]), *map(_fmt_p, p), best)
    return table


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def expectations_from_config(cfg: DictConfig) -> dict[str, Any]:
    """The explicitly given expectations (``res``, ``window.*``, ``normalize.*``,
    ``preprocess.*``) — null entries dropped; see :func:`check_expectations`."""
    out: dict[str, Any] = {}
    for key in _EXPECTATION_KEYS:
        value = cfg.get(key)
        if value is None:
            continue
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
            if not value:
                continue
        out[key] = value
    return out


# --------------------------------------------------------------------------- info


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
        ("preprocessing (Algorithm 1)", text(card.get("preprocess"))),
        (
            "training cohort",
            f"{text(data.get('name'))}, crop store hash {text(data.get('store_hash'))}",
        ),
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


# --------------------------------------------------------------------------- the app


def _console() -> Any:
    from rich.console import Console

    return Console(file=sys.stdout, width=max(100, Console().width))


def _require(cfg: DictConfig, key: str, hint: str) -> Path:
    value = cfg.get(key)
    if value in (None, ""):
        raise ValueError(f"`{key}=` is required: {hint}")
    return Path(str(value)).expanduser()


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run the predict app on a composed config; returns a summary (no patient ids).

    ``info=true``: print the checkpoint's model card and return it (nothing written).
    """
    torch.set_flush_denormal(True)  # as in run: denormal activations slow CPU inference ~10×
    ckpt = _require(cfg, "checkpoint", "a .ckpt from `python -m crc_lightning.run` or an export")
    model, card = load_model(ckpt, device=_device(str(cfg.get("device", "auto"))))
    check_expectations(card, expectations_from_config(cfg), ckpt)
    console = _console()
    if bool(cfg.get("info", False)):
        console.print(format_info(card))
        return {"info": card}

    manifest, image = cfg.get("manifest"), cfg.get("image")
    if manifest and (image or cfg.get("mask")):
        raise ValueError("give either `manifest=` or `image=` + `mask=`, not both")
    if manifest:
        patients = _manifest_patients(Path(str(manifest)).expanduser(), card)
    else:
        _require(cfg, "image", "the CT (NIfTI file or DICOM series folder), or use manifest=")
        _require(cfg, "mask", "the lesion mask (NIfTI, DICOM SEG file or DICOM series folder)")
        patients = [_single_patient(cfg)]

    out_dir = Path(str(cfg.paths.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = [str(c) for c in card["class_names"]]
    pcols = [f"p_{c}" for c in classes]
    saliency_dir = out_dir / "saliency" if bool(cfg.get("saliency", True)) else None
    kwargs = {
        "batch_size": int(cfg.get("batch_size", 64)),
        "saliency_dir": saliency_dir,
        "saliency_class": cfg.get("saliency_class"),
    }
    t0 = time.perf_counter()
    n_lesions = n_slices = 0
    pngs_before = (
        set(saliency_dir.glob("*.png")) if saliency_dir and saliency_dir.is_dir() else set()
    )
    with ExitStack() as stack:
        lesion_out = _CsvAppender(out_dir / "predictions.csv", [*LESION_ID_COLUMNS, *pcols])
        stack.callback(lesion_out.discard)
        slice_out = _CsvAppender(out_dir / "predictions_slices.csv", [*SLICE_ID_COLUMNS, *pcols])
        stack.callback(slice_out.discard)
        try:
            for i, patient in enumerate(patients, 1):
                image_vol, mask_vol = patient.load()
                lesions, slices = predict_volumes(
                    model, card, image_vol, mask_vol, patient.patient_id, **kwargs
                )
                del image_vol, mask_vol  # the volumes are the big part; free before the next
                lesion_out.append(lesions)
                slice_out.append(slices)
                n_lesions += len(lesions)
                n_slices += len(slices)
                if bool(cfg.get("print_table", True)):
                    console.print(_patient_table(lesions, classes))
                log.info("patient %d/%d done", i, len(patients))
        except BaseException:
            if saliency_dir is not None and saliency_dir.is_dir():
                for png in set(saliency_dir.glob("*.png")) - pngs_before:
                    png.unlink(missing_ok=True)
            raise
        lesion_out.commit()
        slice_out.commit()
    summary = {
        "checkpoint": card,
        "n_patients": len(patients),
        "n_lesions": n_lesions,
        "n_slices": n_slices,
        "seconds": round(time.perf_counter() - t0, 3),
        "files": {
            "lesions": "predictions.csv",
            "slices": "predictions_slices.csv",
            "saliency": "saliency/" if saliency_dir is not None else None,
        },
    }
    from crc_lightning.cli import write_json_atomic

    write_json_atomic(out_dir / "predict.json", summary)
    console.print(
        f"{len(patients)} patient(s), {n_lesions} lesion(s), {n_slices} slice(s) → {out_dir}"
    )
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except (CheckpointError, InputError, ValueError) as err:  # a clear message, no traceback
        raise SystemExit(f"predict: {err}") from None


def rewrite_argv(argv: Sequence[str]) -> list[str]:
    """``--info`` → ``info=true`` (Hydra treats unknown ``--flags`` as errors)."""
    return ["info=true" if a == "--info" else a for a in argv]


def main() -> None:
    """Entry point: accepts ``--info``, then hands over to Hydra."""
    sys.argv = [sys.argv[0], *rewrite_argv(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
