"""Helpers shared by the Hydra apps (``python -m crc_lightning.<app>``).

* :func:`expand_ranges` / :func:`prepare_argv` — ``key=a..b`` in a ``-m`` sweep means a, …, b
  inclusive (Hydra's own ``range(a,b)`` excludes ``b``, which is not what people type); each app's
  ``main()`` rewrites ``sys.argv`` before Hydra parses it. In a single run a range is an error.
* :func:`task_wrapper` — logs the exception of a failed job (so one failure in a sweep is visible
  in that job's log) and always closes the job's loggers (W&B run finished, CSV flushed); routes
  Lightning's log records through Hydra's handlers only (:func:`route_lightning_logs`), so each line
  is printed once and lands in the job's ``<job name>.log``.
* :func:`short_dirname` — the ``${crc_dirname:…}`` resolver of ``hydra.sweep.subdir``: job folder
  names bounded to 150 bytes (long override lists made names the file system refuses).
* :func:`quiet_shadowed_plugin_configs` — ``conf/hydra/launcher/{submitit_slurm,joblib}.yaml``
  shadow the launcher plugins' configs of the same name; Hydra's deprecation warning about that is
  silenced for these two files only (at import of this module, so joblib/SLURM workers too).
* :func:`instantiate_callbacks` / :func:`instantiate_loggers` — config groups → objects.
* :class:`SweepReportCallback` — Hydra callback: at the end of a ``-m`` sweep, builds the report
  over the sweep's jobs if ``crc_lightning.evaluation.report.report_from_jobs`` exists.
* :class:`SweepSelectionCallback` — Hydra callback: at the end of a ``-m`` sweep (a grid search),
  writes ``selection.json`` / ``selection.md``: the best job by its *validation* metric
  (``optimized_metric``), its overrides, and its test metrics beside it (reported, never used).
* :func:`is_multirun` / :func:`job_summary_line` — in ``-m`` sweeps the progress bars are off and
  each finished job prints one line instead (bars of consecutive or parallel jobs interleave).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = [
    "RangeOutsideSweepError",
    "RegisterResolvers",
    "SweepReportCallback",
    "SweepSelectionCallback",
    "expand_ranges",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "is_multirun",
    "job_label",
    "job_summary_line",
    "prepare_argv",
    "quiet_shadowed_plugin_configs",
    "register_resolvers",
    "route_lightning_logs",
    "short_dirname",
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
    quiet_shadowed_plugin_configs()
    sys.argv = [sys.argv[0], *expand_ranges(sys.argv[1:])]


# ------------------------------------------------------------------------------ launcher configs
# conf/hydra/launcher/<name>.yaml files that shadow a plugin's ConfigStore entry of the same name
SHADOWED_PLUGIN_CONFIGS = ("hydra/launcher/submitit_slurm", "hydra/launcher/joblib")


def quiet_shadowed_plugin_configs() -> None:
    """Silence Hydra 1.3's "validated against ConfigStore schema with the same name … deprecated"
    warning for :data:`SHADOWED_PLUGIN_CONFIGS` only.

    Why the warning is noise here: the project's YAML comes first in Hydra's search path, so
    ``hydra/launcher=submitit_slurm`` selects it; it lists every key of the plugin's dataclass
    (a test checks that), so it works the same once Hydra drops the schema matching.
    """
    for name in SHADOWED_PLUGIN_CONFIGS:
        warnings.filterwarnings(
            "ignore",
            message=rf"\s*'{re.escape(name)}' is validated against ConfigStore schema",
            category=UserWarning,
        )


quiet_shadowed_plugin_configs()  # also in joblib / submitit workers, which import this module


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


def register_resolvers() -> None:
    """``${crc_dirname:…}`` (:func:`short_dirname`) for ``hydra.sweep.subdir``."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(DIRNAME_RESOLVER):
        OmegaConf.register_new_resolver(DIRNAME_RESOLVER, short_dirname)


register_resolvers()


class RegisterResolvers(HydraCallback):
    """Listed in conf/hydra/default.yaml so that every app — and every joblib or SLURM worker,
    which unpickles the callbacks — has imported this module, and so :func:`register_resolvers`,
    before Hydra names a job folder. Does nothing else."""


