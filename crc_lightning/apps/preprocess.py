"""``python -m crc_lightning.preprocess``: CT volumes + lesion masks → crop store (Algorithm 1).

A thin Hydra shell over :func:`preprocess`, which tests and notebooks call with a composed config.
Where the cases come from is ``data.kind`` (the :data:`crc_lightning.sources.SOURCES` registry):
``synthetic`` (generated once, then reused), ``manifest`` (your cohort CSV), or an OOD source
``lits`` / ``ircadb`` / ``crlm`` (unlabelled, content duplicates dropped). Patient ids are never
logged; the printed summary has counts only.

Sharded builds (cohorts too big for one machine): ``shard=i/n`` preprocesses only the ``i``-th of
``n`` patient shards (:func:`~crc_lightning.cropstore.writer.shard_of_patients`) and writes its
part into the store folder; ``merge=true`` merges the parts into the store, equal to a
single-process build's. A ``-m`` sweep over the shards merges by itself at its end
(:class:`MergeShardsCallback`), with any launcher::

    python -m crc_lightning.preprocess -m data=lits shard=0/4,1/4,2/4,3/4 hydra/launcher=joblib
    python -m crc_lightning.preprocess data=lits merge=true    # only if the sweep did not finish
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from crc_lightning.apps._hydra import CONF_DIR, AbortRun, UsageError, config_int, plain, run_app
from crc_lightning.cropstore.format import INDEX_FILE, is_store
from crc_lightning.data.labels import LabelSet
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import write_json

log = logging.getLogger(__name__)

__all__ = [
    "SHARD_FILE",
    "MergeShardsCallback",
    "class_counts",
    "ensure_store",
    "format_summary",
    "main",
    "parse_shard",
    "preprocess",
    "preprocess_command",
    "synthetic_spec",
    "validate",
]

SHARD_FILE = "shard.json"  # in a shard job's output folder: which store it wrote a part of


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


# ------------------------------------------------------------------------------ the store others read
_PATH_KEYS = {"manifest": "manifest", "lits": "root", "ircadb": "root", "crlm": "root"}


def preprocess_command(data: Mapping[str, Any], with_store: bool = True) -> str:
    """The ``python -m crc_lightning.preprocess …`` that builds the crop store ``data`` describes
    (``data``: a run-style ``data`` node: ``kind``, ``name``, ``store``, ``manifest`` / ``root``);
    ``with_store``: name the store folder too, so the command is exact from any folder."""
    kind = str(data.get("kind"))
    words = ["python -m crc_lightning.preprocess", f"data={kind}"]
    if str(data.get("name")) != kind and kind != "manifest":
        words.append(f"data.name={data.get('name')}")
    key = _PATH_KEYS.get(kind)
    if key:
        value = data.get(key)
        placeholder = "/path/labels.csv" if kind == "manifest" else f"/path/to/{kind}"
        words.append(f"data.{key}={value if value not in (None, '', '???') else placeholder}")
    if with_store:
        words.append(f"data.store={Path(str(data.get('store'))).absolute()}")
    return " ".join(words)


def synthetic_spec(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the built-in cohort of a ``data`` node with ``kind: synthetic`` is made from (None for
    any other kind): the mapping :func:`crc_lightning.sources.load_cases` takes."""
    if str(data.get("kind")) != "synthetic":
        return None
    return {
        "kind": "synthetic",
        "name": str(data.get("name", "synthetic")),
        "root": str(data["root"]),
        "synthetic": dict(data.get("synthetic") or {}),
    }


def _default_params() -> dict[str, Any]:
    """Algorithm 1's parameters as ``python -m crc_lightning.preprocess`` uses them by default."""
    return plain(OmegaConf.load(Path(CONF_DIR) / "preprocess.yaml").preprocess)


def ensure_store(
    store: str | Path,
    synthetic: Mapping[str, Any] | None = None,
    command: str | None = None,
    build: bool = True,
) -> Path:
    """The crop store at ``store``; when it is missing, built once from the synthetic cohort
    ``synthetic`` (:func:`synthetic_spec`) as ``python -m crc_lightning.preprocess`` would with its
    default parameters, or an :class:`InputError` naming ``command`` (any other source: its
    preprocessing is the user's to run, on their data).

    One function for ``run`` (its ``data``) and ``pretrain`` (its synthetic OOD pool), so their
    commands work on a fresh checkout in any order. Concurrent callers (joblib sweep jobs, DDP
    ranks) take a file lock beside the store: one builds, the others wait and reuse it; the store
    writer replaces ``index.parquet``/``store.json`` atomically, so a killed build leaves no
    store that looks finished. ``build=False`` only checks (config validation: no work).
    """
    store = Path(store)
    if is_store(store):
        return store
    if synthetic is None:
        raise InputError(store, f"no crop store here; build it first with `{command}`")
    if not build:
        return store
    from crc_lightning.cropstore.writer import build_crop_store
    from crc_lightning.io.files import file_lock
    from crc_lightning.sources import load_cases
    from crc_lightning.sources.manifest import GENES

    with file_lock(store.parent / f".{store.name}.lock"):
        if is_store(store):  # built by another process while this one waited
            return store
        n = int(dict(synthetic.get("synthetic") or {}).get("n_patients", 48))
        log.info(
            "building the synthetic crop store once (%d patients; later runs reuse it): %s",
            n,
            store,
        )
        started = time.monotonic()
        cases = load_cases(dict(synthetic), GENES)
        summary = build_crop_store(cases, store, _default_params(), n_jobs=1, progress=False)
        log.info(
            "synthetic crop store ready: %d lesions, %d crops in %.0f s",
            summary["lesions"],
            summary["crops"],
            time.monotonic() - started,
        )
    return store


