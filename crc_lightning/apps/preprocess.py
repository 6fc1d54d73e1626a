"""``python -m crc_lightning.preprocess``: CT volumes + lesion masks → crop store (Algorithm 1).

A thin Hydra shell over :func:`preprocess`, which tests and notebooks call with a composed config.
Where the cases come from is ``data.kind`` (the :data:`crc_lightning.sources.SOURCES` registry):
``synthetic`` (generated once, then reused), ``manifest`` (your cohort CSV), or an OOD source
``lits`` / ``ircadb`` / ``crlm`` (unlabelled, content duplicates dropped). Patient ids are never
logged; the printed summary has counts only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from crc_lightning.apps._hydra import CONF_DIR, plain, run_app
from crc_lightning.cropstore.format import INDEX_FILE
from crc_lightning.data.labels import LabelSet
from crc_lightning.io.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["class_counts", "format_summary", "main", "preprocess"]


def class_counts(index, label_cfg) -> dict[str, dict[str, int]]:
    """Crops and lesions per class of the label set (labelled rows only)."""
    labels = LabelSet.from_config(label_cfg)
    genes = list(labels.genes)
    missing = [g for g in genes if g not in index.columns]
    if missing:
        raise InputError(None, f"label set {labels.name!r} needs gene columns {missing}")
    labelled = index.dropna(subset=genes)
    out: dict[str, dict[str, int]] = {"crops": {}, "lesions": {}}
    if labelled.empty:
        return out
    crops = labels.encode(labelled[genes].astype(int))
    lesions_df = labelled.drop_duplicates("lesion_uid")
    lesions = labels.encode(lesions_df[genes].astype(int))
    for i, name in enumerate(labels.classes):
        out["crops"][name] = int(crops[:, i].sum())
        out["lesions"][name] = int(lesions[:, i].sum())
    return out


def format_summary(name: str, store: Path, summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"crop store '{name}': {store}",
        f"  patients {s['patients']}  cases {s['cases']} ({s['computed']} computed, "
        f"{s['reused']} reused)",
        f"  lesions {s['lesions']} (found {s['lesions_found']}, without crops "
        f"{s['lesions_without_crops']}, unlabelled {s['lesions_unlabelled']})",
        f"  crops {s['crops']}  dropped slices {s['dropped_slices']}",
    ]
    if s.get("masks_resampled") or s.get("images_resampled_for_tilt"):
        lines.append(
            f"  resampled: {s.get('masks_resampled', 0)} mask(s) onto their image grid, "
            f"{s.get('images_resampled_for_tilt', 0)} gantry-tilted image(s)"
        )
    per_class = s.get("per_class", {})
    if per_class.get("crops"):
        lines.append("  class        lesions   crops")
        for c, n in per_class["crops"].items():
            lines.append(f"  {c:<12} {per_class['lesions'][c]:>7} {n:>7}")
    else:
        lines.append("  (unlabelled source: no class counts)")
    return "\n".join(lines)


def preprocess(cfg: DictConfig) -> dict[str, Any]:
    """Build (or update) the crop store ``cfg.data.store`` and return its summary."""
    import pandas as pd

    from crc_lightning.cropstore.writer import build_crop_store
    from crc_lightning.preprocessing.algorithm import PreprocessParams
    from crc_lightning.sources import load_cases

    params = PreprocessParams.from_config(plain(cfg.preprocess))
    genes = LabelSet.from_config(cfg.labels).genes
    cases = load_cases(plain(cfg.data), genes, params.read_options())
    store = Path(cfg.data.store)
    summary = build_crop_store(
        cases, store, params, n_jobs=int(cfg.n_jobs), progress=bool(cfg.progress)
    )
    summary["per_class"] = class_counts(pd.read_parquet(store / INDEX_FILE), cfg.labels)
    print(format_summary(str(cfg.data.name), store, summary))
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="preprocess")
def _hydra_main(cfg: DictConfig) -> None:
    preprocess(cfg)


def main() -> None:
    run_app("preprocess", _hydra_main)
