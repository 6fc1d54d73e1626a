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

from crc_lightning.apps._hydra import CONF_DIR, UsageError, config_int, run_app
from crc_lightning.evaluation.report import LEVELS, default_out_dir, find_job_dirs, make_report

__all__ = ["main", "report", "validate"]


def _report_dir(sweep: str, out_dir: str | None = None) -> str:
    """Where the report goes: ``out_dir``, else the sweep folder (common parent of a glob's matches)."""
    if out_dir:
        return str(out_dir)
    if glob.has_magic(str(sweep)) and not glob.glob(str(sweep)):
        return "."  # nothing matched: make_report raises a clear error; write nowhere new
    return str(default_out_dir([], [sweep]))


if not OmegaConf.has_resolver("crc_report_dir"):
    OmegaConf.register_new_resolver("crc_report_dir", _report_dir)


def validate(cfg: DictConfig) -> None:
    """Checks of a report config before any work or file (Hydra callback ``ValidateConfig``)."""
    from crc_lightning.cropstore.format import BUILD_HINT, is_store
    from crc_lightning.io.errors import InputError

    if OmegaConf.is_missing(cfg, "sweep"):
        raise UsageError(
            "`sweep=` is required: a sweep folder or a glob of them, e.g. "
            "`python -m crc_lightning.report sweep=outputs/run/multiruns/<time>`"
        )
    find_job_dirs(str(cfg.sweep))  # the sweep folder(s) exist and hold finished jobs
    levels = [str(lv) for lv in cfg.levels]
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown or not levels:
        raise UsageError(f"`levels={levels}`: choose among {list(LEVELS)}")
    if not 0 < float(cfg.ci) < 1:
        raise UsageError(f"`ci={cfg.ci}`: a confidence level in (0, 1), e.g. `ci=0.95`")
    config_int(cfg, "permutations", minimum=1, example=2000)
    config_int(cfg, "seed", example=0)
    store = cfg.get("store")
    if store and not is_store(str(store)):
        raise InputError(Path(str(store)), f"store=: no crop store here; {BUILD_HINT}")


def jobs_store(job_dirs: list[Path]) -> str | None:
    """The crop store the jobs were trained on, when it is still there unchanged: ``data.store``
    of a job's saved config (``.hydra/config.yaml``) whose index hash is the ``store_hash`` its
    metrics.json recorded. So the report draws Fig 2 (sample crops per class) without ``store=``."""
    import json

    from crc_lightning.cropstore.format import is_store, store_hash

    for job in job_dirs:
        saved = job / ".hydra" / "config.yaml"
        try:
            want = json.loads((job / "metrics.json").read_text(encoding="utf-8"))["data"][
                "store_hash"
            ]
            store = OmegaConf.select(OmegaConf.load(saved), "data.store")
        except Exception:  # an older job, a config that no longer resolves: no figure, no error
            continue
        if store and is_store(str(store)) and store_hash(str(store)) == want:
            return str(store)
    return None


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
        store=cfg.get("store") or jobs_store(find_job_dirs(str(cfg.sweep))),
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
    path = report(cfg)
    print(f"open in a browser: {path.with_suffix('.html')}")
    print(path)  # the last line: report.md (scripts read it)


def main() -> None:
    run_app("report", _hydra_main)
