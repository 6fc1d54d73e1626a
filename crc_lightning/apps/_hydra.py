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

import contextlib
import copy
import functools
import hashlib
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict

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
# what a mistyped range looks like (seed=0..x, seed=1..): plain words around "..", no path
_RANGE_LIKE = re.compile(
    r"^(?P<key>(?:\+\+|\+|~)?[A-Za-z_][\w./@-]*)=(?P<value>[\w+-]+\.\.[\w+-]*|[\w+-]*\.\.[\w+-]+)$"
)
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
            bad = _RANGE_LIKE.match(arg)
            if bad is not None:
                raise UsageError(
                    f"`{arg}`: a range a..b needs two integers, e.g. `{bad['key']}=0..4` "
                    "(with -m: one job per value)"
                )
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
    return _one_line(text)


_DETAIL_LINES = ("full_key", "object_type", "reference_type")


def _one_line(text: str) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line: the message, then its facts
    ("Available options in 'labels': five, three"); the config search path is left out."""
    parts: list[str] = []
    options: list[str] | None = None
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or line.startswith(_DETAIL_LINES):
            continue
        if line.startswith("Config search path"):
            break
        if options is not None:
            options.append(line)
        elif line.startswith("Available options"):
            options = []
            if parts and not parts[-1].endswith((".", ":", ";")):
                parts[-1] += "."
            parts.append(line.rstrip(":") + ":")
        else:
            parts.append(line)
    return " ".join([*parts, ", ".join(options or [])]).strip() or text.strip()


_FULL_ERROR = False  # the user's HYDRA_FULL_ERROR=1 (run_app sets the variable for Hydra itself)


def run_app(
    app: str,
    hydra_main: Callable[[], Any],
    argv_hook: Callable[[list[str]], list[str]] | None = None,
) -> None:
    """Start an app: argv rewriting, logging set-up, then Hydra; expected errors → one line, exit 2."""
    global _FULL_ERROR
    quiet_library_noise()
    full_error = _FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"
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


# ------------------------------------------------------------------------------ validation
def config_int(cfg: DictConfig, key: str, minimum: int | None = None, example: int = 1) -> int:
    """The integer at dotted ``key`` of ``cfg``; a :class:`UsageError` naming the key otherwise.

    Why: ``res=abc`` or ``res=0`` used to fail deep inside kornia or torch, after the job folder
    was made; the apps check their numbers before any work (:class:`ValidateConfig`).
    """
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (minimum is None or value >= minimum):
        return int(value)
    what = {None: "an integer", 0: "an integer ≥ 0", 1: "a positive integer"}.get(
        minimum, f"an integer ≥ {minimum}"
    )
    raise UsageError(f"`{key}={value}`: {key} must be {what}, e.g. `{key}={example}`")


@contextlib.contextmanager
def _as_hydra_config(config: DictConfig) -> Iterator[None]:
    """``${hydra:…}`` interpolations of ``config`` resolve inside (Hydra sets this up only once
    the job's folder exists); the previous Hydra config is restored after."""
    from hydra.core.hydra_config import HydraConfig

    instance = HydraConfig.instance()
    previous = instance.cfg
    if OmegaConf.select(config, "hydra", default=None) is None:
        yield
        return
    instance.set_config(config)
    try:
        yield
    finally:
        instance.cfg = previous


def sweep_job_configs(
    config: DictConfig, config_name: str | None
) -> list[tuple[list[str], DictConfig]]:
    """``(swept overrides, composed config)`` of every job a ``-m`` sweep will launch.

    The basic sweeper's jobs (``a,b``, ``range(…)``, ``hydra.sweeper.params``) are enumerated as it
    enumerates them; a job's config is the sweep's config with its swept values set, composed
    again only for each distinct choice of swept config groups (``variant=a,b``: one composition
    per variant, not per job). Other sweepers (Optuna) draw their values while running: the
    sweep's own config is returned, the only one known before launch.
    """
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if not sweeper.endswith("BasicSweeper"):
        return [([], config)]
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    lines = [f"{k}={v}" for k, v in params.items()]
    lines += [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=[]) or []]
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(lines)
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    if not swept:
        return [([], config)]
    groups = set(OmegaConf.select(config, "hydra.runtime.choices", default={}) or {})
    hydra_overrides = [str(o) for o in config.hydra.overrides.hydra]
    composed: dict[tuple[str, ...], DictConfig] = {}
    jobs = []
    for batch in BasicSweeper.split_arguments(parsed, None):
        for job in batch:
            mine = [
                (line, o)
                for line, o in zip(job, parser.parse_overrides(job))
                if o.get_key_element() in swept
            ]
            swept_groups = tuple(
                line for line, o in mine if o.get_key_element() in groups or o.is_delete()
            )
            if swept_groups not in composed:
                composed[swept_groups] = (
                    compose(
                        config_name, overrides=[*job, *hydra_overrides], return_hydra_config=True
                    )
                    if swept_groups
                    else config
                )
            cfg = copy.deepcopy(composed[swept_groups])
            with open_dict(cfg):
                for line, o in mine:
                    if line not in swept_groups:
                        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
            jobs.append(([line for line, _ in mine], cfg))
    return jobs


