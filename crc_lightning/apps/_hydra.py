"""Hydra glue shared by the five apps — the only module that knows how an app starts and ends.

Every app (``python -m crc_lightning.<app>``) is a typed task function plus a thin
``@hydra.main`` over :data:`CONF_DIR`, started by :func:`run_app`, which gives them all:

* **argv**: ``key=a..b`` in a ``-m`` sweep means a, …, b inclusive (:func:`expand_ranges`; Hydra's
  own ``range(a,b)`` excludes ``b``, which is not what people type); in a single run a range is an
  error. ``predict`` also takes ``--info``.
* **errors**: an expected error — bad input (:class:`~crc_lightning.io.errors.InputError`), a bad
  config value (:class:`UsageError`, ``ValueError``), a missing weights file, Hydra's own config
  errors — prints ``<app>: <message>`` on stderr and exits 2, without a traceback unless
  ``HYDRA_FULL_ERROR=1``. Any other exception is a bug and keeps its traceback. (Hydra is run with
  ``HYDRA_FULL_ERROR=1`` so that it hands the exception over instead of printing it.)
* **logging**: Lightning's records through Hydra's handlers only (each line once, and in the job's
  ``<job name>.log``), library adverts and deprecation noise filtered narrowly (by message and
  module: :func:`quiet_library_noise`).
* **jobs**: :func:`task_wrapper` records a failed job's error in its log file and always closes the
  loggers it opened (W&B run finished, CSV flushed).

Also here: the ``${crc_dirname:…}`` resolver that bounds job folder names
(:func:`short_dirname`), and :func:`instantiate` helpers that surface the target's own error.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from crc_lightning.io.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "CONF_DIR",
    "AbortRun",
    "RangeOutsideSweepError",
    "UsageError",
    "error_message",
    "expand_ranges",
    "get_metric_value",
    "instantiate",
    "instantiate_callbacks",
    "instantiate_loggers",
    "is_expected_error",
    "is_multirun",
    "job_label",
    "plain",
    "quiet_library_noise",
    "register_resolvers",
    "route_lightning_logs",
    "run_app",
    "short_dirname",
    "task_wrapper",
    "track_loggers",
]

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # package data: found when installed


class UsageError(ValueError):
    """A command line or config value the app cannot use (shown as one line, exit 2)."""


class RangeOutsideSweepError(UsageError):
    """``key=a..b`` given without ``-m``: a range only makes sense in a sweep."""


class AbortRun(SystemExit):
    """An expected error raised where Hydra would turn an ``Exception`` into a warning (sweep
    callbacks): a ``SystemExit`` stops the sweep before its first job, and :func:`run_app` shows
    its message as one line."""


# ------------------------------------------------------------------------------ argv
# key=a..b (optionally +key / ++key / ~key); a, b integers (negative allowed)
_RANGE = re.compile(r"^(?P<key>(?:\+\+|\+|~)?[A-Za-z_][\w./@-]*)=(?P<a>-?\d+)\.\.(?P<b>-?\d+)$")
_MULTIRUN_FLAGS = ("-m", "--multirun")


def _is_multirun_argv(argv: Sequence[str]) -> bool:
    return any(a in _MULTIRUN_FLAGS for a in argv)


def expand_ranges(argv: Sequence[str]) -> list[str]:
    """``key=a..b`` → ``key=range(a,b+1)`` (inclusive) when ``argv`` is a ``-m`` sweep.

    Raises :class:`RangeOutsideSweepError` for a range in a single run, or a range with ``a > b``.
    """
    multirun = _is_multirun_argv(argv)
    out: list[str] = []
    for arg in argv:
        m = _RANGE.match(arg)
        if m is None:
            out.append(arg)
            continue
        key, a, b = m["key"], int(m["a"]), int(m["b"])
        if not multirun:
            raise RangeOutsideSweepError(
                f"`{arg}` is a sweep range ({a}, …, {b}); add -m to run one job per value, "
                f"e.g. `python -m crc_lightning.run -m {arg}`, or give one value: `{key}={a}`"
            )
        if a > b:
            raise RangeOutsideSweepError(f"`{arg}`: empty range, {a} > {b}")
        out.append(f"{key}=range({a},{b + 1})")
    return out


# ------------------------------------------------------------------------------ errors
def is_expected_error(err: BaseException) -> bool:
    """Errors a user can fix (bad input, config or command line): shown as one line, exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from crc_lightning.models.backbone import WeightsNotFoundError

    return isinstance(
        err,
        (
            InputError,
            UsageError,
            ValueError,
            WeightsNotFoundError,
            HydraException,
            OmegaConfBaseException,
        ),
    )


