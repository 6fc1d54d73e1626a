"""W&B for sweeps, without letting patient data leave the machine.

``logger=wandb`` builds a :class:`PrivateWandbLogger`: offline unless ``WANDB_MODE=online``; one W&B run
per job (``finish_wandb`` ends it, ``exit_code=1`` on failure, so job 2 of a sweep never logs into
job 1's run); ``group`` = the sweep's name, ``name`` = variant/res/seed, ``job_type`` = run | pretrain.

What is sent is limited to numbers and plain settings: hyper-parameters are sanitised (any value that
looks like a file-system path, and any key naming patients, is dropped), W&B's own collection of the
command line, program path, git state, code and console is switched off, and images/tables are
refused unless ``logger.wandb.log_media=true``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

PRIVATE_KEY = re.compile(
    r"patient|manifest|(^|_)(path|file|dir|root|image|mask|store)s?($|_)", re.I
)
PATH_LIKE = re.compile(r"(^[~/.]|[\\/]|\.(nii|gz|dcm|csv|parquet|ckpt|pt|npz|json)$)", re.I)

# W&B settings that stop it from recording the command line, paths, code and console output.
PRIVATE_SETTINGS: dict[str, Any] = {
    "x_disable_meta": True,  # no argv, program path, host, git, etc. in the run metadata
    "x_disable_machine_info": True,
    "disable_code": True,
    "disable_git": True,
    "save_code": False,
    "disable_job_creation": True,
    "console": "off",
}


def sanitize(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat dict of hyper-parameters safe to send: no path-like values, no patient/path keys."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if PRIVATE_KEY.search(str(key)):
            continue
        if isinstance(value, Mapping):
            out.update(sanitize(value, prefix=f"{name}/"))
        elif isinstance(value, (list, tuple)):
            items = [v for v in value if not (isinstance(v, str) and PATH_LIKE.search(v))]
            if all(isinstance(v, (int, float, bool, str)) or v is None for v in items):
                out[name] = list(items)
        elif isinstance(value, str):
            if not PATH_LIKE.search(value):
                out[name] = value
        elif isinstance(value, (int, float, bool)) or value is None:
            out[name] = value
    return out


def sweep_group() -> str | None:
    """The W&B group of a job: the sweep folder's name in a ``-m`` sweep, None in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    return Path(str(HydraConfig.get().sweep.dir)).name or None


def flat_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"image": {"auc": .6, "per_class": {"RAS": {"f1": .7}}}}`` → ``{"image/auc": .6,
    "image/per_class/RAS/f1": .7}``; only finite numbers are kept (None / NaN are left out)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_numbers(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if value == value and abs(value) != float("inf"):
                out[name] = float(value)
    return out


def log_final_metrics(loggers: Any, metrics: Mapping[str, Any], prefix: str = "final/") -> None:
    """Put a job's final (test) metrics into each W&B run's summary (call on global rank 0).

    Only numbers travel: the metrics tree of metrics.json holds class names and counts, no ids.
    """
    if not isinstance(loggers, (list, tuple)):
        loggers = [loggers]
    flat = flat_numbers(metrics, prefix=prefix)
    for lg in loggers:
        if isinstance(lg, WandbLogger) and flat:
            lg.experiment.summary.update(flat)


class PrivateWandbLogger(WandbLogger):
    """``WandbLogger`` that only ever sends sanitised numbers and settings (see the module docstring)."""

    def __init__(self, *args: Any, log_media: bool = False, **kwargs: Any) -> None:
        if kwargs.get("group") is None:
            kwargs["group"] = sweep_group()
        if kwargs.get("save_dir"):
            Path(kwargs["save_dir"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        settings = dict(PRIVATE_SETTINGS)
        user_settings = kwargs.pop("settings", None) or {}
        settings.update(dict(user_settings))
        import wandb

        kwargs["settings"] = wandb.Settings(**settings)
        kwargs.setdefault("log_model", False)
        self.log_media = bool(log_media)
        super().__init__(*args, **kwargs)

    def log_hyperparams(self, params: Any) -> None:  # type: ignore[override]
        if not isinstance(params, Mapping):
            params = vars(params)
        super().log_hyperparams(sanitize(params))

    def _refuse_media(self, what: str) -> None:
        if not self.log_media:
            raise PermissionError(
                f"refusing to send {what} to W&B: images and tables may hold patient data. "
                "Set logger.wandb.log_media=true to allow it."
            )

    def log_image(self, *args: Any, **kwargs: Any) -> None:
        self._refuse_media("images")
        super().log_image(*args, **kwargs)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._refuse_media("tables")
        super().log_table(*args, **kwargs)

    def log_text(self, *args: Any, **kwargs: Any) -> None:
        self._refuse_media("text tables")
        super().log_text(*args, **kwargs)


def finish_wandb(loggers: Any, failed: bool = False) -> None:
    """End this job's W&B run (every ``PrivateWandbLogger``/``WandbLogger`` among ``loggers``)."""
    if loggers is None:
        return
    if not isinstance(loggers, (list, tuple)):
        loggers = [loggers]
    for lg in loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg._experiment.finish(exit_code=1 if failed else 0)
            lg._experiment = None


# ------------------------------------------------------------------------------ the report run
REPORT_TABLES = ("summary", "permutation_tests", "paired_tests")
_SUMMARY_KEEP = (
    "labels",
    "variant",
    "res",
    "weights",
    "level",
    "focus",
    "metric",
    "mean",
    "ci_half",
    "n",
    "prevalence",
    "baseline",
    "dagger",
)


def _wandb_conf(job_dir: Path) -> dict[str, Any] | None:
    """The job's ``logger.wandb`` node as written (``.hydra/config.yaml``), or None."""
    from omegaconf import OmegaConf

    cfg_file = job_dir / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        node = OmegaConf.select(OmegaConf.load(cfg_file), "logger.wandb")
        return None if node is None else dict(OmegaConf.to_container(node, resolve=False))
    except Exception:  # a config we cannot read only disables W&B logging
        return None


def log_report(job_dirs: Any, report_dir: str | Path) -> bool:
    """Send a report's summary tables to one W&B run (``job_type="report"``) when its jobs logged
    to W&B; returns whether it did. Only the aggregated tables travel (class names, numbers,
    variant names): no patient id, path or image."""
    import pandas as pd

    confs = [c for c in (_wandb_conf(Path(d)) for d in job_dirs) if c]
    if not confs:
        return False
    import wandb

    report_dir = Path(report_dir)
    conf = confs[0]
    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    kwargs = {k: conf[k] for k in ("project", "entity", "group") if isinstance(conf.get(k), str)}
    run = wandb.init(
        job_type="report",
        mode=mode,
        reinit=True,
        dir=str(report_dir),
        settings=wandb.Settings(**PRIVATE_SETTINGS),
        **kwargs,
    )
    try:
        for name in REPORT_TABLES:
            path = report_dir / f"{name}.csv"
            if not path.is_file():
                continue
            df = pd.read_csv(path)
            if name == "summary":
                df = df[[c for c in _SUMMARY_KEEP if c in df.columns]]
            run.log({f"report/{name}": wandb.Table(dataframe=df)})
    finally:
        run.finish()
    return True
