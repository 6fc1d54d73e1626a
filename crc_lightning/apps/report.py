"""``python -m crc_lightning.report sweep=<dir or glob>``: the experiment report of a sweep.

Thin Hydra shell over :func:`crc_lightning.evaluation.report.make_report`; prints report.md's path
and, when the sweep's jobs logged to W&B, sends its tables to one W&B report run. Hydra's run dir
is the report folder (resolver ``crc_report_dir``) and ``output_subdir`` is null, so the app writes
nothing outside the sweep folder (or ``out_dir``).
"""

from __future__ import annotations

import glob
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from crc_lightning.apps._hydra import CONF_DIR, run_app
from crc_lightning.evaluation.report import default_out_dir, find_job_dirs, make_report

__all__ = ["main", "report"]


def _report_dir(sweep: str, out_dir: str | None = None) -> str:
    """Where the report goes: ``out_dir``, else the sweep folder (common parent of a glob's matches)."""
    if out_dir:
        return str(out_dir)
    if glob.has_magic(str(sweep)) and not glob.glob(str(sweep)):
        return "."  # nothing matched: make_report raises a clear error; write nowhere new
    return str(default_out_dir([], [sweep]))


if not OmegaConf.has_resolver("crc_report_dir"):
    OmegaConf.register_new_resolver("crc_report_dir", _report_dir)


def report(cfg: DictConfig) -> Path:
    """Build the report described by a composed ``conf/report.yaml``; returns report.md's path."""
    path = make_report(
        str(cfg.sweep),
        out_dir=cfg.get("out_dir"),
        levels=[str(lv) for lv in cfg.levels],
        ci=float(cfg.ci),
        permutations=int(cfg.permutations),
        seed=int(cfg.seed),
        focus_class=str(cfg.focus_class),
        store=cfg.get("store"),
        figure_level=str(cfg.get("figure_level", "lesion")),
        window=(float(cfg.input.window.width), float(cfg.input.window.level)),
        patient_aggregation=str(cfg.get("patient_aggregation", "max")),
        threshold_rule=str(cfg.get("threshold_rule", "youden")),
        bootstrap=int(cfg.get("bootstrap", 2000)),
        tolerance=float(cfg.get("tolerance", 1e-9)),
        margin=float(cfg.get("margin", 0.0)),
    )
    if bool(cfg.get("wandb", True)):
        from crc_lightning.tracking import log_report

        log_report(find_job_dirs(str(cfg.sweep)), path.parent)
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def _hydra_main(cfg: DictConfig) -> None:
    print(report(cfg))


def main() -> None:
    run_app("report", _hydra_main)
