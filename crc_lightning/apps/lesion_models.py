"""The lesion-level members of a ``run`` job: the radiomics model and late fusion, per fold.

``variant=radiomics`` (``variant.deep: false``) trains no deep model: for each fold of the job's
plan (:func:`crc_lightning.apps.run.plan_job`, the same folds as every deep variant of the seed)
the radiomics model (:func:`crc_lightning.models.radiomics.fit`, its hyper-parameters chosen by a
patient-grouped inner CV) is fitted on the fold's **train** patients and predicts its val and test
lesions. Why train only, not train + val: the train side is exactly what the deep model learns its
weights from (the val side only picks its epoch), so the two are compared on the same evidence; and
val predictions stay out-of-sample, which the report's validation-chosen thresholds and the fusion
weight need. Test patients never reach :func:`fit` (the test of ``tests/apps/test_run_radiomics``
checks the rows it is given).

Fusion (``variant=fusion``, or ``variant.fusion: true`` on any deep variant) trains the deep model
per fold exactly as a deep job, fits the same radiomics model on the same fold's train patients,
and fuses per lesion (:mod:`crc_lightning.models.fusion`; ``w`` chosen on the fold's val lesions).

Features come from the crop store's cache (:func:`crc_lightning.cropstore.features.feature_table`):
computed once per case and setting (``radiomics.features``), so the jobs of a seed sweep read a
table in milliseconds. Per fold, each job folder gets ``models/fold<f>/radiomics.skops`` +
``radiomics.json`` (skops, no pickle) and, for fusion, ``models/fold<f>/fusion.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from crc_lightning.apps._hydra import UsageError, plain

log = logging.getLogger(__name__)

__all__ = [
    "MODELS_DIR",
    "RADIOMICS_WEIGHTS",
    "feature_key",
    "fit_fold",
    "fold_val_summary",
    "fuse_fold",
    "lesion_features",
    "uses_radiomics",
    "validate_radiomics",
    "variant_kind",
    "variant_label",
]

MODELS_DIR = "models"  # <job>/models/fold<f>/: radiomics.skops, radiomics.json, fusion.json
RADIOMICS_WEIGHTS = {"init": "radiomics", "file": None, "sha256": None}


def variant_kind(cfg: DictConfig) -> str:
    """``deep`` | ``radiomics`` (no deep model) | ``fusion`` (deep + radiomics, late-fused)."""
    variant = cfg.variant
    deep = bool(variant.get("deep", True))
    fusion = bool(variant.get("fusion", False))
    if not deep and fusion:
        raise UsageError("`variant.fusion=true` needs a deep model: variant.deep is false")
    return "radiomics" if not deep else ("fusion" if fusion else "deep")


def uses_radiomics(cfg: DictConfig) -> bool:
    return variant_kind(cfg) != "deep"


def variant_label(cfg: DictConfig) -> str:
    """The variant name a job records: ``variant.name``; a deep variant fused by option is
    ``<name>+fusion`` so the report never pools it with the plain deep variant."""
    name = str(cfg.variant.name)
    if variant_kind(cfg) == "fusion" and name != "fusion":
        return f"{name}+fusion"
    return name


def validate_radiomics(cfg: DictConfig) -> None:
    """Parse ``radiomics.features`` / ``radiomics.model`` (one clear line on a bad value)."""
    from crc_lightning.models.radiomics import RadiomicsModelConfig
    from crc_lightning.preprocessing.radiomics import RadiomicsParams

    node = cfg.get("radiomics")
    if node is None:
        raise UsageError("variant needs the `radiomics` config node (conf/radiomics/default.yaml)")
    try:
        RadiomicsParams.from_config(plain(node.features))
        RadiomicsModelConfig.from_config(plain(node.model))
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def feature_key(cfg: DictConfig) -> str:
    """The feature cache's settings key of this config and store (changes with the settings and
    the feature library's version)."""
    from crc_lightning.cropstore.features import settings_key
    from crc_lightning.cropstore.format import read_meta
    from crc_lightning.preprocessing.algorithm import PreprocessParams
    from crc_lightning.preprocessing.radiomics import RadiomicsParams

    meta = read_meta(Path(cfg.data.store))
    connectivity = PreprocessParams.from_config(meta.get("params", {})).connectivity
    return settings_key(RadiomicsParams.from_config(plain(cfg.radiomics.features)), connectivity)


