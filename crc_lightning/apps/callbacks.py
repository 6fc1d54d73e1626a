"""Hydra callbacks of the apps: resolvers in every worker, the sweep report and model selection.

* :class:`RegisterResolvers` — listed in ``conf/hydra/default.yaml`` so that every app, and every
  joblib or SLURM worker (which unpickles the callbacks), has registered ``${crc_dirname:…}``
  before Hydra names a job folder;
* :class:`SweepReportCallback` — at the end of a ``run -m`` sweep, the report over its jobs;
* :class:`ValidationMetricCallback` — before a sweep's first job (any sweeper, Optuna included):
  refuse an ``optimized_metric`` that is not an inner-validation metric (:func:`check_optimized_metric`);
* :class:`SweepSelectionCallback` — at the end of a sweep (a grid search), ``selection.json`` /
  ``selection.md``: per (labels, variant, res) group, the best setting by its *validation* metric
  (``optimized_metric``, averaged over the seeds and folds of that setting), its overrides and its
  test metrics beside it (reported, never used).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from crc_lightning.apps._hydra import AbortRun, UsageError, get_metric_value, register_resolvers
from crc_lightning.io.files import write_atomic, write_json

log = logging.getLogger(__name__)

__all__ = [
    "VALIDATION_METRICS",
    "RegisterResolvers",
    "SweepReportCallback",
    "SweepSelectionCallback",
    "ValidationMetricCallback",
    "check_optimized_metric",
    "select_best_job",
    "select_per_group",
    "sweep_job_dirs",
]

# what a job may return to a sweeper / be selected by: metrics.json "val" (inner validation)
VALIDATION_METRICS = ("val/auc", "val/loss")
# overrides that make jobs repeats of one setting rather than different settings
REPEAT_KEYS = ("seed", "split.fold", "split.repeat")
GROUP_KEYS = ("labels", "variant", "res")


class RegisterResolvers(HydraCallback):
    """Makes sure this module, hence :func:`register_resolvers`, is imported in every process."""

    def __init__(self) -> None:
        register_resolvers()


def check_optimized_metric(metric: str | None, mode: str | None = "max") -> None:
    """Refuse an ``optimized_metric`` other than an inner-validation metric (``val/auc``,
    ``val/loss``; ``val.auc`` spelled with dots too): a test metric (``metrics.patient.auc``)
    would tune on the test patients. None (no sweeper objective) is fine."""
    if mode not in ("max", "min"):
        raise UsageError(f"optimized_mode must be max or min, got {mode!r}")
    if metric in (None, ""):
        return
    name = str(metric).replace(".", "/")
    if name not in VALIDATION_METRICS:
        raise UsageError(
            f"optimized_metric={metric!r}: a sweep may only optimise or select on an inner-"
            f"validation metric ({', '.join(VALIDATION_METRICS)}), never on the test set"
        )


class ValidationMetricCallback(HydraCallback):
    """Before the first job of a ``run -m`` sweep (grid, Optuna, …): refuse an ``optimized_metric``
    that is not a validation metric, and an Optuna direction that contradicts ``optimized_mode``.

    An :class:`~crc_lightning.apps._hydra.AbortRun`, since Hydra turns a callback's ordinary
    exception into a warning and the sweep would run on.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        mode = config.get("optimized_mode", "max")
        try:
            check_optimized_metric(config.get("optimized_metric"), mode)
        except UsageError as err:
            raise AbortRun(str(err)) from err
        direction = config.hydra.sweeper.get("direction") if "hydra" in config else None
        want = {"max": "maximize", "min": "minimize"}[str(mode)]
        if isinstance(direction, str) and direction != want:
            raise AbortRun(
                f"hydra.sweeper.direction={direction} but optimized_mode={mode} "
                f"({config.get('optimized_metric')}): give hydra.sweeper.direction={want}"
            )


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
    """At the end of a ``-m`` sweep, write the report of its jobs into ``<sweep dir>/report``
    (and its tables to W&B when the jobs logged there).

    ``window``: the CT window (``input.window``) and ``store``: the crop store (``data.store``)
    of the sample-crops figure (Fig 2, a gallery per class), drawn when the store is there. Does
    nothing when no job finished; a report failure is logged, never raised (the jobs' own
    results are on disk).
    """

    def __init__(self, window: Mapping[str, float] | None = None, store: str | None = None) -> None:
        self.window = dict(window) if window else None
        self.store = store

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from crc_lightning.evaluation.report import report_from_jobs
        from crc_lightning.tracking import log_report

        sweep_dir, jobs = _finished_jobs(config, "report")
        if not jobs:
            return
        try:
            from crc_lightning.cropstore.format import is_store

            window = (self.window["width"], self.window["level"]) if self.window else None
            store = self.store if self.store and is_store(self.store) else None
            report = report_from_jobs(jobs, sweep_dir / "report", window=window, store=store)
            log_report(jobs, report.parent)
            log.info("sweep report: %s (open %s)", report, report.with_suffix(".html"))
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


