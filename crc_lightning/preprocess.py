"""``python -m crc_lightning.preprocess``: CT volumes + lesion masks → crop store (Algorithm 1).

A thin Hydra shell over :func:`preprocess`, which tests and notebooks call with a composed config.
Where the cases come from is ``data.kind``: ``synthetic`` (generated once, then reused),
``manifest`` (your cohort CSV), or an OOD source ``lits`` / ``ircadb`` / ``crlm`` (unlabelled,
content duplicates dropped). Patient ids are never logged; the printed summary has counts only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from crc_lightning.io.errors import InputError

log = logging.getLogger(__name__)

OOD_KINDS = ("lits", "ircadb", "crlm")


def _required(cfg: DictConfig, key: str, example: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        value = None
    if value in (None, ""):
        raise InputError(
            None, f"`{key}` is required, e.g. `python -m crc_lightning.preprocess {example}`"
        )
    return value


def load_cases(data: DictConfig, genes: tuple[str, ...]) -> list:
    """The cases named by the ``data`` config group (``crc_lightning.io.cases.Case`` objects)."""
    kind = str(data.kind)
    if kind in ("synthetic", "manifest"):
        from crc_lightning.preprocessing.manifest import read_manifest

        if kind == "synthetic":
            from crc_lightning.data.synthetic import ensure_synthetic_cohort

            syn = data.synthetic
            csv = ensure_synthetic_cohort(
                Path(data.root), int(syn.n_patients), int(syn.seed), float(syn.dicom_fraction)
            )
        else:
            csv = _required(data, "manifest", "data=manifest data.manifest=/path/labels.csv")
        return read_manifest(Path(csv), genes=genes, source=str(data.name))
    if kind in OOD_KINDS:
        from crc_lightning.io import ood

        root = Path(_required(data, "root", f"data={kind} data.root=/path/to/{kind}"))
        cases = getattr(ood, f"iter_{kind}")(root)
        kept, dropped = ood.dedupe_by_content(cases)
        log.info("%s: %d cases, %d content duplicate(s) dropped", kind, len(kept), dropped)
        return list(kept)
    raise InputError(
        None, f"unknown data.kind {kind!r}; expected synthetic, manifest or {OOD_KINDS}"
    )


def class_counts(index, label_cfg) -> dict[str, dict[str, int]]:
    """Crops and lesions per class of the label set (labelled rows only)."""
    from crc_lightning.data.labels import LabelSet

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

    from crc_lightning.data.labels import LabelSet
    from crc_lightning.preprocessing.algorithm import PreprocessParams
    from crc_lightning.preprocessing.store import build_crop_store

    params = PreprocessParams.from_config(OmegaConf.to_container(cfg.preprocess, resolve=True))
    genes = LabelSet.from_config(cfg.labels).genes
    cases = load_cases(cfg.data, genes)
    if not cases:
        raise InputError(None, f"data '{cfg.data.name}' yielded no cases")
    store = Path(cfg.data.store)
    summary = build_crop_store(
        cases, store, params, n_jobs=int(cfg.n_jobs), progress=bool(cfg.progress)
    )
    summary["per_class"] = class_counts(pd.read_parquet(store / "index.parquet"), cfg.labels)
    print(format_summary(str(cfg.data.name), store, summary))
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
def main(cfg: DictConfig) -> None:
    preprocess(cfg)


if __name__ == "__main__":
    main()
