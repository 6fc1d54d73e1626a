"""The crop-store format: file names, index columns, gene columns and the store's identity.

A crop store is a folder, the only input of ``pretrain`` and ``run``:

* ``cases/<case_hash>.npz`` — the crops of one case (int16 HU, square) plus a :data:`META_KEY` JSON
  string with the per-crop facts, so a re-run can rebuild the index without reading any CT;
  ``case_hash`` = sha256 over (input file bytes, mask rule, parameters, package version);
* :data:`INDEX_FILE` — one row per crop (:data:`INDEX_COLUMNS` + one 0/1 column per gene);
* :data:`META_FILE` — parameters, the canonical orientation of every array, the CTs' voxel spacing
  distribution, input hashes per case, package version, creation time, summary;
* while a sharded build is under way, ``shards/part-<i>-of-<n>.json`` (:func:`part_file`): one per
  finished shard, the outcomes of its cases (hashes, crop metadata, labels), merged into the index
  and removed by ``merge_shards`` (:mod:`.writer`);
* :data:`FEATURES_DIR` ``/<settings_key>/`` — radiomics features of the store's lesions for one set
  of feature settings (:mod:`.features`): :data:`FEATURE_CASES_DIR` ``/<case_hash>.parquet`` (one
  case's lesions, resumable cache), :data:`FEATURES_FILE` (all of them) and
  :data:`FEATURES_META_FILE` (settings, library version, the case hashes it was built from).

This module is the only place these names are spelled; the writer (:mod:`.writer`) and the reader
(:mod:`.reader`) and everything above them go through it. The store's identity is the sha256 of its
index: case files are content-addressed and named in the index, so the index bytes identify the
whole store (:func:`store_hash`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crc_lightning.io.errors import InputError
from crc_lightning.io.files import sha256_file
from crc_lightning.sources.manifest import GENES

__all__ = [
    "BUILD_HINT",
    "CASES_DIR",
    "FEATURES_DIR",
    "FEATURES_FILE",
    "FEATURES_FORMAT",
    "FEATURES_META_FILE",
    "FEATURE_CASES_DIR",
    "FEATURE_ID_COLUMNS",
    "GENES",
    "INDEX_COLUMNS",
    "INDEX_FILE",
    "META_FILE",
    "META_KEY",
    "PART_GLOB",
    "SHARDS_DIR",
    "STORE_FORMAT",
    "case_file",
    "feature_case_file",
    "features_dir",
    "is_store",
    "part_file",
    "read_meta",
    "store_facts",
    "store_hash",
]

# bump when the layout or the meaning of a crop changes (2: window left out; 3: crops in the canonical
# radiological orientation, explicit lesion rule, SEG lesion ids = segment numbers)
STORE_FORMAT = 3
INDEX_FILE = "index.parquet"
META_FILE = "store.json"
CASES_DIR = "cases"
SHARDS_DIR = "shards"
PART_GLOB = "part-*-of-*.json"
META_KEY = "__meta__"
# GENES (the manifest's gene columns) come first in the index; a cohort's own extra genes follow
INDEX_COLUMNS: tuple[str, ...] = (
    "crop_id",
    "patient_id",
    "lesion",
    "lesion_uid",
    "slice",
    "area_mm2",
    "spacing_y",
    "spacing_x",
    "size_px",
    "source",
    "case_file",
    "feature_case_file",
    "features_dir",
    "key",
)
# radiomics features (one folder per settings key, beside the crops)
FEATURES_FORMAT = 1  # bump when the feature table's layout or meaning changes
FEATURES_DIR = "radiomics"
FEATURE_CASES_DIR = "cases"
FEATURES_FILE = "features.parquet"
FEATURES_META_FILE = "features.json"
FEATURE_ID_COLUMNS: tuple[str, ...] = ("patient_id", "lesion", "lesion_uid", "source")
BUILD_HINT = "build it with `python -m crc_lightning.preprocess data=<synthetic|manifest|lits|...>`"


def case_file(case_hash: str) -> str:
    """The index's ``case_file`` value (relative to the store) of a case."""
    return f"{CASES_DIR}/{case_hash}.npz"


def part_file(shard: int, shards: int) -> str:
    """The part file (relative to the store) that shard ``shard`` of ``shards`` writes."""
    return f"{SHARDS_DIR}/part-{int(shard):04d}-of-{int(shards):04d}.json"


def features_dir(store_dir: str | Path, settings_key: str) -> Path:
    """The folder of one feature-settings key inside a crop store."""
    return Path(store_dir) / FEATURES_DIR / settings_key


def feature_case_file(store_dir: str | Path, settings_key: str, case_hash: str) -> Path:
    """The cached features of one case (its crop-store case hash) for one settings key."""
    return features_dir(store_dir, settings_key) / FEATURE_CASES_DIR / f"{case_hash}.parquet"


def is_store(store_dir: str | Path) -> bool:
    """True when ``store_dir`` holds a finished crop store (index and metadata written)."""
    store = Path(store_dir)
    return (store / INDEX_FILE).is_file() and (store / META_FILE).is_file()


def read_meta(store_dir: str | Path) -> dict[str, Any]:
    """The store's metadata (``store.json``); no store there is an InputError naming the folder
    and the command that builds one."""
    if not is_store(store_dir):
        raise InputError(store_dir, f"no crop store here; {BUILD_HINT}")
    return json.loads((Path(store_dir) / META_FILE).read_text(encoding="utf-8"))


def store_hash(store_dir: str | Path) -> str:
    """Content id of a crop store: sha256 of its index file."""
    return sha256_file(Path(store_dir) / INDEX_FILE)


def store_facts(store_dir: str | Path) -> dict[str, Any]:
    """Name-free facts about a store, for results and checkpoints: its preprocessing parameters,
    the package version that wrote it, its content hash and the range of its CTs' voxel spacing
    (``{"min": [sz, sy, sx], "max": [...]}`` mm; None for stores older than format 3)."""
    meta = read_meta(store_dir)
    spacing = meta.get("spacing") or {}
    return {
        "params": dict(meta.get("params", {})),
        "version": meta.get("version"),
        "hash": store_hash(store_dir),
        "spacing": (
            {"min": list(spacing["min"]), "max": list(spacing["max"])}
            if "min" in spacing and "max" in spacing
            else None
        ),
    }
