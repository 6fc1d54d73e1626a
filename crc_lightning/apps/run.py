"""``python -m crc_lightning.run``: train the mutation classifier on one split, test its best epoch.

A thin Hydra shell over :func:`run`, which tests call with a composed config. One job:

1. seed everything (``seed``), build the crop-store datamodule and the classifier from the config;
2. fit with early stopping on ``val/loss`` and keep the best epoch (``conf/callbacks/default.yaml``);
3. re-validate and test the *best* checkpoint on the held-out patients;
4. write ``metrics.json`` (image / lesion / patient metrics, README "What each stage writes") and
   ``predictions.csv`` (one row per test crop) into the job's output folder; print the metrics.

A sweep re-run (``resume=true``) returns a finished job's stored metrics instead of training again.
Nothing identifying (patient ids, paths, images) is sent to experiment loggers: only the plain
settings below and the epoch metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from crc_lightning import __version__
from crc_lightning.apps._hydra import (
    CONF_DIR,
    UsageError,
    config_int,
    get_metric_value,
    instantiate,
    instantiate_callbacks,
    instantiate_loggers,
    is_multirun,
    job_label,
    plain,
    run_app,
    task_wrapper,
    track_loggers,
)
from crc_lightning.apps.preprocess import ensure_store, preprocess_command, synthetic_spec
from crc_lightning.apps.progress import progress_callbacks
from crc_lightning.cropstore.format import store_facts
from crc_lightning.io.files import sha256_file, write_atomic, write_json

log = logging.getLogger(__name__)

__all__ = ["format_metrics", "job_summary_line", "main", "predictions_frame", "run", "validate"]

PRED_ID_COLUMNS = ["patient_id", "lesion", "crop_id", "slice"]


def validate(cfg: DictConfig) -> None:
    """Checks of a run config before any work or folder (Hydra callback ``ValidateConfig``, and
    :func:`run` itself): numbers, the label set, the crop store (buildable when synthetic), the
    backbone's weights file (SimCLR: names the pretrain command)."""
    from crc_lightning.data.labels import LabelSet
    from crc_lightning.models.backbone import resolve_imagenet_file
    from crc_lightning.models.classifier import require_simclr_file, simclr_file

    res = config_int(cfg, "res", minimum=1, example=64)
    config_int(cfg, "seed", example=0)
    config_int(cfg, "datamodule.batch_size", minimum=1, example=16)
    LabelSet.from_config(cfg.labels)
    ensure_store(
        cfg.data.store, synthetic_spec(cfg.data), preprocess_command(cfg.data), build=False
    )
    bb, attention = cfg.model.backbone, bool(cfg.model.attention)
    init = str(bb.weights)
    if init == "simclr":
        require_simclr_file(
            simclr_file(bb.weights_file, bb.weights_dir, res, attention), res, attention
        )
    elif init == "imagenet":
        resolve_imagenet_file(str(bb.name), bb.weights_file or bb.get("imagenet_file"))
    elif init != "none":
        raise UsageError(f"`model.backbone.weights={init}`: choose imagenet, simclr or none")


def changed_inputs(stored: Mapping[str, Any], cfg: DictConfig) -> str | None:
    """Why a finished job's ``metrics.json`` no longer describes what this config would train
    (its crop store or backbone weights file changed), or None if it still does."""
    data = stored.get("data") or {}
    if data.get("store_hash") != store_facts(cfg.data.store)["hash"]:
        return "the crop store changed"
    weights = stored.get("weights") or {}
    if weights.get("sha256"):
        path = Path(str(weights.get("file")))
        if not path.is_file() or sha256_file(path) != weights["sha256"]:
            return f"the backbone weights file {path.name} changed"
    return None


