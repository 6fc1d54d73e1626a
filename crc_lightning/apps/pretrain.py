"""``python -m crc_lightning.pretrain``: SimCLR on OOD liver-CT crops → backbone weights for OODp.

A thin Hydra shell over :func:`pretrain`, which tests call with a composed config. One job:

1. seed everything; resolve the OOD stores (``ood=<name>`` / ``ood=[lits,ircadb]`` select
   ``conf/ood/*.yaml``, whose ``sources`` merge; ``ood_stores=[folder, ...]`` adds any store). The
   default ``ood=synthetic`` builds the synthetic OOD cohort once, from a seed other than the
   target cohort's. Patients in ``data.exclude_patients`` are dropped, and when the target cohort's
   store is in the pool (``exclude_test_of.store``), every labelled patient of it (default
   ``exclude_test_of.patients=all``: under the default ``split=cv`` every one is a test patient), or
   with ``patients=test`` only those the run's own split function tests for ``exclude_test_of.seeds``
   (:func:`~crc_lightning.data.ssl.target_test_patients`);
2. fit :class:`SimCLRModule` on :class:`SSLDataModule` for ``epochs`` epochs; a numbered checkpoint
   every ``checkpoint_every_n_epochs`` and ``last.ckpt`` every epoch, in a folder that depends only
   on the run's settings, so a killed job continues with ``ckpt_path=last``;
3. export the backbone (+ attention) weights and metadata to ``weights_file`` (default
   ``${paths.weights_dir}/simclr_res<res>[_sa].ckpt``), the file ``variant=oodp|oodp_sa`` loads,
   with the salted hashes of the pool's patients (:func:`~crc_lightning.models.simclr.pool_record`):
   ``run`` refuses the file if its pool holds one of the run's test patients.

``trainer=ddp|ddp_sim`` runs one job on 2 devices (crc_lightning.distributed), in single runs and
``-m`` sweeps: NT-Xent then gathers the negatives of every rank. In a sweep the progress bar is off
and each job prints one line; :class:`DistinctWeightsCallback` refuses a sweep whose jobs would all
export to the same ``weights_file`` (e.g. ``-m seed=0,1``) before its first job starts.

Nothing identifying leaves the machine: logs and ``pretrain.json`` hold counts and hashes only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from crc_lightning.apps._hydra import (
    CONF_DIR,
    AbortRun,
    UsageError,
    instantiate,
    instantiate_loggers,
    is_multirun,
    job_label,
    plain,
    run_app,
    task_wrapper,
    track_loggers,
)
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import write_json

log = logging.getLogger(__name__)

__all__ = [
    "DistinctWeightsCallback",
    "WeightsClashError",
    "checkpoint_dir",
    "ensure_synthetic_ood",
    "ood_stores",
    "pretrain",
    "resolve_ckpt_path",
    "swept_keys",
    "weights_clash",
    "weights_path",
]


def ood_stores(cfg: DictConfig) -> dict[str, Path]:
    """``{name: folder}`` of the OOD pool: ``ood.sources`` + ``ood_stores``."""
    from crc_lightning.data.ssl import resolve_ood_sources

    stores = resolve_ood_sources(plain(cfg.ood.get("sources")) or {}, allow_empty=True)
    extra = list(cfg.get("ood_stores") or [])
    if extra:
        stores.update(resolve_ood_sources(extra, str(cfg.paths.data_dir)))
    if not stores:
        raise InputError(
            None, "no OOD crop store: choose `ood=<name>` or give `ood_stores=[/path/to/store]`"
        )
    return stores


def ensure_synthetic_ood(store: Path, spec: dict[str, Any]) -> None:
    """Build a synthetic OOD crop store once, as ``python -m crc_lightning.preprocess data=synthetic
    data.name=synthetic_ood data.synthetic.seed=7`` would (default preprocessing parameters)."""
    from crc_lightning.cropstore.format import is_store

    if is_store(store):
        return
    from crc_lightning.cropstore.writer import build_crop_store
    from crc_lightning.sources.manifest import read_manifest
    from crc_lightning.sources.synthetic import ensure_synthetic_cohort

    log.info("building the synthetic OOD crop store once (seed %s)", spec.get("seed"))
    csv = ensure_synthetic_cohort(
        Path(str(spec["root"])),
        int(spec.get("n_patients", 48)),
        int(spec.get("seed", 7)),
        float(spec.get("dicom_fraction", 0.0)),
    )
    cases = read_manifest(Path(csv), source=store.name)
    build_crop_store(cases, store, {}, n_jobs=1, progress=False)


def _run_key(cfg: DictConfig, stores: dict[str, Path]) -> str:
    """Settings that make two launches the *same* run (so ``last.ckpt`` may be continued)."""
    model = {k: v for k, v in plain(cfg.model).items() if k not in ("res", "temperature")}
    key = {
        "res": int(cfg.res),
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
        "temperature": float(cfg.temperature),
        "stores": {k: str(v.resolve()) for k, v in sorted(stores.items())},
        "data": {k: v for k, v in plain(cfg.data).items() if k != "cache"},  # how, not what
        "exclude_test_of": plain(cfg.exclude_test_of),
        "model": model,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return f"res{int(cfg.res)}{'_sa' if cfg.model.attention else ''}_{digest[:10]}"


def checkpoint_dir(cfg: DictConfig, stores: dict[str, Path]) -> Path:
    """``checkpoint_dir``, or ``<log_dir>/<task_name>/checkpoints/<res…_settings hash>``."""
    if cfg.get("checkpoint_dir"):
        return Path(str(cfg.checkpoint_dir))
    return Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "checkpoints" / _run_key(cfg, stores)


def weights_path(cfg: DictConfig) -> Path:
    from crc_lightning.models.simclr import simclr_weights_name

    if cfg.get("weights_file"):
        return Path(str(cfg.weights_file))
    name = simclr_weights_name(int(cfg.res), bool(cfg.model.attention))
    return Path(str(cfg.paths.weights_dir)) / name


def resolve_ckpt_path(ckpt_path: str | None, ckpt_dir: Path) -> str | None:
    """``null`` → fresh; ``last`` → ``<ckpt_dir>/last.ckpt`` if there (else fresh, logged); a file."""
    if ckpt_path in (None, "", "null"):
        return None
    if str(ckpt_path) == "last":
        last = ckpt_dir / "last.ckpt"
        if last.is_file():
            return str(last)
        log.info("ckpt_path=last but no last.ckpt of these settings yet: starting at epoch 0")
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise InputError(path, "ckpt_path: no such checkpoint file (ckpt_path=last resumes)")
    return str(path)


# ------------------------------------------------------------------------------ sweeps
class WeightsClashError(AbortRun):
    """A ``-m`` sweep whose jobs would all export their weights to one file (the last one wins).

    An :class:`~crc_lightning.apps._hydra.AbortRun`: Hydra turns exceptions of callbacks into
    warnings, and this must stop the sweep before its first job trains.
    """


# the keys the default weights file name depends on: simclr_res<res>[_sa].ckpt in paths.weights_dir
DEFAULT_NAME_KEYS = frozenset({"res", "model.attention", "paths.weights_dir", "paths.root_dir"})
_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


def _unresolved(config: DictConfig, key: str) -> Any:
    """The value at dotted ``key`` as written, ``${…}`` kept (None if absent)."""
    node: Any = OmegaConf.to_container(config, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def swept_keys(config: DictConfig) -> list[str]:
    """Keys a ``-m`` sweep varies: sweep overrides of the command line (``seed=0,1``,
    ``res=range(32,65,32)``) and of ``hydra.sweeper.params`` (the basic sweeper's or Optuna's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [str(o) for o in _unresolved(config, "hydra.overrides.task") or []]
    lines += [f"{k}={v}" for k, v in (_unresolved(config, "hydra.sweeper.params") or {}).items()]
    keys = []
    for override in OverridesParser.create().parse_overrides(lines):
        if override.is_sweep_override():
            key = override.get_key_element().lstrip("+~")
            if key not in keys:
                keys.append(key)
    return keys


def weights_clash(config: DictConfig) -> list[str]:
    """The swept keys that ``weights_file`` does not depend on ([] = every job its own file).

    ``weights_file: null`` names the file by res and attention only; a given ``weights_file``
    depends on the keys it interpolates (``${seed}``), and is per job when it interpolates
    ``paths.output_dir`` or ``hydra:…``. ``hydra.*`` keys and ``export=false`` never clash.
    """
    if not bool(config.get("export", True)):
        return []
    raw = _unresolved(config, "weights_file")
    if raw in (None, "", "null"):
        names = set(DEFAULT_NAME_KEYS)
    else:
        refs = {r.strip() for r in _INTERPOLATION.findall(str(raw))}
        if any(r == "paths.output_dir" or r.startswith("hydra:") for r in refs):
            return []
        names = refs | {"weights_file"}
        if "paths.weights_dir" in refs:
            names.add("paths.root_dir")
    swept = swept_keys(config)
    return [k for k in swept if k not in names and k != "hydra" and not k.startswith("hydra")]


class DistinctWeightsCallback(HydraCallback):
    """Refuse a ``pretrain -m`` sweep whose jobs would overwrite each other's exported weights."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        clash = weights_clash(config)
        if not clash:
            return
        raw = _unresolved(config, "weights_file")
        where = raw or "${paths.weights_dir}/simclr_res<res>[_sa].ckpt (weights_file=null)"
        if any(OmegaConf.is_config(OmegaConf.select(config, k, default=None)) for k in clash):
            example = "one pretrain command per value, each with its own weights_file=…"
        else:  # plain values (seed, temperature, …) can name the file
            suffix = "_".join(f"{k.split('.')[-1]}${{{k}}}" for k in clash)
            example = f"'weights_file=${{paths.weights_dir}}/simclr_res${{res}}_{suffix}.ckpt'"
        raise WeightsClashError(
            f"pretrain -m: every job of this sweep would export its weights to {where}, so each "
            f"job would overwrite the previous one's: the sweep varies {', '.join(clash)}, which "
            f"the file name does not depend on. Give each job its own file, e.g. {example} "
            "(quoted in the shell), or pass export=false."
        )


EXCLUDE_MODES = ("all", "test")


def _exclusions(cfg: DictConfig, stores: dict[str, Path]) -> dict[str, list[str]]:
    """``{store name: patient ids}`` to drop from the OOD store(s) that are the target cohort.

    ``exclude_test_of.patients``: ``all`` (default) — every labelled patient of the target, the
    simple safe choice (under ``split=cv`` each of them is a test patient of every repeat anyway);
    ``test`` — the patients the run's own split function tests (``exclude_test_of.split``,
    ``seeds``, ``exclude_patients``; :func:`~crc_lightning.data.ssl.target_test_patients`), which
    keeps the training patients of a ``split=holdout`` grid in the pool.
    """
    target = cfg.exclude_test_of.get("store")
    if not target:
        return {}
    from crc_lightning.cropstore.reader import CropStore
    from crc_lightning.data.datamodule import labelled_rows
    from crc_lightning.data.labels import LabelSet
    from crc_lightning.data.ssl import target_test_patients

    mode = str(cfg.exclude_test_of.get("patients", "all"))
    if mode not in EXCLUDE_MODES:
        raise UsageError(f"exclude_test_of.patients must be all or test, got {mode!r}")
    target = Path(str(target)).resolve()
    names = [k for k, v in stores.items() if v.resolve() == target]
    if not names:
        log.info("exclude_test_of.store is not one of the OOD stores: nothing to exclude")
        return {}
    labels = LabelSet.from_config(plain(cfg.exclude_test_of.labels))
    if mode == "all":
        rows = labelled_rows(CropStore(target), labels)
        ids = sorted(set(rows["patient_id"].astype(str)))
    else:
        ids = target_test_patients(
            target,
            labels,
            plain(cfg.exclude_test_of.split),
            [int(s) for s in cfg.exclude_test_of.seeds],
            [str(p) for p in cfg.exclude_test_of.get("exclude_patients") or []],
        )
    log.info("excluding %d %s patient(s) of the target cohort from the OOD pool", len(ids),
             "labelled" if mode == "all" else "test")  # fmt: skip
    return {n: ids for n in names}


def pool_patient_keys(pool: Any, stores: Mapping[str, Path]) -> set[str]:
    """:func:`~crc_lightning.models.simclr.patient_key` of every patient left in the OOD pool,
    from each store's own ``source`` column (what the run app reads from its store)."""
    from crc_lightning.cropstore.reader import CropStore
    from crc_lightning.models.simclr import patient_key

    keys: set[str] = set()
    for name, rows in pool.index.groupby("source"):
        index = CropStore(stores[str(name)]).index
        source = (
            index.set_index(index["crop_id"].astype(str))["source"]
            if "source" in index.columns
            else None
        )
        for crop, pid in zip(rows["crop_id"], rows["patient_id"], strict=True):
            keys.add(patient_key("" if source is None else source[str(crop)], pid))
    return keys


