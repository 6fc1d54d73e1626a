"""DDP that works inside Hydra multiruns: every sweep job runs once, with all its ranks, in its own folder.

Why this module exists (measured with Lightning 2.6.6 / Hydra 1.3.8):

* Lightning's ``DDPStrategy`` starts ranks ≥ 1 by re-running ``sys.argv``. Under ``-m`` that is the whole
  sweep command, so rank 1 starts a second sweep in another, differently time-stamped folder; the
  numbers come out right only by accident. Lightning's multirun support was reverted (PR 15737).
* After a job, a leaked process group and ``LOCAL_RANK``/``MASTER_PORT``… in ``os.environ`` make the next
  job of the sweep fail (``gloo … Connection closed by peer``), and processes abort at exit in about half
  of the runs unless the process group is destroyed in teardown.

The route taken here: a ``DDPStrategy`` subclass whose launcher starts each child rank as a *single run*
of the same app with the job's own overrides (``HydraConfig.get().overrides.task``) plus
``hydra.run.dir=<this job's output dir>`` and ``hydra.output_subdir=null`` — no ``-m``. Teardown destroys
the process group, waits for the children and clears the DDP environment variables, so the next job of
the sweep starts clean. Nothing is monkey-patched: Lightning imports its launcher helper by name in two
modules, so patching one does nothing; subclassing the launcher is the one seam that holds.

The launcher subclasses a private Lightning class, so it is pinned to the versions it was tested with
(``TESTED_LIGHTNING``) and refuses any other loudly; set ``CRC_ALLOW_UNTESTED_LIGHTNING=1`` to try anyway.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence

import lightning
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

log = logging.getLogger(__name__)

TESTED_LIGHTNING = ("2.5", "2.6")  # major.minor versions whose launcher internals were checked
DDP_ENV_VARS = (
    "LOCAL_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GLOBAL_RANK",
)
CHILD_WAIT_S = 600.0


class UntestedLightningError(RuntimeError):
    """The installed Lightning is not one this launcher was verified against."""


def check_lightning_version(version: str = lightning.__version__) -> None:
    major_minor = ".".join(version.split(".")[:2])
    if major_minor in TESTED_LIGHTNING or os.environ.get("CRC_ALLOW_UNTESTED_LIGHTNING") == "1":
        return
    raise UntestedLightningError(
        f"crc_lightning.distributed was tested with Lightning {', '.join(TESTED_LIGHTNING)}.x, but "
        f"{version} is installed. Its DDP launcher relies on Lightning internals "
        "(_SubprocessScriptLauncher); run the DDP tests (`pytest -m slow tests/test_distributed.py`) "
        "and add the version to TESTED_LIGHTNING, or set CRC_ALLOW_UNTESTED_LIGHTNING=1 to try anyway."
    )


def quote_override_value(value: str) -> str:
    """``value`` quoted for Hydra's override grammar: job folders hold ``=`` and ``,``
    (``hydra.job.override_dirname``), which an unquoted override cannot carry."""
    if "${" in value:
        raise ValueError(f"cannot pass {value!r} to a DDP child rank: it holds '${{'")
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot pass {value!r} to a DDP child rank: it holds both quote characters")


def hydra_job_child_command(local_rank: int) -> tuple[list[str], str] | None:
    """The command that starts rank ``local_rank`` of the *current Hydra job*, or None outside Hydra.

    The child gets exactly this job's overrides and writes into this job's folder; it is never a sweep.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is None:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    else:
        command = [sys.executable, "-m", spec.name]
    command += list(hc.overrides.task)
    command += [
        f"hydra.run.dir={quote_override_value(hc.runtime.output_dir)}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
    ]
    return command, hc.runtime.cwd


class UnsupportedLauncherError(RuntimeError):
    """DDP was asked for under a Hydra launcher whose workers cannot start extra ranks."""


def check_hydra_launcher() -> None:
    """Refuse DDP under Hydra's joblib launcher: its loky workers cannot re-launch the app, and the
    jobs fail in confusing ways (measured). One device per job works there; DDP sweeps use the
    basic launcher or SLURM."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover
        return
    if not HydraConfig.initialized():
        return
    target = str(HydraConfig.get().launcher.get("_target_", ""))
    if "joblib" in target.lower():
        raise UnsupportedLauncherError(
            "trainer=ddp / ddp_sim cannot run under hydra/launcher=joblib: joblib's worker "
            "processes cannot start the other DDP ranks. Use one device per job with joblib "
            "(trainer=cpu or trainer=gpu), or drop hydra/launcher for DDP sweeps (jobs run one "
            "after another, each on all its devices), or use hydra/launcher=submitit_slurm on a "
            "cluster."
        )


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Starts ranks ≥ 1 as single runs of the current Hydra job (see the module docstring)."""

    def _call_children_scripts(self) -> None:
        if hydra_job_child_command(1) is None:
            super()._call_children_scripts()
            return
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        for local_rank in range(1, self.num_processes):
            child_env = os.environ.copy()
            child_env["LOCAL_RANK"] = str(local_rank)
            if os.environ.get("PL_GLOBAL_SEED") is None:
                child_env.pop("PL_GLOBAL_SEED", None)
            command, cwd = hydra_job_child_command(local_rank)  # type: ignore[misc]
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=cwd))


class HydraJobDDPStrategy(DDPStrategy):
    """``DDPStrategy`` for Hydra apps: single runs and ``-m`` sweeps alike (``trainer=ddp|ddp_sim``)."""

    strategy_name = "ddp_hydra_job"

    def __init__(self, *args, **kwargs) -> None:
        check_lightning_version()
        check_hydra_launcher()
        super().__init__(*args, **kwargs)

    def _configure_launcher(self) -> None:
        # Under SLURM (or torchrun) the cluster environment ``creates_processes_externally``, and
        # ``_SubprocessScriptLauncher.launch`` then starts no child: every rank is a SLURM task.
        assert self.cluster_environment is not None
        if self._start_method != "popen":
            super()._configure_launcher()
            return
        self._launcher = HydraJobLauncher(
            self.cluster_environment, self.num_processes, self.num_nodes
        )


def finish_job(trainer=None) -> None:
    """End of a job (every rank): close DDP so the next job of a sweep starts clean.

    Not done in ``Strategy.teardown``: that runs after ``fit`` too, and ``test`` still needs the group.
    """
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    end_process_group(getattr(launcher, "procs", ()))


def end_process_group(children: Sequence[subprocess.Popen] = ()) -> None:
    """Destroy the process group, reap child ranks and clear the DDP variables (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for proc in children:
        try:
            code = proc.wait(timeout=CHILD_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error(
                "DDP child rank (pid %s) did not exit in %.0f s; killing it", proc.pid, CHILD_WAIT_S
            )
            proc.kill()
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"a DDP child rank exited with code {code}")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for name in DDP_ENV_VARS:
            os.environ.pop(name, None)
