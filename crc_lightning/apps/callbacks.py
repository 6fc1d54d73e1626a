"""Hydra callbacks of the apps: resolvers in every worker, the sweep report and model selection.

* :class:`RegisterResolvers` — listed in ``conf/hydra/default.yaml`` so that every app, and every
  joblib or SLURM worker (which unpickles the callbacks), has registered ``${crc_dirname:…}``
  before Hydra names a job folder;
* :class:`SweepReportCallback` — at the end of a ``run -m`` sweep, the report over its jobs;
* :class:`SweepSelectionCallback` — at the end of a sweep (a grid search), ``selection.json`` /
  ``selection.md``: the best job by its *validation* metric (``optimized_metric``), its overrides
  and its test metrics beside it (reported, never used).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from crc_lightning.apps._hydra import get_metric_value, register_resolvers
from crc_lightning.io.files import write_atomic, write_json

log = logging.getLogger(__name__)

__all__ = [
    "RegisterResolvers",
    "SweepReportCallback",
    "SweepSelectionCallback",
    "select_best_job",
    "sweep_job_dirs",
]


class RegisterResolvers(HydraCallback):
    """Makes sure this module, hence :func:`register_resolvers`, is imported in every process."""

    def __init__(self) -> None:
        register_resolvers()


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


def _selection_markdown(
    best: Mapping[str, Any], ranked: Sequence[Mapping[str, Any]], metric: str, mode: str
) -> str:
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
            write_json(sweep_dir / "selection.json", doc)
            write_atomic(
                sweep_dir / "selection.md", _selection_markdown(best, ranked, str(metric), mode)
            )
            log.info(
                "selected %s (%s=%s): %s",
                best["job"],
                metric,
                best["value"],
                sweep_dir / "selection.json",
            )
        except Exception:
            log.exception("model selection failed (job results are in %s)", sweep_dir)