def lesion_features(
    cfg: DictConfig, rows: pd.DataFrame, classes: Sequence[str], multirun: bool
) -> tuple[pd.DataFrame, list[str], np.ndarray, dict[str, Any]]:
    """``(lesions, feature columns, labels [n, C], info)``: one row per labelled lesion of the
    job's crop rows (``patient_id, lesion, lesion_uid, ...``), in the rows' order of first
    appearance; the table is built from ``data=``'s cases on first use, then read from the cache."""
    from crc_lightning.cropstore.features import (
        feature_columns,
        feature_library_version,
        feature_table,
        lesion_table,
    )
    from crc_lightning.cropstore.format import GENES, read_meta
    from crc_lightning.data.labels import LabelSet
    from crc_lightning.preprocessing.algorithm import PreprocessParams
    from crc_lightning.sources import load_cases

    store = Path(cfg.data.store)
    node = cfg.radiomics

    def cases() -> list[Any]:
        meta = read_meta(store)
        options = PreprocessParams.from_config(meta.get("params", {})).read_options()
        log.info("radiomics: computing the feature cache of %s (once per case)", store.name)
        return load_cases(plain(cfg.data), tuple(GENES), options)

    table = feature_table(
        store,
        plain(node.features),
        cases,
        n_jobs=int(node.get("n_jobs", 1)),
        progress=bool(node.get("progress", True)) and not multirun,
    )
    labels = LabelSet.from_config(plain(cfg.labels))
    lesions = lesion_table(table, rows, labels.genes)
    if list(labels.classes) != list(classes):
        raise ValueError(f"label set classes {labels.classes} != {list(classes)}")
    y = labels.encode(lesions[list(labels.genes)])
    columns = feature_columns(table)
    info = {
        "settings_key": feature_key(cfg),
        "library": feature_library_version(),
        "n_features": len(columns),
        "n_lesions": len(lesions),
    }
    return lesions, columns, y, info


def fit_fold(
    cfg: DictConfig,
    lesions: pd.DataFrame,
    columns: Sequence[str],
    y: np.ndarray,
    classes: Sequence[str],
    split: Any,
    fold: int,
    out_dir: Path,
) -> dict[str, Any]:
    """Fit the radiomics model on the fold's train patients, save it in ``models/fold<f>/`` and
    predict the fold's val and test lesions (``prediction_frame`` rows with ``fold``)."""
    from crc_lightning.models.radiomics import fit, prediction_frame

    pid = lesions["patient_id"].astype(str).to_numpy()
    side = split.side_of(pid)
    train = side == "train"
    if not train.any():
        raise ValueError(f"fold {fold}: no training lesion for the radiomics model")
    model = fit(
        lesions.loc[train, list(columns)].reset_index(drop=True),
        y[train],
        pid[train],
        classes,
        plain(cfg.radiomics.model),
        seed=int(cfg.seed),
    )
    model.save(out_dir / MODELS_DIR / f"fold{fold}")
    frames = {}
    for name in ("val", "test"):
        m = side == name
        part = lesions.loc[m].reset_index(drop=True)
        proba = model.predict_proba(part[list(columns)]) if m.any() else np.zeros((0, len(classes)))
        frames[name] = prediction_frame(part, y[m], proba, classes, fold)
    return {
        "model": model,
        "val": frames["val"],
        "test": frames["test"],
        "train_patients": sorted(set(pid[train])),
    }