@task_wrapper
def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Run one SimCLR pretraining job; return its summary (also written as ``pretrain.json``).

    The returned dict also carries the ``trainer`` (in-process callers, tests); the JSON does not.
    """
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from crc_lightning import __version__
    from crc_lightning.data.ssl import SSLDataModule
    from crc_lightning.distributed import finish_job
    from crc_lightning.models.simclr import export_simclr_weights

    started = time.monotonic()
    multirun = is_multirun()  # sweeps: no progress bar, one line per finished job
    L.seed_everything(int(cfg.seed), workers=True)
    stores = ood_stores(cfg)
    for name, spec in (plain(cfg.ood.get("build_synthetic")) or {}).items():
        if name in stores:
            ensure_synthetic_ood(stores[name], spec)
    datamodule = SSLDataModule(
        stores,
        res=int(cfg.res),
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.data.num_workers),
        cache=str(cfg.data.get("cache", "lazy")),
        seed=int(cfg.seed),
        exclude_patients=[str(p) for p in cfg.data.exclude_patients or []],
        exclude_by_store=_exclusions(cfg, stores),
        positives=str(cfg.data.positives),
        max_slice_gap=int(cfg.data.max_slice_gap),
        augment=plain(cfg.data.augment),
        window=plain(cfg.input.window),
        normalize=plain(cfg.input.normalize),
        hints=plain(cfg.ood.get("hints")) or {},
    )
    datamodule.setup("fit")
    model = instantiate(cfg.model)

    ckpt_dir = checkpoint_dir(cfg, stores)
    numbered = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="epoch{epoch:04d}",
        auto_insert_metric_name=False,
        every_n_epochs=max(1, int(cfg.checkpoint_every_n_epochs)),
        save_top_k=-1,
        enable_version_counter=False,
    )
    # last.ckpt after EVERY epoch (Lightning's save_last only follows the numbered checkpoints),
    # so a killed job loses at most one epoch
    last = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        every_n_epochs=1,
        save_top_k=1,
        enable_version_counter=False,
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    track_loggers(loggers)
    progress = {"enable_progress_bar": False} if multirun else {}
    trainer = instantiate(
        cfg.trainer, callbacks=[numbered, last], logger=loggers or False, **progress
    )
    resume = resolve_ckpt_path(cfg.get("ckpt_path"), ckpt_dir)
    public = {
        "res": int(cfg.res),
        "seed": int(cfg.seed),
        "epochs": int(cfg.epochs),
        "batch_size": int(cfg.batch_size),
        "temperature": float(cfg.temperature),
        "attention": bool(cfg.model.attention),
        "positives": str(cfg.data.positives),
        "ood": sorted(stores),
    }
    for lg in loggers:
        lg.log_hyperparams(public)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    finally:
        if trainer.world_size > 1:
            finish_job(trainer)  # the next job of a sweep starts without a stale process group

    attention = bool(cfg.model.attention)
    weights_file = weights_path(cfg)
    meta = {
        "res": int(cfg.res),
        "attention": attention,
        "backbone": str(cfg.model.backbone.name),
        "in_chans": int(cfg.model.in_chans),
        "num_heads": int(cfg.model.num_heads),
        "epochs": int(trainer.current_epoch),
        "max_epochs": int(cfg.epochs),
        "global_step": int(trainer.global_step),
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
        "temperature": float(cfg.temperature),
        "init": model.weights_info.as_dict(),
        "ood": datamodule.summary(),
        "window": {k: float(v) for k, v in plain(cfg.input.window).items()},
        "normalize": {k: float(v) for k, v in plain(cfg.input.normalize).items()},
        "version": str(__version__),
        "final_loss": model.epoch_losses[-1] if model.epoch_losses else None,
    }
    result: dict[str, Any] = {
        **public,
        "weights_file": str(weights_file) if cfg.export else None,
        "checkpoint_dir": str(ckpt_dir),
        "resumed_from": resume,
        "epoch_losses": [float(x) for x in model.epoch_losses],
        "meta": meta,
        # world_size > 1: NT-Xent drew its negatives from every rank's batch
        "distributed": {
            "world_size": int(trainer.world_size),
            "gather_distributed": bool(getattr(model.criterion, "gather_distributed", False)),
        },
    }
    if trainer.is_global_zero:
        if cfg.export:
            keys = pool_patient_keys(datamodule.pool, stores)
            export_simclr_weights(model, weights_file, meta, pool_patients=keys)
            log.info("SimCLR weights written to %s", weights_file)
        out = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
        if out:
            write_json(Path(str(out)) / "pretrain.json", result)
        if multirun:
            print(_job_line(result, time.monotonic() - started), flush=True)
    result["trainer"] = trainer
    return result


def _job_line(result: Mapping[str, Any], seconds: float) -> str:
    """One line for a finished sweep job (no progress bars in sweeps)."""
    loss = result["meta"].get("final_loss")
    return (
        f"[{job_label()}] res={result['res']} seed={result['seed']} "
        f"attention={str(result['attention']).lower()}: final loss "
        f"{'-' if loss is None else f'{float(loss):.4f}'} | weights {result['weights_file']} | "
        f"{seconds:.0f} s"
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pretrain")
def _hydra_main(cfg: DictConfig) -> None:
    result = pretrain(cfg)
    if result["trainer"].is_global_zero and not is_multirun():
        final = result["meta"]["final_loss"]
        print(f"SimCLR weights: {result['weights_file']} (final loss {final})")


def main() -> None:
    """Entry point (``python -m crc_lightning.pretrain``): see :func:`~crc_lightning.apps._hydra.run_app`."""
    run_app("pretrain", _hydra_main)