class ValidateConfig(HydraCallback):
    """Check every job's config with the app's ``validator`` before Hydra makes any folder.

    Listed in each app's YAML (``hydra.callbacks.validate``). In a single run the composed config
    is checked in ``on_run_start``; in a ``-m`` sweep every job's config
    (:func:`sweep_job_configs`) in ``on_multirun_start`` — before the sweep folder exists, so a
    sweep with one bad value (``res=32,abc``) leaves nothing behind. An expected error becomes an
    :class:`AbortRun` (Hydra turns a callback's exceptions into warnings): ``<app>: <message>``,
    exit 2. The validators only read the config and the file system; they make nothing.
    """

    def __init__(self, validator: str) -> None:
        self.validator = validator

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check([([], config)])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            jobs = sweep_job_configs(config, kwargs.get("config_name"))
        except Exception as err:
            if not is_expected_error(err):
                raise
            raise AbortRun(error_message(err)) from None
        self._check(jobs)

    def _check(self, jobs: Sequence[tuple[list[str], DictConfig]]) -> None:
        from hydra.utils import get_method

        validate = get_method(self.validator)
        failures: dict[str, list[str]] = {}
        for swept, cfg in jobs:
            try:
                with _as_hydra_config(cfg):
                    validate(cfg)
            except Exception as err:
                if not is_expected_error(err):
                    raise
                if _FULL_ERROR:  # asked for: the traceback behind the one line
                    traceback.print_exception(err)
                failures.setdefault(error_message(err), []).append(" ".join(swept))
        if not failures:
            return
        message, where = next(iter(failures.items()))
        if len(jobs) > 1:  # a sweep: say which jobs, unless it is all of them
            notes = []
            if len(where) < len(jobs):
                shown = ", ".join(f"`{w}`" for w in where[:3]) + (", …" if len(where) > 3 else "")
                notes.append(f"job{'s' if len(where) > 1 else ''} {shown}")
            others = sum(len(v) for v in failures.values()) - len(where)
            if others:
                notes.append(f"{others} other job(s) fail for another reason")
            message += (f" ({'; '.join(notes)})" if notes else "") + " — nothing was launched"
        raise AbortRun(message)


# ------------------------------------------------------------------------------ logging
# (message regex, category, module regex) of warnings that say nothing about the user's run
_NOISE_WARNINGS = (
    (r"\s*`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    (
        r"\s*'hydra/launcher/(submitit_slurm|joblib)' is validated against ConfigStore schema",
        UserWarning,
        "",
    ),
    # on any machine with SLURM's client tools (a login node, a workstation with slurm-wlm):
    # jobs started by our own SLURM launcher run under srun, so the hint is only ever noise here
    (
        r"The `srun` command is available on your system but is not used",
        UserWarning,
        r"lightning\.",
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


# (message regex, what it means): warnings that repeat every validation step; one line per run
_REPEATED_WARNINGS = (
    (
        r"No positive samples in targets",
        "a class had no positive sample in a validation or test set (its AUC is undefined there)",
    ),
    (
        r"No negative samples in targets",
        "a class had no negative sample in a validation or test set (its AUC is undefined there)",
    ),
)


@contextlib.contextmanager
def collapse_repeated_warnings() -> Iterator[dict[str, int]]:
    """Count the :data:`_REPEATED_WARNINGS` (torchmetrics warns on every epoch whose targets
    lack a class) instead of showing each, then log one line per kind; other warnings pass."""
    counts: dict[str, int] = {}
    with warnings.catch_warnings():
        original = warnings.showwarning
        for pattern, _ in _REPEATED_WARNINGS:
            warnings.filterwarnings("always", message=pattern)  # count every one, not once

        def show(message: Any, category: Any, filename: str, lineno: int, *args: Any) -> None:
            text = str(message)
            for pattern, _ in _REPEATED_WARNINGS:
                if re.match(pattern, text):
                    counts[pattern] = counts.get(pattern, 0) + 1
                    return
            original(message, category, filename, lineno, *args)

        warnings.showwarning = show
        try:
            yield counts
        finally:
            warnings.showwarning = original
            for pattern, meaning in _REPEATED_WARNINGS:
                if counts.get(pattern):
                    log.warning("%s (warned %d× by torchmetrics)", meaning, counts[pattern])


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


CWD_RESOLVER = "crc_cwd"


def launch_cwd() -> str:
    """The folder the app was started from: Hydra's ``runtime.cwd`` inside a job, else the current
    folder (the main process of a ``-m`` sweep, where Hydra has no job config yet).

    Why not ``${hydra:runtime.cwd}`` in ``paths.root_dir``: the basic sweeper resolves
    ``hydra.sweep.dir`` (→ ``paths.log_dir`` → ``paths.root_dir``) before any job exists, so every
    ``-m`` sweep without an explicit ``paths.root_dir`` stopped with "HydraConfig was not set".
    """
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        cwd = OmegaConf.select(HydraConfig.get(), "runtime.cwd", default=None)
        if cwd:
            return str(cwd)
    return os.getcwd()


def register_resolvers() -> None:
    """``${crc_dirname:…}`` (:func:`short_dirname`) for ``hydra.sweep.subdir``, ``${crc_cwd:}``
    (:func:`launch_cwd`) for ``paths.root_dir`` and ``${crc_gpus:accelerator,devices}``
    (:func:`gpus_per_job`) for the SLURM launcher."""
    for name, fn in (
        (DIRNAME_RESOLVER, short_dirname),
        (CWD_RESOLVER, launch_cwd),
        (GPUS_RESOLVER, gpus_per_job),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


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
            with collapse_repeated_warnings():
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