def _job_row(job: Path, metric: str) -> dict[str, Any]:
    result = json.loads((job / "metrics.json").read_text(encoding="utf-8"))
    overrides = _job_overrides(job)
    return {
        "job": job.name,
        "group": {k: result.get(k) for k in GROUP_KEYS},
        "overrides": overrides,
        # the setting: its overrides without the ones that only repeat it (seed, fold) or name
        # the group
        "setting": sorted(
            o
            for o in overrides
            if o.split("=", 1)[0].lstrip("+~") not in (*REPEAT_KEYS, *GROUP_KEYS)
        ),
        "value": get_metric_value(result, metric),
        "val": result.get("val"),
        "test": {
            level: {k: v.get(k) for k in ("auc", "f1_macro", "hamming", "n")}
            for level, v in (result.get("metrics") or {}).items()
        },
    }


def _rank(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Rows best first; None (e.g. a validation set with one class) last; ties → lower name."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0), r["job"]))


def select_best_job(
    job_dirs: Sequence[Path], metric: str, mode: str = "max"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The best job by ``metric`` (a *validation* key of metrics.json, ``val/auc`` or ``val/loss``)
    among ``job_dirs``, which should be comparable jobs (one group: :func:`select_per_group`).

    Returns (best row, all rows sorted best first). Jobs without the metric (None: e.g. a
    validation set with one class) rank last; ties go to the lower job folder name.
    """
    check_optimized_metric(metric, mode)
    rows = [_job_row(job, metric) for job in job_dirs]
    if not rows:
        raise ValueError("no finished job (metrics.json) to select from")
    ranked = _rank(rows, mode)
    return ranked[0], ranked


def select_per_group(
    job_dirs: Sequence[Path], metric: str, mode: str = "max"
) -> list[dict[str, Any]]:
    """Model selection per (labels, variant, res) group — never across label sets, variants or
    resolutions. Within a group, the jobs of one *setting* (the same overrides but for seed,
    ``split.fold``, ``split.repeat``; overrides all of the group's jobs share are not listed) are
    its repeats: a setting's value is the mean of their
    validation metric (None values left out), and settings are ranked by it.

    Returns one entry per group: ``{"group", "best": {"setting", "value", "n_jobs", "jobs"},
    "settings": [...best first], "jobs": [job rows best first]}``.
    """
    check_optimized_metric(metric, mode)
    rows = [_job_row(job, metric) for job in job_dirs]
    if not rows:
        raise ValueError("no finished job (metrics.json) to select from")
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(json.dumps(r["group"], sort_keys=True), []).append(r)
    out = []
    for key in sorted(groups):
        members = groups[key]
        # overrides every job of the group shares (the store, epochs, …) tell no setting apart
        shared = set.intersection(*(set(r["setting"]) for r in members))
        settings: dict[str, list[dict[str, Any]]] = {}
        for r in members:
            own = [o for o in r["setting"] if o not in shared]
            settings.setdefault(json.dumps(own), []).append(r)
        candidates = []
        for s_key, jobs in settings.items():
            values = [r["value"] for r in jobs if r["value"] is not None]
            candidates.append(
                {
                    "setting": json.loads(s_key),
                    "value": sum(values) / len(values) if values else None,
                    "n_jobs": len(jobs),
                    "jobs": sorted(r["job"] for r in jobs),
                    "job": min(r["job"] for r in jobs),  # tie-break, as for jobs
                }
            )
        ranked = _rank(candidates, mode)
        out.append(
            {
                "group": json.loads(key),
                "best": ranked[0],
                "settings": ranked,
                "jobs": _rank(members, mode),
            }
        )
    return out


def _selection_markdown(groups: Sequence[Mapping[str, Any]], metric: str, mode: str) -> str:
    def fmt(x: Any) -> str:
        return "–" if x is None else f"{float(x):.4f}"

    lines = [
        "# Model selection",
        "",
        f"Selected by **{metric}** ({mode}) on the inner validation split, per (labels, variant, "
        "res) group; a setting's value is the mean over its seeds and folds. Test metrics are "
        "shown for reporting only and played no part in the choice.",
    ]
    for g in groups:
        title = ", ".join(f"{k}={v}" for k, v in g["group"].items())
        best = g["best"]
        lines += [
            "",
            f"## {title}",
            "",
            f"**Chosen setting:** `{' '.join(best['setting']) or '(none)'}` "
            f"({metric} {fmt(best['value'])} over {best['n_jobs']} job(s))",
            "",
            f"| rank | job | {metric} | test AUC (image) | test AUC (lesion) | test AUC (patient) |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(g["jobs"], 1):
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
    per (labels, variant, res) group, the setting with the best ``optimized_metric`` (validation),
    its jobs and their test metrics (:func:`select_per_group`).

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
            groups = select_per_group(jobs, str(metric), mode)
            doc = {"metric": str(metric), "mode": mode, "groups": groups}
            write_json(sweep_dir / "selection.json", doc)
            write_atomic(sweep_dir / "selection.md", _selection_markdown(groups, str(metric), mode))
            for g in groups:
                log.info(
                    "selected %s for %s (%s=%s): %s",
                    " ".join(g["best"]["setting"]) or "(no override)",
                    g["group"],
                    metric,
                    g["best"]["value"],
                    sweep_dir / "selection.json",
                )
        except Exception:
            log.exception("model selection failed (job results are in %s)", sweep_dir)