# ------------------------------------------------------------------------------ console logging
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def route_lightning_logs() -> None:
    """Let Lightning's log records reach the console once, through the root logger's handlers.

    Why: ``import lightning`` gives the ``lightning`` logger its own console handler *and* lets it
    propagate to the root logger, to which Hydra gave a console and a file handler: every Lightning
    line was printed twice. (Had ``lightning.pytorch`` been imported before Hydra set up logging,
    it would instead have its own handler and no propagation, and its lines would miss the job's
    log file.) Lightning's own ``StreamHandler``s are removed and propagation is switched on. Does
    nothing while the root logger has no handler (plain Python, no Hydra): Lightning's handlers
    are then the only console output.
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
        route_lightning_logs()
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


# ------------------------------------------------------------------------------ sweep jobs
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


def job_summary_line(result: Mapping[str, Any], seconds: float, note: str = "") -> str:
    """One line for a finished sweep job: its settings, validation and test AUCs, duration."""

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{float(x):.3f}"

    val = result.get("val", {}) or {}
    levels = result.get("metrics", {}) or {}
    tests = " ".join(f"{k}={fmt(v.get('auc'))}" for k, v in levels.items())
    head = " ".join(f"{k}={result[k]}" for k in ("variant", "res", "seed", "labels") if k in result)
    extra = f" {note}" if note else ""
    return (
        f"[{job_label()}] {head}: val auc={fmt(val.get('auc'))} loss={fmt(val.get('loss'))} | "
        f"test auc {tests or '-'} | {seconds:.0f} s{extra}"
    )


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


def _finished_jobs(config: DictConfig, product: str) -> tuple[Path, list[Path]]:
    """The sweep folder and its finished jobs (with metrics.json); warns when there is none, since
    the sweep-end ``product`` (report, selection) is then skipped."""
    sweep_dir = Path(config.hydra.sweep.dir)
    jobs = sweep_job_dirs(sweep_dir)
    if not jobs:
        log.warning("sweep %s: no job wrote metrics.json; no %s", sweep_dir, product)
    return sweep_dir, jobs


class SweepReportCallback(HydraCallback):
    """At the end of a ``-m`` sweep, write the report of its jobs into ``<sweep dir>/report``.

    Does nothing when no job finished; a report failure is
    logged, never raised (the jobs' own results are already on disk).
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from crc_lightning.evaluation.report import report_from_jobs

        sweep_dir, jobs = _finished_jobs(config, "report")
        if not jobs:
            return
        try:
            report_from_jobs(jobs, sweep_dir / "report")
            log.info("sweep report: %s", sweep_dir / "report")
        except Exception:
            log.exception("sweep report failed (job results are in %s)", sweep_dir)


# ------------------------------------------------------------------------------ model selection
def _job_overrides(job_dir: Path) -> list[str]:
    """The job's own overrides (``.hydra/overrides.yaml``), or [] when Hydra did not save them."""
    from omegaconf import OmegaConf

    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in OmegaConf.load(path)]


def select_best_job(
    job_dirs: Sequence[Path], metric: str, mode: str = "max"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The best job by ``metric`` (a *validation* key of metrics.json, e.g. ``val/auc``).

    Returns (best row, all rows sorted best first). Jobs without the metric (None: e.g. a
    validation set with one class) rank last; ties go to the lower job folder name.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"optimized_mode must be max or min, got {mode!r}")
    if not str(metric).replace(".", "/").startswith("val/"):
        raise ValueError(
            f"optimized_metric={metric!r}: model selection must use a validation metric (val/…), "
            "never the test set"
        )
    rows = []
    for job in job_dirs:
        result = json.loads((job / "metrics.json").read_text())
        rows.append(
            {
                "job": job.name,
                "overrides": _job_overrides(job),
                "value": get_metric_value(result, metric),
                "val": result.get("val"),
                "test": {
                    level: {k: v.get(k) for k in ("auc", "f1_macro", "hamming", "n")}
                    for level, v in (result.get("metrics") or {}).items()
                },
            }
        )
    if not rows:
        raise ValueError("no finished job (metrics.json) to select from")
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted(
        rows,
        key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0), r["job"]),
    )
    return ranked[0], ranked


def _selection_markdown(best: Mapping[str, Any], ranked: Sequence[Mapping[str, Any]], metric: str,
                        mode: str) -> str:  # fmt: skip
    def fmt(x: Any) -> str:
        return "–" if x is None else f"{float(x):.4f}"

    lines = [
        "# Model selection",
        "",
        f"Selected by **{metric}** ({mode}) on the inner validation split; test metrics are shown "
        "for reporting only and played no part in the choice.",
        "",
        f"**Chosen:** `{best['job']}`  ",
        f"**Overrides:** `{' '.join(best['overrides']) or '(none)'}`",
        "",
        f"| rank | job | {metric} | test AUC (image) | test AUC (lesion) | test AUC (patient) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(ranked, 1):
        t = r["test"]
        lines.append(
            f"| {i} | `{r['job']}` | {fmt(r['value'])} | "
            + " | ".join(
                fmt(t.get(level, {}).get("auc")) for level in ("image", "lesion", "patient")
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


class SweepSelectionCallback(HydraCallback):
    """At the end of a ``-m`` sweep, write ``selection.json`` + ``selection.md`` into the sweep dir:
    the job with the best ``optimized_metric`` (validation), its overrides and test metrics.

    A failure is logged, never raised: the jobs' own results are already on disk.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        metric = config.get("optimized_metric")
        if not metric:
            return
        mode = str(config.get("optimized_mode", "max"))
        sweep_dir, jobs = _finished_jobs(config, "selection")
        if not jobs:
            return
        try:
            best, ranked = select_best_job(jobs, str(metric), mode)
            doc = {"metric": str(metric), "mode": mode, "best": best, "jobs": ranked}
            write_json_atomic(sweep_dir / "selection.json", doc)
            (sweep_dir / "selection.md").write_text(
                _selection_markdown(best, ranked, str(metric), mode)
            )
            log.info("selected %s (%s=%s): %s", best["job"], metric, best["value"],
                     sweep_dir / "selection.json")  # fmt: skip
        except Exception:
            log.exception("model selection failed (job results are in %s)", sweep_dir)
