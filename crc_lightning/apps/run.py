"""``python -m crc_lightning.run``: train the mutation classifier on every fold of one seed's split,
test each fold's best epoch, pool the out-of-fold predictions.

A thin Hydra shell over :func:`run`, which tests call with a composed config. One job:

1. plan its folds (``split=``; :func:`crc_lightning.data.splits.plan_folds`): ``cv`` (default) the
   ``split.n_splits`` folds of the seed's patient-grouped stratified k-fold, so every patient is
   tested once; ``holdout`` the paper's one 90/10 split; ``kfold`` fold ``split.fold`` of the ``cv``
   partition (one fold per job, for clusters); or the folds of ``split.file=<splits.json>``. A SimCLR
   backbone whose pretraining pool holds one of the job's test patients is refused;
2. per fold: seed everything (``seed``), the datamodule on that fold, a fresh classifier; fit with
   early stopping on the fold's inner validation (``val/loss``), keep the best epoch
   (``checkpoints/fold<f>/best.ckpt``), re-validate and test that *best* checkpoint;
3. write ``predictions.csv`` (every test crop, with its fold), ``val_predictions.csv`` (each fold's
   inner-validation crops, by that fold's best checkpoint), ``splits.json`` (patient ids per side
   and fold: a local file, never logged) and ``metrics.json`` (metrics of the pooled out-of-fold
   test predictions, per-fold validation, the split summary, config hash and package version),
   README "What each stage writes"; print the metrics.

Lesion-level variants (:mod:`crc_lightning.apps.lesion_models`): ``variant=radiomics`` replaces
step 2 by the radiomics model fitted on each fold's train patients (``models/fold<f>/``) and writes
one row per lesion (``crop_id``/``slice`` empty); ``variant=fusion`` (or ``variant.fusion=true``)
runs step 2 and then fits the same radiomics model per fold and late-fuses per lesion, ``w`` chosen
on the fold's val lesions (``models/fold<f>/fusion.json``, ``metrics.json`` ``fusion``); its
``predictions.csv`` / ``val_predictions.csv`` are the fused lesion rows, and each member's own rows
are kept beside them (``predictions_deep.csv``, ``predictions_radiomics.csv``, ``val_…``).

Under DDP (``trainer=ddp|ddp_sim``) the child rank runs the same folds in step; the process group
lives for the whole job. A sweep re-run (``resume=true``) returns a finished job's stored metrics
unless its resolved config, the package version, the crop store, the backbone weights file or the
split file changed since (:func:`changed_inputs`). Nothing identifying (patient ids, paths, images)
is sent to experiment loggers: only the plain settings below and the epoch metrics (``fold<f>-``
prefixed when a job trains several folds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
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
from crc_lightning.apps.callbacks import check_optimized_metric
from crc_lightning.apps.lesion_models import (
    RADIOMICS_WEIGHTS,
    feature_key,
    fit_fold,
    fold_val_summary,
    fuse_fold,
    lesion_features,
    validate_radiomics,
    variant_kind,
    variant_label,
)
from crc_lightning.apps.preprocess import ensure_store, preprocess_command, synthetic_spec
from crc_lightning.apps.progress import progress_callbacks
from crc_lightning.cropstore.format import store_facts
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import sha256_file, write_atomic, write_json

log = logging.getLogger(__name__)

__all__ = [
    "changed_inputs",
    "config_hash",
    "format_metrics",
    "job_summary_line",
    "main",
    "plan_job",
    "predictions_frame",
    "run",
    "validate",
]

PRED_ID_COLUMNS = ["patient_id", "lesion", "crop_id", "slice"]
# left out of config_hash: where things are, how the run is shown, what a sweeper reads
HASH_SKIP_TOP = ("paths", "hydra", "logger", "resume", "print_metrics", "optimized_metric",
                 "optimized_mode")  # fmt: skip
HASH_SKIP_KEYS = frozenset({"enable_progress_bar", "enable_model_summary", "log_every_n_steps"})
_PATH_KEY = re.compile(r"(^|_)(path|file|dir|dirpath|root|store|manifest)s?($|_)")


def validate(cfg: DictConfig) -> None:
    """Checks of a run config before any work or folder (Hydra callback ``ValidateConfig``, and
    :func:`run` itself): the optimised metric (validation only), numbers, the label set, the crop store (buildable when synthetic), the
    backbone's weights file (SimCLR: names the pretrain command)."""
    from crc_lightning.data.labels import LabelSet
    from crc_lightning.models.backbone import resolve_imagenet_file
    from crc_lightning.models.classifier import require_simclr_file, simclr_file

    check_optimized_metric(cfg.get("optimized_metric"), cfg.get("optimized_mode", "max"))
    res = config_int(cfg, "res", minimum=1, example=64)
    config_int(cfg, "seed", example=0)
    config_int(cfg, "datamodule.batch_size", minimum=1, example=16)
    LabelSet.from_config(cfg.labels)
    ensure_store(
        cfg.data.store, synthetic_spec(cfg.data), preprocess_command(cfg.data), build=False
    )
    kind = variant_kind(cfg)
    if kind != "deep":
        validate_radiomics(cfg)
    if kind == "radiomics":
        return  # no backbone
    _validate_recipe(cfg)
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