def fold_val_summary(val: pd.DataFrame, classes: Sequence[str]) -> dict[str, float | None]:
    """``{"loss", "auc"}`` of one fold's val lesion predictions: mean binary cross-entropy over
    classes and the macro AUC (the deep jobs' ``val/loss`` and ``val/auc`` at lesion level)."""
    from crc_lightning.evaluation.metrics import level_metrics

    if val.empty:
        return {"loss": None, "auc": None}
    yv = val[list(classes)].to_numpy(dtype=np.float64)
    pv = np.clip(val[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(yv * np.log(pv) + (1 - yv) * np.log(1 - pv)))
    auc = level_metrics(yv.astype(int), pv, list(classes))["auc"]
    return {"loss": loss, "auc": None if auc is None else float(auc)}


def _deep_lesions(frame: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    from crc_lightning.evaluation.aggregate import lesion_level

    if frame.empty:
        return pd.DataFrame(columns=["fold", "patient_id", "lesion", *classes,
                                     *(f"p_{c}" for c in classes)])  # fmt: skip
    out = lesion_level(frame, classes)
    out["patient_id"] = out["patient_id"].astype(str)
    return out


def _pair(deep: pd.DataFrame, rad: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Deep and radiomics lesion rows of the same lesions (the deep rows' lesions, in order)."""
    probs = [f"p_{c}" for c in classes]
    left = _deep_lesions(deep, classes)[["patient_id", "lesion", *classes, *probs]]
    right = rad[["patient_id", "lesion", *probs]].astype({"patient_id": str})
    both = left.merge(right, on=["patient_id", "lesion"], how="left", suffixes=("", "_rad"),
                      validate="one_to_one")  # fmt: skip
    missing = both[[f"{p}_rad" for p in probs]].isna().any(axis=1)
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} deep lesion(s) have no radiomics prediction")
    return both


def fuse_fold(
    deep_val: pd.DataFrame,
    deep_test: pd.DataFrame,
    rad_val: pd.DataFrame,
    rad_test: pd.DataFrame,
    classes: Sequence[str],
    fold: int,
    per_class: bool,
    out_dir: Path,
) -> dict[str, Any]:
    """Choose ``w`` on the fold's val lesions, fuse val and test lesions, write
    ``models/fold<f>/fusion.json``; returns ``{"weights", "val", "test"}`` (lesion frames)."""
    from crc_lightning.io.files import write_json
    from crc_lightning.models.fusion import (
        FUSION_FILE,
        WEIGHT_GRID,
        choose_weights,
        fuse,
        fusion_record,
        weight_scores,
    )
    from crc_lightning.models.radiomics import prediction_frame

    probs = [f"p_{c}" for c in classes]
    rad_probs = [f"{p}_rad" for p in probs]
    val = _pair(deep_val, rad_val, classes)
    y_val = val[list(classes)].to_numpy(dtype=np.int64)
    weights = choose_weights(y_val, val[probs].to_numpy(float), val[rad_probs].to_numpy(float),
                             classes, per_class=per_class)  # fmt: skip
    scores = weight_scores(y_val, val[probs].to_numpy(float), val[rad_probs].to_numpy(float),
                           WEIGHT_GRID)  # fmt: skip
    w = [weights[c] for c in classes]
    out: dict[str, Any] = {"weights": weights}
    for name, deep, rad in (("val", deep_val, rad_val), ("test", deep_test, rad_test)):
        both = _pair(deep, rad, classes)
        fused = fuse(both[probs].to_numpy(float), both[rad_probs].to_numpy(float), w)
        out[name] = prediction_frame(both, both[list(classes)].to_numpy(), fused, classes, fold)
    write_json(
        out_dir / MODELS_DIR / f"fold{fold}" / FUSION_FILE,
        fusion_record(
            weights,
            scores,
            classes,
            fold=int(fold),
            per_class=bool(per_class),
            n_val_lesions=len(val),
            deep_checkpoint=f"checkpoints/fold{fold}/best.ckpt",
            radiomics_model=f"{MODELS_DIR}/fold{fold}",
        ),
    )
    return out
