"""``python -m crc_lightning.predict``: per-lesion mutation probabilities for new patients.

A thin Hydra shell over :func:`predict`; the predictor itself is :mod:`crc_lightning.inference`.
For one patient (``image=`` + ``mask=``) or a manifest of many (``manifest=``, streamed one patient
at a time):

1. the checkpoint is loaded safely (:func:`crc_lightning.models.checkpoint.load_model`: weights-only,
   never arbitrary pickles) with its model card — Algorithm 1 parameters, CT window, resolution and
   input normalisation are *read from it*, so prediction repeats the training preprocessing exactly;
   explicitly given expectations (``res=``, ``window.width=``, ``preprocess.epsilon=`` …) that
   disagree with it are refused;
   ``checkpoint=`` may also be a job folder (an ensemble of its folds) or a sweep folder (every
   finished job below it): :mod:`crc_lightning.inference.ensemble`;
2. each scan is preprocessed once and predicted by every member
   (:func:`~crc_lightning.inference.predictor.predict_ensemble`); ``predictions.csv`` gets one row
   per lesion (``patient_id,lesion,n_slices,p_<CLASS>...`` = the members' mean, then
   ``p_<CLASS>_sd/_min/_max`` across members and ``n_members``),
   ``predictions_slices.csv`` one row per included slice; both are written patient by patient into
   temporary files that replace the outputs only when all patients are done, so memory does not
   grow with the cohort and a failed run leaves nothing half-written;
3. optionally a saliency PNG per lesion.

``--info`` (or ``info=true``) prints the members (for a folder) and what the checkpoint describes,
and stops.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from crc_lightning.apps._hydra import CONF_DIR, plain, run_app
from crc_lightning.inference.ensemble import Ensemble, load_ensemble, spread_columns
from crc_lightning.inference.predictor import (
    LESION_ID_COLUMNS,
    SLICE_ID_COLUMNS,
    CsvAppender,
    format_info,
    format_members,
    manifest_patients,
    predict_ensemble,
    read_options,
    single_patient,
)
from crc_lightning.io.files import write_json
from crc_lightning.models.checkpoint import check_expectations

log = logging.getLogger(__name__)

__all__ = ["expectations_from_config", "main", "predict", "rewrite_argv"]

_EXPECTATION_KEYS = ("res", "window", "normalize", "preprocess")
_CHECKPOINT_HINT = (
    "a .ckpt from `python -m crc_lightning.run`, an export, or a job / sweep folder of run"
)


def _fmt_p(x: float, sd: float | None = None) -> str:
    if not np.isfinite(x):
        return "  -  "
    return f"{x:.3f}" if sd is None else f"{x:.3f} ± {sd:.3f}"


def _patient_table(lesions: pd.DataFrame, classes: list[str], n_members: int = 1) -> Any:
    """One patient's lesions on the console; an ensemble's cells read ``p ± SD`` across members."""
    from rich.table import Table

    pid = lesions["patient_id"].iat[0] if len(lesions) else ""
    caption = (
        f"p ± SD across the {n_members} members (min, max in predictions.csv)"
        if n_members > 1
        else None
    )
    table = Table(title=f"patient {pid}", title_justify="left", caption=caption)
    table.add_column("lesion", justify="right")
    table.add_column("slices", justify="right")
    for c in classes:
        table.add_column(f"p({c})", justify="right")
    table.add_column("most likely")
    for _, r in lesions.iterrows():
        p = np.array([r[f"p_{c}"] for c in classes], dtype=float)
        sd = [float(r[f"p_{c}_sd"]) if n_members > 1 else None for c in classes]
        best = classes[int(np.argmax(p))] if r["n_slices"] > 0 else "no slice passed Algorithm 1"
        table.add_row(str(r["lesion"]), str(r["n_slices"]), *map(_fmt_p, p, sd), best)
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


def _console() -> Any:
    from rich.console import Console

    return Console(file=sys.stdout, width=max(100, Console().width))


def _require(cfg: DictConfig, key: str, hint: str) -> Path:
    value = cfg.get(key)
    if value in (None, ""):
        raise ValueError(f"`{key}=` is required: {hint}")
    return Path(str(value)).expanduser()


def validate(cfg: DictConfig) -> None:
    """Checks of a predict config before any work or folder (Hydra callback ``ValidateConfig``):
    the checkpoint and the inputs exist, the numbers are numbers. The checkpoint's own checks
    (weights-only loading, its model card against the expectations) come when it is loaded."""
    from crc_lightning.apps._hydra import config_int
    from crc_lightning.io.errors import InputError

    ckpt = _require(cfg, "checkpoint", _CHECKPOINT_HINT)
    if not ckpt.exists():
        raise InputError(ckpt, "no such checkpoint file or job/sweep folder (checkpoint=)")
    config_int(cfg, "batch_size", minimum=1, example=64)
    if cfg.get("res") is not None:
        config_int(cfg, "res", minimum=1, example=64)
    if bool(cfg.get("info", False)):
        return
    if cfg.get("manifest"):
        if cfg.get("image") or cfg.get("mask"):
            raise ValueError("give either `manifest=` or `image=` + `mask=`, not both")
        paths = {"manifest": Path(str(cfg.manifest)).expanduser()}
    else:
        paths = {
            "image": _require(
                cfg, "image", "the CT (NIfTI file or DICOM series folder), or manifest="
            ),
            "mask": _require(
                cfg, "mask", "the lesion mask (NIfTI, DICOM SEG file or DICOM series folder)"
            ),
        }
    for key, path in paths.items():
        if not path.exists():
            raise InputError(path, f"no such file or folder ({key}=)")
    device = str(cfg.get("device", "auto"))
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"`device={device}`: {err}") from None


def _patient_page(
    pages_dir: Path,
    lesions: pd.DataFrame,
    classes: list[str],
    card: dict[str, Any],
    saliency_dir: Path | None,
    n_members: int = 1,
) -> Path:
    """``patients/<patient>.html``: the patient's lesion table and saliency overlays, one
    self-contained page (images embedded), rendered like the report."""
    from crc_lightning.evaluation.html import write_html
    from crc_lightning.inference.summary import patient_markdown, patient_page_name, saliency_name

    pid = str(lesions["patient_id"].iat[0]) if len(lesions) else "patient"
    images = {}
    if saliency_dir is not None:
        for lesion in lesions["lesion"]:
            path = saliency_dir / saliency_name(pid, int(lesion))
            if path.is_file():
                images[int(lesion)] = os.path.relpath(path, pages_dir)
    page = pages_dir / patient_page_name(pid)
    text = patient_markdown(lesions, classes, card, images, n_members=n_members)
    return write_html(text, page, base_dir=page.parent)


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run the predict app on a composed config; returns a summary (no patient ids).

    ``checkpoint=``: a checkpoint file, a job folder (one member per fold) or a sweep folder (every
    finished job below it): :func:`~crc_lightning.inference.ensemble.load_ensemble`.
    ``info=true``: print the members (folders) and the model card and return them (nothing
    written).
    """
    torch.set_flush_denormal(True)  # as in run: denormal activations slow CPU inference ~10×
    ckpt = _require(cfg, "checkpoint", _CHECKPOINT_HINT)
    ensemble = load_ensemble(ckpt, device=_device(str(cfg.get("device", "auto"))))
    card = ensemble.card
    check_expectations(card, expectations_from_config(cfg), ckpt)
    console = _console()
    folder = ensemble.kind != "checkpoint"
    if bool(cfg.get("info", False)):
        if folder:
            console.print(format_members(ensemble))
        console.print(format_info(card))
        return {"info": card, "members": _members(ensemble)}
    if folder:
        console.print(ensemble.describe(), soft_wrap=True, markup=False, highlight=False)

    manifest, image = cfg.get("manifest"), cfg.get("image")
    if manifest and (image or cfg.get("mask")):
        raise ValueError("give either `manifest=` or `image=` + `mask=`, not both")
    segments = plain(cfg.get("segments"))
    if manifest:
        patients = manifest_patients(Path(str(manifest)).expanduser(), card, segments)
    else:
        image = _require(cfg, "image", "the CT (NIfTI file or DICOM series folder), or manifest=")
        mask = _require(
            cfg, "mask", "the lesion mask (NIfTI, DICOM SEG file or DICOM series folder)"
        )
        rule = str(cfg.get("lesion_rule") or "components")
        patients = [
            single_patient(image, mask, cfg.get("patient_id"), rule, read_options(card), segments)
        ]

    out_dir = Path(str(cfg.paths.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = ensemble.classes
    pcols = [f"p_{c}" for c in classes]
    n_members = len(ensemble.members)
    saliency = bool(cfg.get("saliency", True)) and bool(ensemble.deep_models)
    saliency_dir = out_dir / "saliency" if saliency else None
    kwargs = {
        "batch_size": int(cfg.get("batch_size", 64)),
        "saliency_dir": saliency_dir,
        "saliency_class": cfg.get("saliency_class"),
    }
    t0 = time.perf_counter()
    n_lesions = n_slices = n_spacing = 0
    pngs_before = (
        set(saliency_dir.glob("*.png")) if saliency_dir and saliency_dir.is_dir() else set()
    )
    pages_dir = out_dir / "patients" if bool(cfg.get("html", True)) else None
    pages: list[Path] = []
    with (
        CsvAppender(
            out_dir / "predictions.csv", [*LESION_ID_COLUMNS, *pcols, *spread_columns(classes)]
        ) as lesion_out,
        CsvAppender(out_dir / "predictions_slices.csv", [*SLICE_ID_COLUMNS, *pcols]) as slice_out,
    ):
        try:
            for i, patient in enumerate(patients, 1):
                image_vol, mask_vol = patient.load()
                lesions, slices = predict_ensemble(
                    ensemble,
                    image_vol,
                    mask_vol,
                    patient.patient_id,
                    lesion_rule=patient.lesion_rule,
                    **kwargs,
                )
                n_spacing += bool(lesions.attrs.get("spacing_warning"))
                del image_vol, mask_vol  # the volumes are the big part; free before the next
                lesion_out.append(lesions)
                slice_out.append(slices)
                n_lesions += len(lesions)
                n_slices += len(slices)
                if bool(cfg.get("print_table", True)):
                    console.print(_patient_table(lesions, classes, n_members))
                if pages_dir is not None:
                    pages.append(
                        _patient_page(pages_dir, lesions, classes, card, saliency_dir, n_members)
                    )
                log.info("patient %d/%d done", i, len(patients))
        except BaseException:
            if saliency_dir is not None and saliency_dir.is_dir():
                for png in set(saliency_dir.glob("*.png")) - pngs_before:
                    png.unlink(missing_ok=True)
            for page in pages:
                page.unlink(missing_ok=True)
            raise
    summary = {
        "checkpoint": card,
        "members": _members(ensemble),
        "n_patients": len(patients),
        "n_lesions": n_lesions,
        "n_slices": n_slices,
        "n_spacing_outside_training": n_spacing,
        "seconds": round(time.perf_counter() - t0, 3),
        "files": {
            "lesions": "predictions.csv",
            "slices": "predictions_slices.csv",
            "saliency": "saliency/" if saliency_dir is not None else None,
            "patients": "patients/" if pages_dir is not None else None,
        },
    }
    write_json(out_dir / "predict.json", summary)
    console.print(
        f"{len(patients)} patient(s), {n_lesions} lesion(s), {n_slices} slice(s) → {out_dir}"
    )
    return summary


def _members(ensemble: Ensemble) -> list[dict[str, Any]]:
    """The members as plain JSON (predict.json, ``--info``'s return value)."""
    keys = ("job", "fold", "seed", "variant", "kind", "path", "n_train_patients")
    return [{k: m.info.get(k) for k in keys} for m in ensemble.members]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def rewrite_argv(argv: Sequence[str]) -> list[str]:
    """``--info`` → ``info=true`` (Hydra treats unknown ``--flags`` as errors)."""
    return ["info=true" if a == "--info" else a for a in argv]


def main() -> None:
    """Entry point (``python -m crc_lightning.predict``); accepts ``--info``."""
    run_app("predict", _hydra_main, argv_hook=rewrite_argv)