def error_message(err: BaseException) -> str:
    """The message of ``err`` without Hydra's wrapping (InstantiationException → its cause)."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip() or type(err).__name__
    return text


def run_app(
    app: str,
    hydra_main: Callable[[], Any],
    argv_hook: Callable[[list[str]], list[str]] | None = None,
) -> None:
    """Start an app: argv rewriting, logging set-up, then Hydra; expected errors → one line, exit 2."""
    quiet_library_noise()
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        argv = list(sys.argv[1:])
        if argv_hook is not None:
            argv = argv_hook(argv)
        argv = expand_ranges(argv)
    except UsageError as err:
        _fail(app, err)
    sys.argv = [sys.argv[0], *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; this function decides what is shown
    try:
        hydra_main()
    except AbortRun as err:
        if full_error:
            raise
        _fail(app, err.code)
    except Exception as err:
        if full_error or not is_expected_error(err):
            raise
        _fail(app, err)
    finally:
        if not full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def _fail(app: str, err: BaseException | str | None) -> None:
    text = error_message(err) if isinstance(err, BaseException) else str(err)
    print(f"{app}: {text}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ------------------------------------------------------------------------------ logging
# (message regex, category, module regex) of warnings that say nothing about the user's run
_NOISE_WARNINGS = (
    (r"\s*`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    (
        r"\s*'hydra/launcher/(submitit_slurm|joblib)' is validated against ConfigStore schema",
        UserWarning,
        "",
    ),
)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _DropAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip … litlogger" advert (an INFO record on every Trainer)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


_ADVERT_FILTER = _DropAdverts()


def quiet_library_noise() -> None:
    """Filter the library noise of :data:`_NOISE_WARNINGS` and Lightning's advert, and nothing else.

    Why the launcher warning is noise: ``conf/hydra/launcher/{submitit_slurm,joblib}.yaml`` shadow
    the plugins' configs of the same name and list every key of their dataclasses (a test checks
    that), so they keep working once Hydra drops its "automatic schema matching".
    """
    for message, category, module in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _ADVERT_FILTER not in logger.filters:
            logger.addFilter(_ADVERT_FILTER)


quiet_library_noise()  # also in joblib / submitit workers, which import this module


def route_lightning_logs() -> None:
    """Let Lightning's log records reach the console once, through the root logger's handlers.

    Why: ``import lightning`` gives the ``lightning`` logger its own console handler *and* lets it
    propagate to the root logger, to which Hydra gave a console and a file handler: every Lightning
    line was printed twice. Lightning's own ``StreamHandler``s are removed and propagation is
    switched on. Does nothing while the root logger has no handler (plain Python, no Hydra).
    """
    if not logging.getLogger().handlers:
        return
    import lightning.pytorch  # noqa: F401  (importing it installs the handlers removed below)

    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's; not file handlers
                logger.removeHandler(handler)
        logger.propagate = True


def _log_to_files(level: int, message: str) -> None:
    """A record for the job's log file(s) only (the console gets the app's one-line error)."""
    record = logging.LogRecord(__name__, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


# ------------------------------------------------------------------------------ job folder names
DIRNAME_RESOLVER = "crc_dirname"
MAX_DIRNAME_BYTES = 150


def short_dirname(name: str, limit: int = MAX_DIRNAME_BYTES) -> str:
    """``name`` if it fits in ``limit`` bytes, else its head + ``~`` + 8 hex digits of its sha256.

    Why: a sweep job's folder is named after its overrides (``hydra.job.override_dirname``), and
    file systems refuse names over 255 bytes — reached by a few overrides with Optuna's 17-digit
    floats. Deterministic, so a re-run of the same job finds its folder (``resume=true``).
    """
    raw = str(name).encode()
    if len(raw) <= limit:
        return str(name)
    digest = hashlib.sha256(raw).hexdigest()[:8]
    return raw[: limit - 9].decode(errors="ignore") + "~" + digest


GPUS_RESOLVER = "crc_gpus"


def gpus_per_job(accelerator: Any, devices: Any) -> int | None:
    """GPUs a scheduler should give a job of this trainer: ``devices`` for a GPU (or ``auto``)
    trainer, None (ask for none) on CPU — ``trainer=cpu`` / ``ddp_sim`` jobs fit CPU-only nodes.
    A device list counts its entries; ``devices=auto``/``-1`` cannot be counted: None."""
    if str(accelerator).lower() == "cpu":
        return None
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    try:
        n = int(devices)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def register_resolvers() -> None:
    """``${crc_dirname:…}`` (:func:`short_dirname`) for ``hydra.sweep.subdir`` and
    ``${crc_gpus:accelerator,devices}`` (:func:`gpus_per_job`) for the SLURM launcher."""
    if not OmegaConf.has_resolver(DIRNAME_RESOLVER):
        OmegaConf.register_new_resolver(DIRNAME_RESOLVER, short_dirname)
    if not OmegaConf.has_resolver(GPUS_RESOLVER):
        OmegaConf.register_new_resolver(GPUS_RESOLVER, gpus_per_job)


register_resolvers()


# ------------------------------------------------------------------------------ jobs
_OPEN_LOGGERS: list[list[Any]] = []

F = TypeVar("F", bound=Callable[..., Any])


def is_multirun() -> bool:
    """True inside a job of a Hydra ``-m`` sweep (False in single runs and outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_label() -> str:
    """``job <n>`` inside a Hydra job (its number in the sweep), else ``job``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "job"
    job = HydraConfig.get().job
    return f"job {job.get('num', '?')}"


def track_loggers(loggers: Sequence[Any]) -> None:
    """Register the current job's loggers so :func:`task_wrapper` closes them however it ends."""
    if _OPEN_LOGGERS:
        _OPEN_LOGGERS[-1].extend(loggers)


def _close_loggers(loggers: Sequence[Any], failed: bool) -> None:
    from crc_lightning.tracking import finish_wandb

    for lg in loggers:
        try:
            finish_wandb([lg], failed=failed)
            lg.finalize("failed" if failed else "success")
        except Exception:  # closing must never hide the job's own outcome
            log.exception("could not close logger %s", type(lg).__name__)


def task_wrapper(func: F) -> F:
    """Run a job: record a failure in the job's log (one line for an expected error, the traceback
    for a bug; on the console too inside a sweep, where other jobs go on), re-raise, and always
    close the loggers the job opened."""

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        route_lightning_logs()
        _OPEN_LOGGERS.append([])
        failed = True
        try:
            result = func(*args, **kwargs)
            failed = False
            return result
        except Exception as err:
            if is_expected_error(err):
                message = f"{job_label()} failed: {error_message(err)}"
                if is_multirun():
                    log.error(message)
                else:
                    _log_to_files(logging.ERROR, message)
            else:
                log.exception("%s failed", func.__name__)
            raise
        finally:
            _close_loggers(_OPEN_LOGGERS.pop(), failed)

    return wrapped  # type: ignore[return-value]


# ------------------------------------------------------------------------------ instantiation
def plain(node: Any) -> Any:
    """An OmegaConf node as plain containers (resolved); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises the target's own error (e.g. WeightsNotFoundError)
    instead of Hydra's InstantiationException wrapper, so callers and users see the real cause."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, Exception):
            raise cause from None
        raise


def _instantiate_group(cfg: DictConfig | Mapping | None, what: str) -> list[Any]:
    if not cfg:
        return []
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise TypeError(f"{what} config must be a mapping of name → config, got {type(cfg)}")
    out = []
    for name, sub in cfg.items():
        if isinstance(sub, (DictConfig, Mapping)) and "_target_" in sub:
            log.debug("instantiating %s %s", what, name)
            out.append(instantiate(sub))
    return out


def instantiate_callbacks(cfg: DictConfig | Mapping | None) -> list[Any]:
    """``callbacks:`` group → Lightning callbacks (entries without ``_target_`` are skipped)."""
    return _instantiate_group(cfg, "callback")


def instantiate_loggers(cfg: DictConfig | Mapping | None) -> list[Any]:
    """``logger:`` group → Lightning loggers (empty for ``logger=none``)."""
    return _instantiate_group(cfg, "logger")


def get_metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    """The value named ``name`` (``val/auc`` or ``val.auc``) in a nested metrics dict, for sweepers."""
    if not name:
        return None
    node: Any = metrics
    for part in re.split(r"[/.]", str(name)):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(
                f"optimized_metric={name!r} is not in the run's metrics (keys: {list(metrics)})"
            )
        node = node[part]
    return None if node is None else float(node)