def predictions_frame(
    test_index: pd.DataFrame,
    outputs: Mapping[str, torch.Tensor],
    classes: Sequence[str],
    allow_partial: bool = False,
) -> pd.DataFrame:
    """``patient_id,lesion,crop_id,slice,<CLASS>...,p_<CLASS>...`` in test-index order.

    ``outputs["index"]`` are rows of ``test_index``; duplicates (padding of distributed samplers)
    are dropped. Every test crop must have a prediction unless ``allow_partial`` (debug runs that
    limit the test batches).
    """
    rows = outputs["index"].numpy().astype(np.int64)
    _, first = np.unique(rows, return_index=True)
    order = first[np.argsort(rows[first])]
    rows = rows[order]
    if len(rows) != len(test_index) and not allow_partial:
        raise RuntimeError(f"predictions for {len(rows)} of {len(test_index)} test crops")
    prob = outputs["prob"].numpy()[order]
    truth = outputs["target"].numpy()[order].round().astype(np.int64)
    df = test_index.iloc[rows][PRED_ID_COLUMNS].reset_index(drop=True)
    df["patient_id"] = df["patient_id"].astype(str)
    for i, c in enumerate(classes):
        df[c] = truth[:, i]
    for i, c in enumerate(classes):
        df[f"p_{c}"] = prob[:, i]
    return df


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def format_metrics(result: Mapping[str, Any]) -> str:
    """A compact text table of a run's test metrics (no patient ids)."""
    m = result["metrics"]
    head = (
        f"{result['variant']} res={result['res']} seed={result['seed']} labels={result['labels']} "
        f"weights={result['weights']['init']} best_epoch={result['best_epoch']} "
        f"val_loss={_fmt(result['val'].get('loss'))} val_auc={_fmt(result['val'].get('auc'))}"
    )
    lines = [head, f"{'level':<8} {'n':>5} {'AUC':>6} {'F1mac':>6} {'Hamm':>6}"]
    for level, v in m.items():
        lines.append(
            f"{level:<8} {v['n']:>5} {_fmt(v['auc']):>6} {_fmt(v['f1_macro']):>6} "
            f"{_fmt(v['hamming']):>6}"
        )
    lines.append(
        f"{'lesion':<8} {'class':<12} {'F1':>6} {'AUC':>6} {'sens':>6} {'spec':>6} {'n+':>4}"
    )
    for c, v in m["lesion"]["per_class"].items():
        lines.append(
            f"{'':<8} {c:<12} {_fmt(v['f1']):>6} {_fmt(v['auc']):>6} "
            f"{_fmt(v['sensitivity']):>6} {_fmt(v['specificity']):>6} {v['support']:>4}"
        )
    return "\n".join(lines)


