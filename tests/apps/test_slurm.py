"""Sweeps through a real SLURM: ``hydra/launcher=submitit_slurm`` against slurmctld + slurmd on this
machine (the ``slurm_cluster`` fixture, :mod:`tests.helpers.slurm`), as a user types them.

Oracles: SLURM's own accounting (``sacct``, from slurmdbd's database, and the ``jobcomp/filetxt``
record beside it) for each job's final state, and the files the jobs leave. The cluster has one
node with this machine's cores and no GPU, so these sweeps run ``trainer=cpu`` with one core and
1 GB per job (``SLURM_ARGS``) — the CPU-only cluster case: the launcher must ask for no GPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crc_lightning.cropstore.format import BUILD_HINT, CASES_DIR
from tests.apps.test_distributed import SWEEP_ARGS, _env, tree
from tests.apps.test_preprocess import shard_jobs, sharded_preprocess
from tests.helpers.stores import write_fake_store

LAUNCHER = ["hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=15"]  # fmt: skip
SLURM_ARGS = [*LAUNCHER, "trainer=cpu", "logger=none"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_fake_store(tmp_path_factory.mktemp("data") / "crops" / "fake", n_patients=20)


def slurm_sweep(cluster, tmp: Path, app: str, *overrides: str, timeout: int = 600):
    """``python -m crc_lightning.<app> -m …`` submitted to ``cluster`` from an empty working
    directory; returns (process, sweep folder or None, SLURM job ids in job order, seconds)."""
    cwd = tmp / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**_env(), "SLURM_CONF": str(cluster.conf)}
    cmd = [sys.executable, "-m", f"crc_lightning.{app}", "-m", f"paths.root_dir={tmp / 'root'}",
           *SLURM_ARGS, *overrides]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    seconds = time.monotonic() - t0
    sweeps = list((tmp / "root" / "outputs" / app / "multiruns").glob("*"))
    sweep = sweeps[0] if len(sweeps) == 1 else None
    ids = []
    if sweep is not None and (sweep / ".submitit").is_dir():
        # submitit names each job's folder after its SLURM id: <array id>_<task> for the jobs of
        # an array (beside the array's own <array id> folder), <id> for a sweep of one job
        found = [p.name for p in (sweep / ".submitit").iterdir()]
        tasks = [n for n in found if re.fullmatch(r"\d+_\d+", n)]
        ids = sorted(tasks, key=lambda n: int(n.split("_")[1])) or [n for n in found if n.isdigit()]
        cluster.wait_idle()  # the sweep returns on the jobs' results; SLURM's record follows
        cluster.final_states(*ids)
    print(
        f"\n{app} sweep through SLURM: {seconds:.0f} s\n{cluster.sacct_text(*ids) if ids else ''}"
    )
    return proc, sweep, ids, seconds


def states(cluster, ids: list[str]) -> list[str]:
    rows = cluster.final_states(*ids)
    return [rows.get(i, "MISSING") for i in ids]


@pytest.mark.slurm
def test_run_sweep_goes_through_sbatch_and_completes(slurm_cluster, store, tmp_path) -> None:
    proc, sweep, ids, _ = slurm_sweep(slurm_cluster, tmp_path, "run", "seed=0,1", "split=holdout",
                                      f"data.store={store}", *SWEEP_ARGS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(ids) == 2, ids
    assert states(slurm_cluster, ids) == ["COMPLETED", "COMPLETED"]
    assert [r["ExitCode"] for r in slurm_cluster.sacct(*ids)] == ["0:0", "0:0"]
    comp = slurm_cluster.jobcomp_states()  # the second record: slurmctld's job completion file
    assert [comp.get(i) for i in ids] == ["COMPLETED", "COMPLETED"], comp
    # each job ran in SLURM (its own SLURM log) and wrote its results into its own folder
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    for seed, (job, slurm_id) in enumerate(zip(jobs, ids)):
        result = json.loads((job / "metrics.json").read_text())
        assert result["seed"] == seed and result["split"]["mode"] == "holdout"
        assert (job / "predictions.csv").is_file()
        assert (sweep / ".submitit" / slurm_id / f"{slurm_id}_0_log.out").is_file()
    # the sweep report: written once, by the submitting process, after both jobs
    report = sweep / "report" / "report.md"
    assert report.is_file()
    assert (proc.stdout + proc.stderr).count("sweep report: ") == 1
    assert report.stat().st_mtime >= max((j / "metrics.json").stat().st_mtime for j in jobs)
    # nothing outside the sweep folder, nothing in the working directory
    assert tree(tmp_path / "cwd") == []
    root = tmp_path / "root"
    outside = [t for t in tree(root) if not t.startswith(str(sweep.relative_to(root)))]
    assert outside == ["outputs", "outputs/run", "outputs/run/multiruns"], outside
    assert {p.name for p in sweep.iterdir()} == {
        *(j.name for j in jobs), ".submitit", "multirun.yaml", "selection.json", "selection.md",
        "report",
    }  # fmt: skip


@pytest.mark.slurm
def test_failed_job_is_failed_in_sacct_and_the_other_completes(slurm_cluster, store, tmp_path):
    # a store whose case files are gone: it passes the checks made before any job is submitted
    # (the index and store.json are there), and the job itself fails on its first crop
    bad = tmp_path / "data" / "crops" / "broken"
    shutil.copytree(store, bad)
    for case in (bad / CASES_DIR).glob("*.npz"):
        case.unlink()
    proc, sweep, ids, _ = slurm_sweep(slurm_cluster, tmp_path, "run", f"data.store={store},{bad}",
                                      *SWEEP_ARGS)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(ids) == 2, ids
    assert states(slurm_cluster, ids) == ["COMPLETED", "FAILED"]
    assert [slurm_cluster.jobcomp_states().get(i) for i in ids] == ["COMPLETED", "FAILED"]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert (jobs[0] / "metrics.json").is_file() and not (jobs[1] / "metrics.json").exists()
    # the error, in the failed job's own logs: SLURM's stderr (traceback) and the Hydra job log
    err_log = sweep / ".submitit" / ids[1] / f"{ids[1]}_0_log.err"
    missing = "case file listed in the index is missing"
    assert missing in err_log.read_text()
    assert "job 1 failed: " in (jobs[1] / "run.log").read_text()
    assert missing in (jobs[1] / "run.log").read_text()
    # and one line on the console naming the SLURM job, its state, its error and its log
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"run: {err_log}: SLURM job {ids[1]} (sweep job 1) failed: ")
    assert re.search(rf"InputError: {re.escape(str(bad))}/\S+\.npz: {missing} \(20 of 20\); "
                     rf"{re.escape(BUILD_HINT)}$", last), last  # fmt: skip
    assert "Traceback" not in proc.stderr


@pytest.mark.slurm
def test_pretrain_through_the_same_launcher(slurm_cluster, store, tmp_path) -> None:
    from crc_lightning.models.simclr import load_simclr_weights

    weights = tmp_path / "root" / "w" / "simclr.ckpt"
    proc, sweep, ids, _ = slurm_sweep(
        slurm_cluster, tmp_path, "pretrain", "res=32", "ood=none", f"ood_stores=[{store}]",
        "epochs=1", "batch_size=4", f"weights_file={weights}",
        "model.backbone.name=test_efficientnet", "model.hidden_dim=16", "model.output_dim=8",
        "trainer.limit_train_batches=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert states(slurm_cluster, ids) == ["COMPLETED"]
    (job,) = (p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    result = json.loads((job / "pretrain.json").read_text())
    assert result["weights_file"] == str(weights) and len(result["epoch_losses"]) == 1
    _, _, meta = load_simclr_weights(weights, 32, False, "test_efficientnet")
    assert meta["res"] == 32


@pytest.mark.slurm
def test_preprocess_shards_as_slurm_jobs_merge_into_the_single_process_store(
    slurm_cluster, single_store, tmp_path
) -> None:
    """``preprocess -m shard=0/2,1/2 hydra/launcher=submitit_slurm``: a SLURM array of two shard
    jobs, merged by the submitting process into the store a single process builds."""
    from crc_lightning.cropstore.reader import CropStore
    from tests.cropstore.test_store import assert_same_store

    root, single = single_store
    sharded = tmp_path / "sharded"
    env = {**_env(), "SLURM_CONF": str(slurm_cluster.conf)}
    t0 = time.monotonic()
    proc = sharded_preprocess(root, sharded, *LAUNCHER, env=env)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = (root / "outputs" / "preprocess" / "multiruns").iterdir()
    ids = sorted(
        p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)
    )
    slurm_cluster.wait_idle()
    print(f"\npreprocess shards through SLURM: {seconds:.0f} s\n{slurm_cluster.sacct_text(*ids)}")
    assert states(slurm_cluster, ids) == ["COMPLETED", "COMPLETED"]
    assert [(j["shard"], j["shards"]) for j in shard_jobs(root)] == [(0, 2), (1, 2)]
    assert_same_store(single, sharded)
    assert CropStore(sharded).summary["shards"] == 2


def test_cpu_trainer_asks_slurm_for_no_gpu(app_config) -> None:
    """What sbatch is given: a CPU trainer asks for no GPU (a CPU-only cluster would refuse the
    job), a GPU trainer for one per device, with one task per device."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    for trainer, gpus, tasks in (("cpu", None, 1), ("ddp_sim", None, 2), ("gpu", 1, 1),
                                 ("ddp", 2, 2)):  # fmt: skip
        cfg = app_config("run", f"trainer={trainer}", "hydra/launcher=submitit_slurm",
                         hydra_config=True)  # fmt: skip
        HydraConfig.instance().set_config(cfg)
        try:
            params = instantiate(cfg.hydra.launcher).params
        finally:
            HydraConfig.instance().cfg = None
        assert (params["gpus_per_node"], params["tasks_per_node"]) == (gpus, tasks), trainer
    cfg = app_config("preprocess", "hydra/launcher=submitit_slurm", hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:  # preprocess has no trainer: one task, no GPU
        params = instantiate(cfg.hydra.launcher).params
    finally:
        HydraConfig.instance().cfg = None
    assert (params["gpus_per_node"], params["tasks_per_node"]) == (None, 1)