def _validate_recipe(cfg: DictConfig) -> None:
    """The training-recipe knobs (README "Training recipe"): one line each when unusable."""
    from crc_lightning.data.datamodule import SAMPLING as sampling
    from crc_lightning.models.classifier import check_lr_schedule as check_schedule

    chosen = str(cfg.datamodule.get("sampling", "image"))
    if chosen not in sampling:
        raise UsageError(f"`datamodule.sampling={chosen}`: choose one of {', '.join(sampling)}")
    smoothing = float(cfg.model.get("label_smoothing", 0.0) or 0.0)
    if not 0.0 <= smoothing < 1.0:
        raise UsageError(f"`model.label_smoothing={smoothing}`: must be in [0, 1)")
    try:
        schedule = check_schedule(plain(cfg.model.get("lr_schedule")))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if schedule["name"] != "constant" and cfg.model.get("scheduler") is not None:
        raise UsageError(
            f"model.lr_schedule.name={schedule['name']} and model.scheduler both set: keep one"
        )


def _drop_paths(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {
            str(k): _drop_paths(v)
            for k, v in node.items()
            if not _PATH_KEY.search(str(k)) and str(k) not in HASH_SKIP_KEYS
        }
    if isinstance(node, list):
        return [_drop_paths(v) for v in node]
    return node


def _unused_by(kind: str) -> tuple[str, ...]:
    """Top-level nodes that cannot change the numbers of a job of this kind: a deep job never
    reads ``radiomics``; a radiomics job trains no network (model, trainer, callbacks, input)."""
    if kind == "deep":
        return ("radiomics",)
    if kind == "radiomics":
        return ("model", "trainer", "callbacks", "input")
    return ()


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the job's resolved config without paths, Hydra/launcher, logger and display keys.

    What it leaves out cannot change the numbers, or is checked by content instead (the crop store's
    and the weights file's hashes): moving the data or the output folder keeps the hash. Nodes the
    job's variant never reads are left out too (:func:`_unused_by`), and ``variant.fusion: false``
    (the default of the deep variants), so a deep job's hash is the one it had before fusion;
    likewise the recipe knobs at the paper's values (:func:`_drop_paper_recipe`).
    """
    kind = variant_kind(cfg)
    skip = (*HASH_SKIP_TOP, *_unused_by(kind))
    tree = {str(k): _drop_paths(plain(cfg[k])) for k in cfg if str(k) not in skip}
    if kind == "deep" and isinstance(tree.get("variant"), dict):
        tree["variant"] = {k: v for k, v in tree["variant"].items() if k != "fusion"}
    _drop_paper_recipe(tree)
    if kind == "radiomics" and isinstance(tree.get("datamodule"), dict):
        tree["datamodule"] = {"exclude_patients": tree["datamodule"].get("exclude_patients")}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def _drop_paper_recipe(tree: dict[str, Any]) -> None:
    """Leave the training-recipe knobs out of the hash while they hold the paper's values (constant
    lr, no label smoothing, image sampling), so jobs finished before the knobs existed resume."""
    model, dm = tree.get("model"), tree.get("datamodule")
    if isinstance(model, dict):
        if (model.get("lr_schedule") or {}).get("name", "constant") == "constant":
            model.pop("lr_schedule", None)
        if not model.get("label_smoothing"):
            model.pop("label_smoothing", None)
    if isinstance(dm, dict) and dm.get("sampling", "image") == "image":
        dm.pop("sampling", None)


def changed_inputs(stored: Mapping[str, Any], cfg: DictConfig, job_hash: str) -> str | None:
    """Why a finished job's ``metrics.json`` no longer describes what this config would train (its
    resolved config, the package version, its crop store, backbone weights file or split file
    changed), or None if it still does."""
    if stored.get("config_hash") != job_hash:
        return (
            "the job's resolved config changed"
            if stored.get("config_hash")
            else ("metrics.json records no config hash (written by an older version)")
        )
    if stored.get("package_version") != __version__:
        return f"the package version changed ({stored.get('package_version')} → {__version__})"
    data = stored.get("data") or {}
    if data.get("store_hash") != store_facts(cfg.data.store)["hash"]:
        return "the crop store changed"
    weights = stored.get("weights") or {}
    if weights.get("sha256"):
        path = Path(str(weights.get("file")))
        if not path.is_file() or sha256_file(path) != weights["sha256"]:
            return f"the backbone weights file {path.name} changed"
    features = (stored.get("radiomics") or {}).get("settings_key")
    if features and features != feature_key(cfg):
        return "the radiomics feature settings or library version changed"
    split_file = cfg.split.get("file")
    path = Path(str(split_file)) if split_file else None
    digest = sha256_file(path) if path is not None and path.is_file() else None
    if digest != (stored.get("split") or {}).get("file_sha256"):
        return "split.file was given, removed or changed"
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
    limit the test batches; no outputs at all then give an empty table).
    """
    if not outputs and allow_partial:
        return pd.DataFrame(columns=[*PRED_ID_COLUMNS, *classes, *(f"p_{c}" for c in classes)])
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