def validate(cfg: DictConfig) -> None:
    """Checks of a preprocess config before any work or folder (:class:`ValidateConfig`)."""
    from crc_lightning.preprocessing.algorithm import PreprocessParams
    from crc_lightning.sources import SOURCES

    kind = str(cfg.data.kind)
    if kind not in SOURCES:
        raise UsageError(f"unknown data.kind {kind!r}; expected one of {sorted(SOURCES)}")
    key = _PATH_KEYS.get(kind)
    if key and not cfg.get("merge"):  # a merge reads the shard parts, not the source
        value = OmegaConf.select(cfg, f"data.{key}", default=None)
        if value in (None, "", "???"):
            example = preprocess_command(cfg.data, with_store=False)
            raise InputError(None, f"`data.{key}` is required, e.g. `{example}`")
        exists = Path(str(value)).is_file() if key == "manifest" else Path(str(value)).is_dir()
        if not exists:
            what = "file" if key == "manifest" else "folder"
            raise InputError(Path(str(value)), f"no such {what} (data.{key}=)")
    n_jobs = config_int(cfg, "n_jobs", example=4)
    if n_jobs == 0:
        raise UsageError("`n_jobs=0`: give a number of parallel cases ≥ 1, or -1 for all cores")
    PreprocessParams.from_config(plain(cfg.preprocess))
    LabelSet.from_config(cfg.labels)
    if cfg.get("shard") is not None:
        if cfg.get("merge"):
            raise UsageError("merge=true and shard=… are two steps: run the shards, then merge")
        parse_shard(cfg.shard)


def parse_shard(value: Any) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n`` (shards are numbered from 0)."""
    text = str(value).strip()
    head, sep, tail = text.partition("/")
    try:
        if not sep:
            raise ValueError
        shard, shards = int(head), int(tail)
    except ValueError:
        raise UsageError(
            f"shard={text}: expected i/n, the i-th of n shards counted from 0 (e.g. shard=0/4)"
        ) from None
    if not (shards >= 1 and 0 <= shard < shards):
        raise UsageError(f"shard={text}: need 0 <= i < n (shards are numbered 0 … n-1)")
    return shard, shards


def _finish(cfg: DictConfig, store: Path, summary: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    summary["per_class"] = class_counts(pd.read_parquet(store / INDEX_FILE), cfg.labels)
    print(format_summary(str(cfg.data.name), store, summary))
    return summary


def preprocess(cfg: DictConfig) -> dict[str, Any]:
    """Build (or update) the crop store ``cfg.data.store`` and return its summary; with
    ``shard=i/n`` only that shard's part, with ``merge=true`` the store from the parts."""
    from crc_lightning.cropstore.writer import build_crop_store, build_shard, merge_shards
    from crc_lightning.preprocessing.algorithm import PreprocessParams
    from crc_lightning.sources import load_cases

    validate(cfg)  # also refuses merge=true together with shard=…
    store = Path(cfg.data.store)
    shard = cfg.get("shard")
    if cfg.get("merge"):
        return _finish(cfg, store, merge_shards(store))
    params = PreprocessParams.from_config(plain(cfg.preprocess))
    genes = LabelSet.from_config(cfg.labels).genes
    cases = load_cases(plain(cfg.data), genes, params.read_options())
    n_jobs, progress = int(cfg.n_jobs), bool(cfg.progress)
    if shard is None:
        return _finish(cfg, store, build_crop_store(cases, store, params, n_jobs, progress))
    i, n = parse_shard(shard)
    summary = build_shard(cases, store, params, i, n, n_jobs, progress)
    out = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
    if out:  # for MergeShardsCallback at the end of a sweep
        write_json(Path(str(out)) / SHARD_FILE, {"store": str(store.resolve()), "shard": i,
                                                "shards": n})  # fmt: skip
    print(
        f"crop store '{cfg.data.name}' shard {i}/{n}: {store}\n"
        f"  patients {summary['patients']}  cases {summary['cases']} ({summary['computed']} "
        f"computed, {summary['reused']} reused)  crops {summary['crops']}\n"
        f"  part written; once all {n} shards are done, merge them: the same command with "
        "merge=true instead of shard=… (a -m sweep over the shards merges by itself)"
    )
    return summary


class MergeShardsCallback(HydraCallback):
    """At the end of a ``preprocess -m`` sweep, merge every store whose shards its jobs built
    (each shard job leaves :data:`SHARD_FILE` in its folder), in the sweep's own process.

    Runs only when the sweep finished: a failed shard job fails the sweep first, and its store is
    merged with ``merge=true`` once that shard has been run again. A merge error stops the sweep
    with one line (exit 2)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import json

        from crc_lightning.cropstore.writer import merge_shards

        sweep = Path(str(config.hydra.sweep.dir))
        stores = sorted(
            {json.loads(f.read_text(encoding="utf-8"))["store"] for f in sweep.rglob(SHARD_FILE)}
        )
        for store in stores:
            try:
                summary = merge_shards(store)
            except InputError as err:
                raise AbortRun(f"merging the shards of {store} failed: {err}") from err
            name = str(OmegaConf.select(config, "data.name", default=Path(store).name))
            _finish(config, Path(store), summary)
            log.info("merged %d shards into the crop store %s (%s)", summary["shards"], store, name)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="preprocess")
def _hydra_main(cfg: DictConfig) -> None:
    preprocess(cfg)


def main() -> None:
    run_app("preprocess", _hydra_main)
