"""Helpers shared by the Hydra apps (``python -m crc_lightning.<app>``).

* :func:`expand_ranges` / :func:`prepare_argv` — ``key=a..b`` in a ``-m`` sweep means a, …, b
  inclusive (Hydra's own ``range(a,b)`` excludes ``b``, which is not what people type); each app's
  ``main()`` rewrites ``sys.argv`` before Hydra parses it. In a single run a range is an error.
* :func:`task_wrapper` — logs the exception of a failed job (so one failure in a sweep is visible
  in that job's log) and always closes the job's loggers (W&B run finished, CSV flushed).
* :func:`instantiate_callbacks` / :func:`instantiate_loggers` — config groups → objects.
* :class:`SweepReportCallback` — Hydra callback: at the end of a ``-m`` sweep, builds the report
  over the sweep's jobs if ``crc_lightning.evaluation.report.report_from_jobs`` exists.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = [
    "RangeOutsideSweepError",
    "SweepReportCallback",
    "expand_ranges",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "prepare_argv",
    "task_wrapper",
    "track_loggers",
    "write_json_atomic",
]

# key=a..b (optionally +key / ++key / ~key); a, b integers (negative allowed)
_RANGE = re.compile(r"^(?P<key>(?:\+\+|\+|~)?[A-Za-z_][\w./@-]*)=(?P<a>-?\d+)\.\.(?P<b>-?\d+)$")
_MULTIRUN_FLAGS = ("-m", "--multirun")


class RangeOutsideSweepError(SystemExit):
    """``key=a..b`` given without ``-m``: a range only makes sense in a sweep."""


def _is_multirun(argv: Sequence[str]) -> bool:
    return any(a in _MULTIRUN_FLAGS for a in argv)


def expand_ranges(argv: Sequence[str]) -> list[str]:
    """``key=a..b`` → ``key=range(a,b+1)`` (inclusive) when ``argv`` is a ``-m`` sweep.

    Raises :class:`RangeOutsideSweepError` for a range in a single run, or a range with ``a > b``.
    """
    multirun = _is_multirun(argv)
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


def prepare_argv() -> None:
    """Apply :func:`expand_ranges` to ``sys.argv`` (call in each app's ``main()`` before Hydra)."""
    sys.argv = [sys.argv[0], *expand_ranges(sys.argv[1:])]


# ------------------------------------------------------------------------------ task wrapper
_OPEN_LOGGERS: list[list[Any]] = []

F = TypeVar("F", bound=Callable[..., Any])


def track_loggers(loggers: Sequence[Any]) -> None:
    """Register the current job's loggers so :func:`task_wrapper` closes them however it ends."""
    if _OPEN_LOGGERS:
        _OPEN_LOGGERS[-1].extend(loggers)


def _close_loggers(loggers: Sequence[Any], failed: bool) -> None:
    try:
        from crc_lightning.loggers import finish_wandb
    except ImportError:  # pragma: no cover
        finish_wandb = None  # type: ignore[assignment]
    for lg in loggers:
        try:
            if finish_wandb is not None:
                finish_wandb([lg], failed=failed)
            lg.finalize("failed" if failed else "success")
        except Exception:  # closing must never hide the job's own outcome
            log.exception("could not close logger %s", type(lg).__name__)


def task_wrapper(func: F) -> F:
    """Run a job: log its exception (then re-raise), always close the loggers it opened."""

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _OPEN_LOGGERS.append([])
        failed = True
        try:
            result = func(*args, **kwargs)
            failed = False
            return result
        except Exception:
            log.exception("%s failed", func.__name__)
            raise
        finally:
            _close_loggers(_OPEN_LOGGERS.pop(), failed)

    return wrapped  # type: ignore[return-value]


# ------------------------------------------------------------------------------ instantiation
def _instantiate_group(cfg: DictConfig | Mapping | None, what: str) -> list[Any]:
    import hydra

    if not cfg:
        return []
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise TypeError(f"{what} config must be a mapping of name → config, got {type(cfg)}")
    out = []
    for name, sub in cfg.items():
        if isinstance(sub, (DictConfig, Mapping)) and "_target_" in sub:
            log.debug("instantiating %s %s", what, name)
            out.append(hydra.utils.instantiate(sub))
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


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON via a temporary file + ``os.replace``: a killed job leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ sweep report
def sweep_job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Job folders of a sweep that hold a ``metrics.json`` (sorted)."""
    return sorted(p.parent for p in Path(sweep_dir).rglob("metrics.json"))


class SweepReportCallback(HydraCallback):
    """At the end of a ``-m`` sweep, write the report of its jobs into ``<sweep dir>/report``.

    Does nothing when the report app is not installed or no job finished; a report failure is
    logged, never raised (the jobs' own results are already on disk).
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            from crc_lightning.evaluation.report import report_from_jobs
        except ImportError:
            log.info("no report app (crc_lightning.evaluation.report); skipping the sweep report")
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_job_dirs(sweep_dir)
        if not jobs:
            log.warning("sweep %s: no job wrote metrics.json; no report", sweep_dir)
            return
        try:
            report_from_jobs(jobs, sweep_dir / "report")
            log.info("sweep report: %s", sweep_dir / "report")
        except Exception:
            log.exception("sweep report failed (job results are in %s)", sweep_dir)
