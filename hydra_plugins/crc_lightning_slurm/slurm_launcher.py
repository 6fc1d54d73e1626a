"""The SLURM launcher of ``hydra/launcher=submitit_slurm``: the plugin's, with honest job states.

(It lives in the ``hydra_plugins`` namespace because Hydra instantiates launchers from there only;
it imports nothing of ``crc_lightning``, so Hydra's plugin scan in any app stays cheap.)

``hydra-submitit-launcher`` (1.2) runs each sweep job as one SLURM job through submitit. Two things
it does that a cluster user does not want, changed here (tested against a real slurmctld/slurmd,
``tests/apps/test_slurm.py``):

* a job whose task raised still *exits 0*: the plugin hands the error back inside a successful
  result, so ``sacct`` says COMPLETED for a job that failed. Here the job re-raises after Hydra has
  finished it (its log written, its callbacks run), so the job exits non-zero and SLURM records
  FAILED, with the traceback in ``<sweep>/.submitit/<job id>/<job id>_0_log.err``;
* the sweep stopped waiting at the first failed job. Here it waits for every job, then hands Hydra
  all outcomes: the finished jobs' results are kept, and the sweep ends with one
  :class:`SlurmJobFailed` line naming the failed job, its error and its SLURM log — the same
  behaviour as the basic launcher, whose sweep also fails after its jobs.

Everything else (sbatch parameters, the ``.submitit`` folder, job arrays) is the plugin's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as PluginSlurmLauncher,
)
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

__all__ = ["SlurmJobFailed", "SlurmLauncher"]


class SlurmJobFailed(ValueError):
    """A sweep job failed on SLURM: ``<its SLURM log>: SLURM job <id> (sweep job <n>) failed: <its
    error>``
    (a ``ValueError``, so the apps show it as one line and exit 2, like a job's input error)."""

    def __init__(self, log_file: str | Path, problem: str) -> None:
        self.log_file, self.problem = Path(log_file), problem
        super().__init__(f"{log_file}: {problem}")


def _job_error(text: str) -> str:
    """The job's own error line from submitit's FailedJobError text (which wraps the job's
    traceback between dashed lines, then names the log files)."""
    parts = str(text).split("-" * 22)
    trace = parts[1] if len(parts) >= 3 else str(text)
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


class SlurmLauncher(PluginSlurmLauncher):
    """``hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher`` whose failed jobs
    are FAILED in SLURM and whose sweep waits for all jobs (module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED and isinstance(ret._return_value, BaseException):
            raise ret._return_value  # submitit records it; the job exits non-zero: FAILED
        return ret

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        """The plugin's ``launch`` (same executor, parameters and job array), except that every
        job is waited for and a failed one becomes a FAILED :class:`JobReturn`."""
        import submitit

        assert self.config is not None and job_overrides
        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{(k if k in base else f"{self._EXECUTOR}_{k}"): v for k, v in params.items()}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append(
                (
                    list(overrides),
                    "hydra.sweep.dir",
                    idx,
                    f"job_id_for_{idx}",
                    Singleton.get_state(),
                )
            )
        jobs = executor.map_array(self, *zip(*job_params))
        log.info("SLURM jobs %s", ", ".join(str(j.job_id) for j in jobs))
        return [
            self._outcome(job, idx, list(overrides))
            for idx, (job, overrides) in enumerate(zip(jobs, job_overrides), start=initial_job_idx)
        ]

    @staticmethod
    def _outcome(job: Any, idx: int, overrides: list[str]) -> JobReturn:
        """The job's JobReturn once it has ended; a failed job → FAILED with :class:`SlurmJobFailed`."""
        try:
            return job.results()[0]
        except Exception as err:  # submitit's FailedJobError / UncompletedJobError
            error = SlurmJobFailed(
                job.paths.stderr,
                f"SLURM job {job.job_id} (sweep job {idx}) failed: {_job_error(err)}",
            )
            log.error("%s", error)
            ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
            ret.return_value = error
            return ret