def _protocol_label(result: Mapping[str, Any]) -> str:
    split = result.get("split") or {}
    protocol = result.get("protocol", split.get("mode", "?"))
    if protocol == "cv":
        return f"cv k={split.get('n_splits')}"
    if protocol == "kfold":
        return f"kfold fold={split.get('fold')}/{split.get('n_splits')}"
    return str(protocol)


def format_metrics(result: Mapping[str, Any]) -> str:
    """A compact text table of a run's test metrics (no patient ids)."""
    m = result["metrics"]
    head = (
        f"{result['variant']} res={result['res']} seed={result['seed']} labels={result['labels']} "
        f"{_protocol_label(result)} weights={result['weights']['init']} "
        f"best_epoch={result['best_epoch']} val_loss={_fmt(result['val'].get('loss'))} "
        f"val_auc={_fmt(result['val'].get('auc'))}"
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
    split = OmegaConf.to_container(cfg.split, resolve=True)
    return {
        "variant": str(cfg.variant.name),
        "res": int(cfg.res),
        "seed": int(cfg.seed),
        "labels": str(cfg.labels.name),
        "data": str(cfg.data.name),
        "split": {k: v for k, v in split.items() if k not in ("patients", "file")},
        "weights": str(cfg.model.backbone.weights),
        "attention": bool(cfg.model.attention),
        "optimizer": OmegaConf.to_container(cfg.model.optimizer, resolve=True),
        "batch_size": int(cfg.datamodule.batch_size),
        "lr_schedule": plain(cfg.model.get("lr_schedule")),
        "label_smoothing": float(cfg.model.get("label_smoothing", 0.0) or 0.0),
        "sampling": str(cfg.datamodule.get("sampling", "image")),
    }


def _best_checkpoint(trainer: Any) -> tuple[str | None, int]:
    """(best checkpoint path or None, its epoch). None when nothing was saved (fast_dev_run)."""
    cb = getattr(trainer, "checkpoint_callback", None)
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    if path and Path(path).is_file():
        epoch = int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
        return path, epoch
    return None, max(int(trainer.current_epoch) - 1, 0)


# ------------------------------------------------------------------------------ the job's folds
def plan_job(cfg: DictConfig) -> tuple[Any, pd.DataFrame]:
    """(:class:`~crc_lightning.data.splits.FoldPlan`, the labelled crop rows it splits): the same
    rows and split function as the datamodule, stratified on the five-gene matrix."""
    from crc_lightning.cropstore.reader import CropStore
    from crc_lightning.data.datamodule import labelled_rows
    from crc_lightning.data.labels import LabelSet
    from crc_lightning.data.splits import gene_matrix, plan_folds

    store = CropStore(cfg.data.store)
    exclude = [str(p) for p in (cfg.datamodule.get("exclude_patients") or [])]
    rows = labelled_rows(store, LabelSet.from_config(plain(cfg.labels)), exclude)
    try:
        plan = plan_folds(plain(cfg.split), gene_matrix(rows), int(cfg.seed))
    except InputError:
        raise
    except ValueError as e:
        raise InputError(store.path, f"cannot split its patients: {e}") from e
    return plan, rows


def check_simclr_pool(cfg: DictConfig, plan: Any, rows: pd.DataFrame) -> None:
    """Refuse a SimCLR backbone whose pretraining pool holds one of this job's test patients
    (the checkpoint's salted patient hashes, :func:`~crc_lightning.models.simclr.pool_record`)."""
    if str(cfg.model.backbone.weights) != "simclr":
        return
    from crc_lightning.models.classifier import simclr_file
    from crc_lightning.models.simclr import patient_key, pool_overlap, read_simclr_meta

    bb = cfg.model.backbone
    path = simclr_file(bb.get("weights_file"), bb.get("weights_dir"), int(cfg.res),
                       bool(cfg.model.attention))  # fmt: skip
    if path is None or not path.is_file():
        return  # the classifier's own error names the command that makes it
    tested = rows[rows["patient_id"].isin(plan.test_patients())]
    sources = tested["source"] if "source" in tested.columns else pd.Series("", index=tested.index)
    keys = {patient_key(s, p) for s, p in zip(sources, tested["patient_id"], strict=True)}
    held = pool_overlap(read_simclr_meta(path), keys)
    if held is None:
        log.warning(
            "SimCLR checkpoint %s records no pretraining pool: cannot check that it never saw this "
            "job's test patients (re-export it with this version's pretrain app)",
            path.name,
        )
    elif held:
        raise InputError(
            path,
            f"refused: its SimCLR pretraining pool holds {held} of this job's {len(keys)} test "
            "patients (the target cohort was in the OOD pool). Pretrain again with "
            "exclude_test_of.store=<this job's data.store> (drops its labelled patients), or "
            "without this cohort in ood / ood_stores.",
        )


def _set_log_prefix(loggers: Sequence[Any], prefix: str) -> None:
    """Prefix the epoch metrics of one fold (``fold2-val/loss``) when a job trains several, so
    fold 2's epoch 0 does not overwrite fold 1's. Lightning's loggers take ``prefix=`` only in
    their constructor and keep it in ``_prefix``; the W&B run (one per job) must not be rebuilt."""
    for lg in loggers:
        if hasattr(lg, "_prefix"):
            lg._prefix = prefix


def _fold_frame(frame: pd.DataFrame, fold: int) -> pd.DataFrame:
    out = frame.copy()
    out.insert(len(PRED_ID_COLUMNS), "fold", int(fold))
    return out


def _train_fold(
    cfg: DictConfig,
    fold: int,
    split: Any,
    meta: dict[str, Any],
    loggers: list,
    trainers: list,
    multirun: bool,
    several: bool = False,
) -> dict[str, Any]:
    """Fit one fold, re-validate and test its best checkpoint (every rank); the fold's trainer is
    appended to ``trainers`` as soon as it exists (the first one starts the DDP child ranks)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(int(cfg.seed), workers=True)  # fold f of a cv job = the kfold job of fold f
    datamodule = instantiate(cfg.datamodule, _partial_=True)(split=split)
    model = instantiate(cfg.model, meta={**meta, "fold": int(fold)})
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            cb.dirpath = str(Path(cb.dirpath) / f"fold{fold}")
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and not multirun
    label = f"[{job_label()}]" if multirun else ""
    shown, bar = progress_callbacks(bar, f"{label}[fold {fold}]" if several else label)
    trainer = instantiate(
        cfg.trainer, callbacks=[*callbacks, *shown], logger=loggers or False,
        enable_progress_bar=bar,
    )  # fmt: skip
    trainers.append(trainer)
    trainer.fit(model, datamodule=datamodule)
    best_path, best_epoch = _best_checkpoint(trainer)
    val = trainer.validate(model, datamodule=datamodule, ckpt_path=best_path, verbose=False)
    trainer.test(model, datamodule=datamodule, ckpt_path=best_path, verbose=False)
    val_metrics = val[0] if val else {}
    info = {
        "fold": int(fold),
        "best_epoch": int(best_epoch),
        "val": {
            "loss": _finite(val_metrics.get("val/loss")),
            "auc": _finite(val_metrics.get("val/auc")),
        },
        "n_train_patients": len(split.train),
        "n_val_patients": len(split.val),
        "n_test_patients": len(split.test),
    }
    return {"info": info, "trainer": trainer, "model": model, "datamodule": datamodule}


def _mean_defined(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


@task_wrapper
def run(cfg: DictConfig) -> dict[str, Any]:
    """Train every fold of the job, test each best epoch; returns the metrics.json dict."""
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
    job_hash = config_hash(cfg)
    if bool(cfg.get("resume", True)) and metrics_path.is_file():
        stored = json.loads(metrics_path.read_text(encoding="utf-8"))
        changed = changed_inputs(stored, cfg, job_hash)
        if changed is None:
            log.info("resume: %s exists, job skipped", metrics_path)
            if multirun:
                print(job_summary_line(stored, time.monotonic() - started, "(resumed)"), flush=True)
            return stored
        log.warning("resume: %s since metrics.json was written; training again", changed)

    plan, rows = plan_job(cfg)
    kind = variant_kind(cfg)
    if kind != "radiomics":
        check_simclr_pool(cfg, plan, rows)
    facts = store_facts(cfg.data.store)
    classes = [str(c) for c in cfg.labels.classes]
    variant = variant_label(cfg)
    meta = {
        "variant": variant,
        "labels": OmegaConf.to_container(cfg.labels, resolve=True),
        "window": {k: float(v) for k, v in plain(cfg.input.window).items()},
        "normalize": {k: float(v) for k, v in plain(cfg.input.normalize).items()},
        "preprocess": facts["params"],
        "data": {"name": str(cfg.data.name), "store_hash": facts["hash"]},
        "spacing": facts["spacing"],  # the training CTs' voxel spacing range: predict warns outside
        "seed": int(cfg.seed),
        "protocol": plan.protocol,
        "n_splits": plan.n_splits,
        "config_hash": job_hash,
        "package_version": __version__,
    }
    lesions = None
    if kind != "deep":  # the feature cache: built by the first job of a sweep, read by the others
        lesions = lesion_features(cfg, rows, classes, multirun)

    loggers = instantiate_loggers(cfg.get("logger"))
    track_loggers(loggers)
    for lg in loggers:
        lg.log_hyperparams(_public_hparams(cfg))
    if kind == "radiomics":
        jobs = _radiomics_folds(cfg, plan, lesions, classes, out_dir)
    else:
        jobs = _deep_folds(cfg, plan, meta, classes, loggers, multirun, out_dir, lesions)
    folds, tests, vals = jobs["folds"], jobs["tests"], jobs["vals"]
    is_zero, partial = jobs["is_zero"], jobs["partial"]
    epochs = [f["best_epoch"] for f in folds if f["best_epoch"] is not None]

    result: dict[str, Any] = {
        "variant": variant,
        "res": int(cfg.res),
        "seed": int(cfg.seed),
        "labels": str(cfg.labels.name),
        "classes": classes,
        "protocol": plan.protocol,
        "split": plan.summary(),
        "folds": folds,
        "weights": jobs["weights"],
        "data": meta["data"],
        # one fold: its best epoch; several: the median over folds (each fold's is in "folds");
        # radiomics: none (no epochs)
        "best_epoch": int(np.median(epochs)) if epochs else None,
        # inner validation at the best epoch; several folds: the mean over folds (selection)
        "val": {k: _mean_defined([f["val"][k] for f in folds]) for k in ("loss", "auc")},
    }
    if lesions is not None:
        result["radiomics"] = {**lesions[3], "fit_on": "train"}
    if kind == "fusion":
        result["fusion"] = jobs["fusion"]
    result["config_hash"] = job_hash
    result["package_version"] = __version__
    if is_zero:
        preds = pd.concat(tests, ignore_index=True)
        tested = set(preds["patient_id"])
        if not partial and tested != set(plan.test_patients()):
            raise RuntimeError(
                f"pooled predictions cover {len(tested)} patients, the folds test "
                f"{len(plan.test_patients())}"
            )
        if plan.protocol == "cv" and not partial and _tested_twice(preds):
            raise RuntimeError("a crop (or lesion) was tested in two folds")
        result["metrics"] = evaluate_levels(preds, classes)
        write_atomic(out_dir / "predictions.csv", preds.to_csv(index=False))
        write_atomic(
            out_dir / "val_predictions.csv",
            pd.concat(vals, ignore_index=True).to_csv(index=False),
        )
        for name, frames in jobs.get("members", {}).items():  # fusion: each member's own rows
            write_atomic(out_dir / name, pd.concat(frames, ignore_index=True).to_csv(index=False))
        write_json(out_dir / "splits.json", plan.document())
        write_json(metrics_path, result)  # last: its presence marks the job finished
        log_final_metrics(loggers, result["metrics"], prefix="final/test/")
        if multirun:
            print(job_summary_line(result, time.monotonic() - started), flush=True)
        elif bool(cfg.get("print_metrics", True)):
            print(format_metrics(result))
    return result


def _tested_twice(preds: pd.DataFrame) -> bool:
    """A crop row (``crop_id``) or a lesion row (lesion-level variants: ``crop_id`` empty) that
    appears twice among the pooled test rows."""
    crops = preds["crop_id"].notna()
    lesions = preds.loc[~crops, ["patient_id", "lesion"]]
    return bool(preds.loc[crops, "crop_id"].duplicated().any() or lesions.duplicated().any())


def _radiomics_folds(
    cfg: DictConfig, plan: Any, lesions: tuple, classes: list[str], out_dir: Path
) -> dict[str, Any]:
    """``variant=radiomics``: per fold, fit on its train patients, predict its val/test lesions."""
    table, columns, y, _ = lesions
    folds, tests, vals = [], [], []
    for fold, split in plan.folds:
        done = fit_fold(cfg, table, columns, y, classes, split, fold, out_dir)
        folds.append(
            {
                "fold": int(fold),
                "best_epoch": None,
                "val": fold_val_summary(done["val"], classes),
                "n_train_patients": len(split.train),
                "n_val_patients": len(split.val),
                "n_test_patients": len(split.test),
            }
        )
        tests.append(done["test"])
        vals.append(done["val"])
        log.info("fold %d: radiomics model fitted on %d patients, val %s", fold,
                 len(done["train_patients"]), folds[-1]["val"])  # fmt: skip
    return {"folds": folds, "tests": tests, "vals": vals, "weights": dict(RADIOMICS_WEIGHTS),
            "is_zero": True, "partial": False}  # fmt: skip


def _deep_folds(
    cfg: DictConfig,
    plan: Any,
    meta: dict[str, Any],
    classes: list[str],
    loggers: list,
    multirun: bool,
    out_dir: Path,
    lesions: tuple | None = None,
) -> dict[str, Any]:
    """Train every fold's deep model; with ``lesions`` (fusion) also fit the fold's radiomics
    model on the same train patients and fuse per lesion."""
    from crc_lightning.distributed import finish_job

    several = len(plan.trained) > 1
    folds, tests, vals, weights_info = [], [], [], None
    members: dict[str, list] = {}
    fusion: dict[str, dict[str, float]] = {}
    trainers: list = []  # one per fold; under DDP the first one started the child ranks
    is_zero, partial = True, False
    try:
        for fold, split in plan.folds:
            if several:
                _set_log_prefix(loggers, f"fold{fold}")
                log.info("fold %d of %d (%s)", fold + 1, plan.n_splits, plan.protocol)
            done = _train_fold(cfg, fold, split, meta, loggers, trainers, multirun, several)
            trainer, model, dm = done["trainer"], done["model"], done["datamodule"]
            is_zero = bool(trainer.is_global_zero)
            if list(model.class_names) != classes:
                raise ValueError(
                    f"model classes {model.class_names} != label set classes {classes}"
                )
            weights_info = model.weights_info
            folds.append(done["info"])
            if is_zero:
                partial = bool(trainer.fast_dev_run) or trainer.limit_test_batches != 1.0
                val_partial = partial or trainer.limit_val_batches != 1.0
                test = _fold_frame(
                    predictions_frame(dm.test_index, model.test_outputs, classes, partial), fold
                )
                val = _fold_frame(
                    predictions_frame(dm.val_index, model.val_outputs, classes, val_partial), fold
                )
                if lesions is None:
                    tests.append(test)
                    vals.append(val)
                else:
                    table, columns, y, _ = lesions
                    rad = fit_fold(cfg, table, columns, y, classes, split, fold, out_dir)
                    per_class = bool(cfg.radiomics.fusion.get("per_class", False))
                    fused = fuse_fold(val, test, rad["val"], rad["test"], classes, fold,
                                      per_class, out_dir)  # fmt: skip
                    tests.append(fused["test"])
                    vals.append(fused["val"])
                    fusion[str(fold)] = fused["weights"]
                    for name, frame in (("predictions_deep.csv", test),
                                        ("val_predictions_deep.csv", val),
                                        ("predictions_radiomics.csv", rad["test"]),
                                        ("val_predictions_radiomics.csv", rad["val"])):  # fmt: skip
                        members.setdefault(name, []).append(frame)
                    log.info("fold %d: fusion weights (deep share) %s", fold, fused["weights"])
            log.info("fold %d: best epoch %d, val %s", fold, done["info"]["best_epoch"],
                     done["info"]["val"])  # fmt: skip
    finally:
        _set_log_prefix(loggers, "")
        if trainers and trainers[0].world_size > 1:
            finish_job(trainers[0])  # the next job of a sweep starts without a stale group
    return {"folds": folds, "tests": tests, "vals": vals, "weights": weights_info,
            "is_zero": is_zero, "partial": partial, "members": members,
            "fusion": fusion}  # fmt: skip


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
        f"[{job_label()}] {head} {_protocol_label(result)}: val auc={fmt(val.get('auc'))} "
        f"loss={fmt(val.get('loss'))} | test auc {tests or '-'} | {seconds:.0f} s{extra}"
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def _hydra_main(cfg: DictConfig) -> float | None:
    result = run(cfg)
    return get_metric_value(result, cfg.get("optimized_metric"))


def main() -> None:
    """Entry point (``python -m crc_lightning.run``): see :func:`crc_lightning.apps._hydra.run_app`."""
    run_app("run", _hydra_main)