def _public_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The settings sent to experiment loggers: plain values only, no paths, no patient ids."""
    return {
        "variant": str(cfg.variant.name),
        "res": int(cfg.res),
        "seed": int(cfg.seed),
        "labels": str(cfg.labels.name),
        "data": str(cfg.data.name),
        "split": {k: v for k, v in OmegaConf.to_container(cfg.split).items() if k != "patients"},
        "weights": str(cfg.model.backbone.weights),
        "attention": bool(cfg.model.attention),
        "optimizer": OmegaConf.to_container(cfg.model.optimizer, resolve=True),
        "batch_size": int(cfg.datamodule.batch_size),
    }


def _best_checkpoint(trainer: Any) -> tuple[str | None, int]:
    """(best checkpoint path or None, its epoch). None when nothing was saved (fast_dev_run)."""
    cb = getattr(trainer, "checkpoint_callback", None)
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    if path and Path(path).is_file():
        epoch = int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
        return path, epoch
    return None, max(int(trainer.current_epoch) - 1, 0)


@task_wrapper
def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, select the best epoch on validation, test it; returns the metrics.json dict."""
    import lightning as L

    from crc_lightning.distributed import finish_job
    from crc_lightning.evaluation.aggregate import evaluate_levels
    from crc_lightning.tracking import log_final_metrics

    validate(cfg)
    ensure_store(cfg.data.store, synthetic_spec(cfg.data), preprocess_command(cfg.data))
    torch.set_flush_denormal(True)
    started = time.monotonic()
    multirun = is_multirun()  # sweeps: no progress bars, one summary line per finished job
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    if bool(cfg.get("resume", True)) and metrics_path.is_file():
        stored = json.loads(metrics_path.read_text())
        changed = changed_inputs(stored, cfg)
        if changed is None:
            log.info("resume: %s exists, job skipped", metrics_path)
            if multirun:
                print(job_summary_line(stored, time.monotonic() - started, "(resumed)"), flush=True)
            return stored
        log.warning("resume: %s since metrics.json was written; training again", changed)

    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.datamodule)
    facts = store_facts(cfg.data.store)
    classes = [str(c) for c in cfg.labels.classes]
    meta = {
        "variant": str(cfg.variant.name),
        "labels": OmegaConf.to_container(cfg.labels, resolve=True),
        "window": {k: float(v) for k, v in plain(cfg.input.window).items()},
        "normalize": {k: float(v) for k, v in plain(cfg.input.normalize).items()},
        "preprocess": facts["params"],
        "data": {"name": str(cfg.data.name), "store_hash": facts["hash"]},
        "seed": int(cfg.seed),
        "package_version": __version__,
    }
    model = instantiate(cfg.model, meta=meta)
    if list(model.class_names) != classes:
        raise ValueError(f"model classes {model.class_names} != label set classes {classes}")

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    track_loggers(loggers)
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and not multirun
    shown, bar = progress_callbacks(bar, f"[{job_label()}]" if multirun else "")
    trainer = instantiate(
        cfg.trainer,
        callbacks=[*callbacks, *shown],
        logger=loggers or False,
        enable_progress_bar=bar,
    )
    for lg in loggers:
        lg.log_hyperparams(_public_hparams(cfg))

    try:
        trainer.fit(model, datamodule=datamodule)
        best_path, best_epoch = _best_checkpoint(trainer)
        val = trainer.validate(model, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        trainer.test(model, datamodule=datamodule, ckpt_path=best_path, verbose=False)
    finally:
        if trainer.world_size > 1:
            finish_job(trainer)  # the next job of a sweep starts without a stale process group

    val_metrics = val[0] if val else {}
    result: dict[str, Any] = {
        "variant": str(cfg.variant.name),
        "res": int(cfg.res),
        "seed": int(cfg.seed),
        "labels": str(cfg.labels.name),
        "classes": classes,
        "split": datamodule.split_summary(),
        "weights": model.weights_info,
        "data": meta["data"],
        "best_epoch": int(best_epoch),
        "val": {
            "loss": _finite(val_metrics.get("val/loss")),
            "auc": _finite(val_metrics.get("val/auc")),
        },
    }
    if trainer.is_global_zero:
        partial = bool(trainer.fast_dev_run) or trainer.limit_test_batches != 1.0
        preds = predictions_frame(datamodule.test_index, model.test_outputs, classes, partial)
        result["metrics"] = evaluate_levels(preds, classes)
        write_atomic(out_dir / "predictions.csv", preds.to_csv(index=False))
        write_json(metrics_path, result)
        log_final_metrics(loggers, result["metrics"], prefix="final/test/")
        if multirun:
            print(job_summary_line(result, time.monotonic() - started), flush=True)
        elif bool(cfg.get("print_metrics", True)):
            print(format_metrics(result))
    return result


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def job_summary_line(result: Mapping[str, Any], seconds: float, note: str = "") -> str:
    """One line for a finished sweep job: its settings, validation and test AUCs, duration."""

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{float(x):.3f}"

    val = result.get("val", {}) or {}
    levels = result.get("metrics", {}) or {}
    tests = " ".join(f"{k}={fmt(v.get('auc'))}" for k, v in levels.items())
    head = " ".join(f"{k}={result[k]}" for k in ("variant", "res", "seed", "labels") if k in result)
    extra = f" {note}" if note else ""
    return (
        f"[{job_label()}] {head}: val auc={fmt(val.get('auc'))} loss={fmt(val.get('loss'))} | "
        f"test auc {tests or '-'} | {seconds:.0f} s{extra}"
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def _hydra_main(cfg: DictConfig) -> float | None:
    result = run(cfg)
    return get_metric_value(result, cfg.get("optimized_metric"))


def main() -> None:
    """Entry point (``python -m crc_lightning.run``): see :func:`crc_lightning.apps._hydra.run_app`."""
    run_app("run", _hydra_main)
