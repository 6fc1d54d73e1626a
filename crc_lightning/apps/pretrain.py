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

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
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
    config_int,
    instantiate,
    instantiate_loggers,
    is_multirun,
    job_label,
    plain,
    run_app,
    task_wrapper,
    track_loggers,
)
from crc_lightning.apps.preprocess import ensure_store
from crc_lightning.apps.progress import progress_callbacks
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import write_json

log = logging.getLogger(__name__)

__all__ = [
    "RUN_FILE",
    "DistinctWeightsCallback",
    "WeightsClashError",
    "check_checkpoint_dir",
    "checkpoint_callbacks",
    "checkpoint_dir",
    "ensure_ood_stores",
    "ood_stores",
    "pretrain",
    "resolve_ckpt_path",
    "swept_keys",
    "validate",
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


def ensure_ood_stores(cfg: DictConfig, stores: dict[str, Path], build: bool = True) -> None:
    """Every OOD store there, or buildable: the synthetic ones of ``ood.build_synthetic`` are built
    once (:func:`~crc_lightning.apps.preprocess.ensure_store`, as ``python -m
    crc_lightning.preprocess data=synthetic data.name=synthetic_ood data.synthetic.seed=7`` would);
    any other missing store is an error naming its preprocess command (``ood.hints``)."""
    build_specs = plain(cfg.ood.get("build_synthetic")) or {}
    hints = plain(cfg.ood.get("hints")) or {}
    for name, store in stores.items():
        spec = build_specs.get(name)
        synthetic = None
        if spec is not None:
            synthetic = {
                "kind": "synthetic",
                "name": name,
                "root": str(spec["root"]),
                "synthetic": {
                    "n_patients": int(spec.get("n_patients", 48)),
                    "seed": int(spec.get("seed", 7)),
                    "dicom_fraction": float(spec.get("dicom_fraction", 0.0)),
                },
            }
        hint = hints.get(name) or "python -m crc_lightning.preprocess data=<source> data.root=…"
        try:
            ensure_store(store, synthetic, hint, build=build)
        except InputError as err:
            raise InputError(
                store, f"no crop store for OOD source {name!r}; build it with `{hint}`"
            ) from err


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


RUN_FILE = "run.json"  # in a checkpoint folder: the settings key of the run that wrote it


def _stored_run_key(ckpt_dir: Path) -> str | None:
    try:
        return str(json.loads((ckpt_dir / RUN_FILE).read_text(encoding="utf-8"))["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _asked_to_resume(ckpt_path: Any) -> bool:
    return ckpt_path not in (None, "", "null")


def check_checkpoint_dir(cfg: DictConfig, ckpt_dir: Path, run_key: str) -> None:
    """Refuse to start a run that would overwrite another run's checkpoints in ``ckpt_dir``.

    A folder with checkpoints is continued only when asked (``ckpt_path=last`` or a file) and when
    they come from a run with the same settings (:data:`RUN_FILE`; the default folder is named by
    them too); ``+overwrite=true`` starts again from epoch 0 and removes them. Why: re-running the
    same command without ``ckpt_path=last`` restarted at epoch 0 in the same folder and overwrote
    ``last.ckpt``, with Lightning's "directory not empty" warning only.
    """
    overwrite = bool(cfg.get("overwrite", False))
    ckpt_path = cfg.get("ckpt_path")
    if overwrite and _asked_to_resume(ckpt_path):
        raise UsageError(
            f"`ckpt_path={ckpt_path}` continues a run, `+overwrite=true` starts one again: give one"
        )
    existing = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if not existing or overwrite:
        return
    fresh = (
        "start again from epoch 0 with `+overwrite=true` (removes them) or in a new folder "
        "with `checkpoint_dir=<folder>`"
    )
    stored = _stored_run_key(ckpt_dir)
    if stored is not None and stored != run_key:
        raise UsageError(
            f"{ckpt_dir} holds the checkpoints of another pretraining run (other data, model or "
            f"SimCLR settings), which these settings cannot continue: {fresh}"
        )
    if not _asked_to_resume(ckpt_path):
        shown = ", ".join(existing[-3:]) + (", …" if len(existing) > 3 else "")
        raise UsageError(
            f"{ckpt_dir} already holds the checkpoints of a run with these settings ({shown}): "
            f"continue it with `ckpt_path=last`, or {fresh}"
        )


REPLACED_DIR = ".replaced"  # in a checkpoint folder: the earlier run's checkpoints, set aside


def _take_checkpoint_dir(cfg: DictConfig, ckpt_dir: Path, run_key: str) -> Path | None:
    """After :func:`check_checkpoint_dir`: record whose checkpoints the folder holds (:data:`RUN_FILE`)
    and, when ``+overwrite=true`` asked to start again, set the earlier run's checkpoints aside
    (returned folder): :func:`_settle_replaced` removes them once this run has finished, or puts
    them back when it fails — a failed restart does not cost the earlier run."""
    aside = None
    old = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if old and bool(cfg.get("overwrite", False)):
        aside = ckpt_dir / REPLACED_DIR
        aside.mkdir(exist_ok=True)
        log.warning(
            "+overwrite=true: starting again at epoch 0; the %d checkpoint(s) of the earlier run "
            "in %s are removed when this run finishes (put back if it fails)",
            len(old),
            ckpt_dir,
        )
        for path in old:
            with contextlib.suppress(FileNotFoundError):  # DDP: every rank runs this
                os.replace(path, aside / path.name)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(ckpt_dir / RUN_FILE, {"key": run_key})
    return aside


def _settle_replaced(aside: Path | None, ckpt_dir: Path, succeeded: bool) -> None:
    """The end of an ``+overwrite=true`` run: drop the earlier checkpoints, or restore them."""
    if aside is None or not aside.is_dir():
        return
    if succeeded:
        shutil.rmtree(aside, ignore_errors=True)
        return
    for path in ckpt_dir.glob("*.ckpt"):  # this failed run's own
        path.unlink(missing_ok=True)
    for path in aside.glob("*.ckpt"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, ckpt_dir / path.name)
    shutil.rmtree(aside, ignore_errors=True)
    log.warning("pretraining failed: the earlier run's checkpoints are back in %s", ckpt_dir)


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


def validate(cfg: DictConfig) -> None:
    """Checks of a pretrain config before any work or folder (Hydra callback ``ValidateConfig``,
    and :func:`pretrain` itself): numbers, the OOD stores, the checkpoint folder."""
    for key, example in (("res", 64), ("epochs", 100), ("batch_size", 64)):
        config_int(cfg, key, minimum=1, example=example)
    config_int(cfg, "seed", example=0)
    config_int(cfg, "checkpoint_every_n_epochs", minimum=1, example=50)
    if not float(cfg.temperature) > 0:
        raise UsageError(f"`temperature={cfg.temperature}`: the NT-Xent temperature must be > 0")
    stores = ood_stores(cfg)
    ensure_ood_stores(cfg, stores, build=False)
    check_checkpoint_dir(cfg, checkpoint_dir(cfg, stores), _run_key(cfg, stores))
    resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir(cfg, stores))


def checkpoint_callbacks(ckpt_dir: Path, every_n_epochs: int) -> list[Any]:
    """A numbered checkpoint every ``every_n_epochs`` and ``last.ckpt`` after EVERY epoch, so a
    killed job loses at most one epoch (Lightning's ``save_last`` only follows the numbered
    checkpoints: a second callback writes ``last.ckpt`` — except at ``every_n_epochs=1``, where
    the two would be identical, which Lightning refuses)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    every = int(every_n_epochs)
    numbered = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="epoch{epoch:04d}",
        auto_insert_metric_name=False,
        every_n_epochs=every,
        save_top_k=-1,
        save_last=every == 1,
        enable_version_counter=False,
    )
    if every == 1:
        return [numbered]
    last = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        every_n_epochs=1,
        save_top_k=1,
        enable_version_counter=False,
    )
    return [numbered, last]


@task_wrapper
def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Run one SimCLR pretraining job; return its summary (also written as ``pretrain.json``).

    The returned dict also carries the ``trainer`` (in-process callers, tests); the JSON does not.
    """
    import lightning.pytorch as L

    from crc_lightning import __version__
    from crc_lightning.data.ssl import SSLDataModule
    from crc_lightning.distributed import finish_job
    from crc_lightning.models.simclr import export_simclr_weights

    validate(cfg)
    started = time.monotonic()
    multirun = is_multirun()  # sweeps: no progress bar, one line per finished job
    L.seed_everything(int(cfg.seed), workers=True)
    stores = ood_stores(cfg)
    ensure_ood_stores(cfg, stores)
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
    run_key = _run_key(cfg, stores)
    check_checkpoint_dir(cfg, ckpt_dir, run_key)
    resume = resolve_ckpt_path(cfg.get("ckpt_path"), ckpt_dir)
    aside = _take_checkpoint_dir(cfg, ckpt_dir, run_key)
    loggers = instantiate_loggers(cfg.get("logger"))
    track_loggers(loggers)
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and not multirun
    shown, bar = progress_callbacks(bar, f"[{job_label()}]" if multirun else "")
    trainer = instantiate(
        cfg.trainer,
        callbacks=[*checkpoint_callbacks(ckpt_dir, int(cfg.checkpoint_every_n_epochs)), *shown],
        logger=loggers or False,
        enable_progress_bar=bar,
    )
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
        with warnings.catch_warnings():
            # the folder was checked above (check_checkpoint_dir): its files are this run's own
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    except BaseException:
        if trainer.is_global_zero:
            _settle_replaced(aside, ckpt_dir, succeeded=False)
        raise
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
            replaced = weights_file.is_file()
            # atomic: the old file or the new
            export_simclr_weights(model, weights_file, meta, pool_patients=keys)
            log.info(
                "SimCLR weights written to %s%s",
                weights_file,
                " (replacing the previous file, now that this run has finished)"
                if replaced
                else "",
            )
        out = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
        if out:
            write_json(Path(str(out)) / "pretrain.json", result)
        _settle_replaced(aside, ckpt_dir, succeeded=True)
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
