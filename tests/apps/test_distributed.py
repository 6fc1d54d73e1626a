"""DDP inside Hydra sweeps (``trainer=ddp|ddp_sim``), launchers, sweepers and grid-search selection.

The end-to-end tests run ``python -m crc_lightning.run -m seed=0,1 trainer=ddp_sim`` and
``python -m crc_lightning.pretrain -m seed=0,1 trainer=ddp_sim`` (2 CPU processes, gloo) as a user
types them and check what Lightning's own DDP launcher gets wrong under ``-m``: each job runs once
with both ranks, everything lands in that job's folder, nothing anywhere else (the working directory
stays empty, there is exactly one sweep folder), and the next job starts clean.

How the 2-process numbers relate to 1-device ones. Oracle: each job's best checkpoint is evaluated
again on ONE device in this process, and its test predictions must equal those of the 2-process run
(atol 1e-5), crop for crop — the distributed gather, with the sampler's padding, counts every test
crop exactly once, so evaluation is identical. Training is not: each rank takes its own
``datamodule.batch_size`` crops, so one optimiser step sees an effective batch of
2 × batch_size (and gradients averaged over it); the trained weights, and hence the metrics, differ
from a 1-device run with the same seed. To match the paper's batch of 16 on 2 GPUs, halve the
per-device batch size. (Pretraining likewise: NT-Xent gathers the negatives of both ranks.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser

from crc_lightning import distributed
from crc_lightning.apps.callbacks import select_best_job, select_per_group
from crc_lightning.distributed import (
    HydraJobDDPStrategy,
    UnsupportedLauncherError,
    UntestedLightningError,
    check_lightning_version,
    quote_override_value,
)
from crc_lightning.evaluation.aggregate import evaluate_levels
from crc_lightning.tracking import flat_numbers
from tests.helpers.config import CONF_DIR
from tests.helpers.stores import write_fake_store

ROOT = Path(__file__).resolve().parents[2]
CONF = CONF_DIR
# tiny jobs: res 32, 2 training batches of 4 per rank, one epoch; every val/test batch; the
# default protocol (cv) with 2 folds, so each job trains two folds in one DDP process group
SWEEP_ARGS = [
    "res=32", "model.backbone.weights=none", "trainer.max_epochs=1",
    "trainer.limit_train_batches=2", "datamodule.batch_size=4", "split.n_splits=2",
    "callbacks.early_stopping.patience=1",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # 2 ranks on a shared 2-core machine
    env.pop("CRC_ROOT", None)
    for name in distributed.DDP_ENV_VARS:
        env.pop(name, None)
    return env


def run_sweep(tmp: Path, store: Path, *overrides: str, timeout: int = 300):
    """``python -m crc_lightning.run -m …`` from an empty working directory; returns the process."""
    cwd = tmp / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "crc_lightning.run", "-m", f"data.store={store}",
        f"paths.root_dir={tmp / 'root'}", f"paths.data_dir={tmp / 'root' / 'data'}",
        *SWEEP_ARGS, *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_fake_store(tmp_path_factory.mktemp("data") / "crops" / "fake", n_patients=20)


def compose_run(*overrides: str, hydra_config: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("run", overrides=list(overrides), return_hydra_config=hydra_config)


# ----------------------------------------------------------------------------- the mechanism
def test_untested_lightning_is_refused_loudly(monkeypatch) -> None:
    monkeypatch.delenv("CRC_ALLOW_UNTESTED_LIGHTNING", raising=False)
    check_lightning_version("2.6.6")
    check_lightning_version("2.5.1")
    with pytest.raises(UntestedLightningError, match="TESTED_LIGHTNING"):
        check_lightning_version("2.7.0")
    with pytest.raises(UntestedLightningError, match="CRC_ALLOW_UNTESTED_LIGHTNING"):
        check_lightning_version("3.0.0")
    monkeypatch.setenv("CRC_ALLOW_UNTESTED_LIGHTNING", "1")
    check_lightning_version("3.0.0")


@pytest.mark.parametrize(
    "value", ["/tmp/s/0_res=32,seed=0", "/tmp/it's here", '/tmp/say "x"', "/a b/c=d,e"]
)
def test_child_output_dir_survives_hydras_override_parser(value: str) -> None:
    """Job folders hold ``=`` and ``,``: the child's ``hydra.run.dir`` must parse back to itself."""
    parsed = OverridesParser.create().parse_override(f"hydra.run.dir={quote_override_value(value)}")
    assert parsed.value() == value
    with pytest.raises(ValueError, match="quote"):
        quote_override_value("""/tmp/'both"/""")


def test_child_command_is_the_job_not_the_sweep(tmp_path) -> None:
    cfg = compose_run("seed=3", "trainer=ddp_sim", hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path / "0_seed=3")
    cfg.hydra.overrides.task = ["seed=3", "trainer=ddp_sim"]
    HydraConfig.instance().set_config(cfg)
    try:
        command, _cwd = distributed.hydra_job_child_command(1)
    finally:
        HydraConfig.instance().cfg = None
    assert "-m" not in command[-5:] and "--multirun" not in command
    assert command[-5:-3] == ["seed=3", "trainer=ddp_sim"]  # the job's own overrides
    parser = OverridesParser.create()
    run_dir = [o for o in parser.parse_overrides(command[-3:]) if o.key_or_group == "hydra.run.dir"]
    assert run_dir[0].value() == str(tmp_path / "0_seed=3")
    assert "hydra.output_subdir=null" in command


def test_slurm_environment_spawns_no_rank(monkeypatch) -> None:
    """Under SLURM (one task per GPU) every rank is a SLURM task: the launcher starts nothing."""
    slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID="0", SLURM_LOCALID="0",
                 SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_JOB_NAME="run",
                 SLURM_JOB_ID="4242")  # fmt: skip
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    strategy = HydraJobDDPStrategy(process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    env = trainer.strategy.cluster_environment
    assert type(env).__name__ == "SLURMEnvironment" and env.creates_processes_externally
    called = []
    trainer.strategy.launcher.launch(lambda: called.append(True))
    assert called == [True]
    assert trainer.strategy.launcher.procs == []


def test_ddp_is_refused_under_joblib_with_a_clear_error() -> None:
    cfg = compose_run("trainer=ddp_sim", "hydra/launcher=joblib", hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 2  # the project's joblib.yaml, not the plugin's -1
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(UnsupportedLauncherError, match="one device per job"):
            HydraJobDDPStrategy(process_group_backend="gloo")
    finally:
        HydraConfig.instance().cfg = None


def test_trainer_configs() -> None:
    ddp = compose_run("trainer=ddp").trainer
    sim = compose_run("trainer=ddp_sim").trainer
    for t in (ddp, sim):
        assert t.devices == 2 and t.num_nodes == 1 and t.sync_batchnorm is False
        assert t.strategy._target_ == "crc_lightning.distributed.HydraJobDDPStrategy"
    assert (ddp.accelerator, ddp.strategy.process_group_backend) == ("gpu", "nccl")
    assert (sim.accelerator, sim.strategy.process_group_backend) == ("cpu", "gloo")
    assert compose_run("trainer=ddp", "trainer.sync_batchnorm=true").trainer.sync_batchnorm


def test_slurm_launcher_asks_one_task_per_gpu(tmp_path) -> None:
    from hydra.utils import instantiate

    cfg = compose_run("trainer=ddp", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                      hydra_config=True)  # fmt: skip
    cfg.hydra.sweep.dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    try:
        launcher = instantiate(cfg.hydra.launcher)
    finally:
        HydraConfig.instance().cfg = None
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["tasks_per_node"] == launcher.params["gpus_per_node"] == 2
    assert launcher.params["nodes"] == 1 and launcher.params["partition"] == "gpu"


@pytest.mark.parametrize(
    ("name", "module", "dataclass"),
    [
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.config", "SlurmQueueConf"),
        ("joblib", "hydra_plugins.hydra_joblib_launcher.config", "JobLibLauncherConf"),
    ],
)
def test_launcher_yaml_shadows_the_plugin_with_every_key(name, module, dataclass) -> None:
    """conf/hydra/launcher/<name>.yaml replaces the plugin's config of that name, so it must hold
    every field of the installed plugin's dataclass (a plugin upgrade that adds one fails here)."""
    import dataclasses
    import importlib
    import warnings

    from hydra.utils import _locate
    from omegaconf import OmegaConf

    from crc_lightning.apps._hydra import quiet_library_noise

    schema = getattr(importlib.import_module(module), dataclass)
    ours = OmegaConf.load(Path(CONF_DIR) / "hydra" / "launcher" / f"{name}.yaml")
    fields = {f.name for f in dataclasses.fields(schema)}
    assert fields - set(ours) == set(), f"{name}.yaml lacks plugin keys"
    assert set(ours) - fields == set(), f"{name}.yaml has keys the plugin does not know"
    # the project's SLURM launcher subclasses the plugin's (hydra_plugins/crc_lightning_slurm); by
    # name: Hydra's plugin scan re-executes plugin modules, so class objects can be redefined
    bases = [f"{c.__module__}.{c.__qualname__}" for c in _locate(ours._target_).__mro__]
    assert bases[0] == ours._target_ and schema._target_ in bases
    assert ours._target_ == schema._target_ or name == "submitit_slurm"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()  # what each app's main() does
        cfg = compose_run(f"hydra/launcher={name}", hydra_config=True)
        warnings.warn(
            "'hydra/launcher/other' is validated against ConfigStore schema", stacklevel=1
        )
    assert cfg.hydra.launcher._target_ == ours._target_
    schema_warnings = [str(w.message) for w in caught if "ConfigStore schema" in str(w.message)]
    assert schema_warnings == ["'hydra/launcher/other' is validated against ConfigStore schema"]


def test_job_folder_names_stay_short_and_distinct() -> None:
    """Sweep job folders are named after the job's overrides; file systems refuse names over 255
    bytes, which Optuna's 17-digit floats reach (found by the Optuna sweep test)."""
    from omegaconf import OmegaConf

    from crc_lightning.apps._hydra import short_dirname

    long = ",".join(f"model.optimizer.lr={0.1 / 3**i!r}" for i in range(12))
    assert len(long) > 255 and len(short_dirname(long).encode()) == 150
    assert short_dirname(long) == short_dirname(long) != short_dirname(long + "1")
    assert short_dirname(long).startswith(long[:100])
    assert short_dirname("res=32,seed=0") == "res=32,seed=0"
    assert short_dirname("é" * 100).encode().decode() == short_dirname("é" * 100)  # valid UTF-8
    cfg = compose_run(hydra_config=True)
    cfg.hydra.job.num, cfg.hydra.job.override_dirname = 3, long
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == f"3_{short_dirname(long)}"


# ----------------------------------------------------------------------------- grid search
def test_grid_search_is_the_papers_grid_on_validation() -> None:
    cfg = compose_run("experiment=grid_search", hydra_config=True)
    params = cfg.hydra.sweeper.params
    grid = {k: sorted(float(x) for x in str(v).split(",")) for k, v in params.items()}
    assert grid == {
        "model.optimizer.lr": [1e-4, 1e-3, 1e-2],
        "model.optimizer.weight_decay": [5e-5, 5e-4],
        "datamodule.batch_size": [16.0, 32.0],
    }
    assert cfg.optimized_metric == "val/auc" and cfg.optimized_mode == "max"


def _fake_job(root: Path, name: str, val_auc: float | None, test_auc: float) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- model.optimizer.lr={name}\n")
    level = {"auc": test_auc, "f1_macro": 0.5, "hamming": 0.2, "n": 10}
    result = {"val": {"loss": 0.5, "auc": val_auc}, "metrics": {"image": level, "lesion": level}}
    (job / "metrics.json").write_text(json.dumps(result))
    return job


def test_selection_uses_validation_never_test(tmp_path) -> None:
    jobs = [
        _fake_job(tmp_path, "0", 0.70, 0.95),  # best on test, not on validation
        _fake_job(tmp_path, "1", 0.80, 0.60),
        _fake_job(tmp_path, "2", None, 0.99),  # no validation AUC: ranks last
        _fake_job(tmp_path, "3", 0.80, 0.10),  # tie with job 1: the lower folder name wins
    ]
    best, ranked = select_best_job(jobs, "val/auc", "max")
    assert best["job"] == "1" and best["overrides"] == ["model.optimizer.lr=1"]
    assert best["test"]["image"]["auc"] == 0.60
    assert [r["job"] for r in ranked] == ["1", "3", "0", "2"]
    assert select_best_job(jobs, "val/auc", "min")[0]["job"] == "0"
    with pytest.raises(ValueError, match="never on the test set"):
        select_best_job(jobs, "metrics/image/auc", "max")


def _grid_job(root: Path, name: str, labels: str, lr: str, seed: int, val_auc: float) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"model.optimizer.lr={lr}", f"seed={seed}", f"labels={labels}"]
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    level = {"auc": 0.5, "f1_macro": 0.5, "hamming": 0.2, "n": 10}
    result = {"labels": labels, "variant": "baseline", "res": 32, "seed": seed,
              "val": {"loss": 0.5, "auc": val_auc}, "metrics": {"image": level}}  # fmt: skip
    (job / "metrics.json").write_text(json.dumps(result))
    return job


def test_selection_is_per_group_and_averages_a_settings_seeds(tmp_path) -> None:
    """Two label sets × two learning rates × two seeds. Per label set, the lr with the best *mean*
    validation AUC over its seeds wins (hand-computed), even when another lr has the single best
    job; label sets are never ranked together."""
    jobs = [
        _grid_job(tmp_path, "0", "five", "0.01", 0, 0.90),  # best single job …
        _grid_job(tmp_path, "1", "five", "0.01", 1, 0.50),  # … but mean 0.70
        _grid_job(tmp_path, "2", "five", "0.001", 0, 0.80),
        _grid_job(tmp_path, "3", "five", "0.001", 1, 0.76),  # mean 0.78: chosen
        _grid_job(tmp_path, "4", "three", "0.01", 0, 0.60),
        _grid_job(tmp_path, "5", "three", "0.01", 1, 0.64),  # mean 0.62: chosen
        _grid_job(tmp_path, "6", "three", "0.001", 0, 0.55),
        _grid_job(tmp_path, "7", "three", "0.001", 1, None),  # None left out: mean 0.55
    ]
    groups = select_per_group(jobs, "val/auc", "max")
    assert [g["group"]["labels"] for g in groups] == ["five", "three"]
    five, three = groups
    assert five["best"]["setting"] == ["model.optimizer.lr=0.001"]
    assert five["best"]["value"] == pytest.approx(0.78) and five["best"]["jobs"] == ["2", "3"]
    assert three["best"]["setting"] == ["model.optimizer.lr=0.01"]
    assert [s["value"] for s in three["settings"]] == pytest.approx([0.62, 0.55])
    assert {r["job"] for r in five["jobs"]} == {"0", "1", "2", "3"}
    assert select_per_group(jobs, "val/loss", "min")[0]["best"]["n_jobs"] == 2
    with pytest.raises(ValueError, match="never on the test set"):
        select_per_group(jobs, "metrics.patient.auc")


# ----------------------------------------------------------------------------- end to end
FIT_DONE = "`Trainer.fit` stopped: `max_epochs=1` reached."  # a Lightning log line, rank 0 only


def assert_logged_once(
    proc: subprocess.CompletedProcess, jobs: list[Path], log_name: str, fits: int = 1
) -> None:
    """Each of a job's ``fits`` Lightning fit-done lines (one per fold) is on the console once (not
    again through Lightning's own handler) and in that job's log file once."""
    console = proc.stdout + proc.stderr
    assert console.count(FIT_DONE) == fits * len(jobs), console[-3000:]
    for job in jobs:
        assert (job / log_name).read_text().count(FIT_DONE) == fits, job.name


def _single_device_eval(store: Path, job: Path, seed: int) -> tuple[pd.DataFrame, dict]:
    """Each fold's best checkpoint tested again on one CPU device, in this process, on that fold's
    test patients (from the job's splits.json); the folds' predictions pooled as the job does."""
    from crc_lightning.apps._hydra import instantiate
    from crc_lightning.apps.run import predictions_frame
    from crc_lightning.data.splits import Split
    from crc_lightning.models.checkpoint import load_model

    cfg = compose_run(f"data.store={store}", f"seed={seed}", *SWEEP_ARGS[:1], *SWEEP_ARGS[3:])
    classes = list(cfg.labels.classes)
    frames = []
    for fold in json.loads((job / "splits.json").read_text())["folds"]:
        split = Split(*(np.array(fold[k], dtype=object) for k in ("train", "val", "test")))
        dm = instantiate(cfg.datamodule, _partial_=True)(split=split)
        model, _ = load_model(job / "checkpoints" / f"fold{fold['fold']}" / "best.ckpt")
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, deterministic=True)  # fmt: skip
        trainer.test(model, datamodule=dm, verbose=False)
        frames.append(predictions_frame(dm.test_index, model.test_outputs, classes))
    preds = pd.concat(frames, ignore_index=True)
    return preds, evaluate_levels(preds, classes)


def test_ddp_sim_sweep_runs_each_job_once_in_its_own_folder(store, tmp_path) -> None:
    proc = run_sweep(tmp_path, store, "seed=0,1", "trainer=ddp_sim")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert tree(tmp_path / "cwd") == [], "something was written into the working directory"
    root = tmp_path / "root"
    sweeps = list((root / "outputs" / "run" / "multiruns").iterdir())
    assert len(sweeps) == 1, f"expected one sweep folder, got {sweeps}"  # rank 1 made no 2nd sweep
    sweep_rel = f"outputs/run/multiruns/{sweeps[0].name}"
    outside = [t for t in tree(root) if not t.startswith(sweep_rel)]
    assert outside == ["outputs", "outputs/run", "outputs/run/multiruns"], outside
    assert not [p for p in tmp_path.rglob("lightning_logs")]
    sweep = sweeps[0]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    assert sorted(p.parent for p in sweep.rglob("metrics.json")) == jobs
    assert {p.name for p in sweep.iterdir()} <= {
        *(j.name for j in jobs), "multirun.yaml", "selection.json", "selection.md", "report",
    }  # fmt: skip
    for seed, job in enumerate(jobs):
        names = {p.name for p in job.iterdir()}
        assert {"metrics.json", "predictions.csv", "val_predictions.csv", "splits.json",
                "checkpoints", "csv", "run.log"} <= names  # fmt: skip
        assert "run_rank1.log" in names  # rank 1 ran inside this job's folder
        assert (job / "csv" / "metrics.csv").is_file()  # default logger=csv, inside the job
        result = json.loads((job / "metrics.json").read_text())
        assert result["seed"] == seed and [f["fold"] for f in result["folds"]] == [0, 1]
        preds = pd.read_csv(job / "predictions.csv", dtype={"patient_id": str})
        assert preds["patient_id"].nunique() == 20  # cv under DDP: every patient tested once
        one_dev, one_metrics = _single_device_eval(store, job, seed)
        # every test crop exactly once, although DistributedSampler padded a rank
        assert preds["crop_id"].is_unique and len(preds) == len(one_dev)
        assert list(preds["crop_id"]) == list(one_dev["crop_id"])
        assert set(preds["fold"]) == {0, 1}
        p_cols = [c for c in preds.columns if c.startswith("p_")]
        np.testing.assert_allclose(preds[p_cols], one_dev[p_cols], atol=1e-5)
        # metrics.json is computed from exactly these de-duplicated rows. (AUCs are not compared
        # with the 1-device run: a model trained for 2 batches gives near-constant probabilities,
        # std ~1e-6, so their ranking — and the AUC — is float noise; the probabilities agree.)
        classes = list(result["classes"])
        # Image level only: lesion/patient levels average the probabilities, and the CSV's float32
        # text changes those means in the last bit, which reorders the near-ties.
        want = flat_numbers(evaluate_levels(preds, classes)["image"])
        assert flat_numbers(result["metrics"]["image"]) == pytest.approx(want, abs=1e-9)
        for level, m in one_metrics.items():
            assert result["metrics"][level]["n"] == m["n"]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[job ")]
    assert len(summary) == 2, proc.stdout[-2000:]  # one line per finished job, no progress bars
    assert "━" not in proc.stdout and "it/s" not in proc.stderr
    assert_logged_once(proc, jobs, "run.log", fits=2)  # split.n_splits=2: two folds per job
    selection = json.loads((sweep / "selection.json").read_text())
    vals = [json.loads((j / "metrics.json").read_text())["val"]["auc"] for j in jobs]
    (group,) = selection["groups"]  # two seeds of one setting: one group, one candidate
    assert group["best"]["n_jobs"] == 2 and group["best"]["setting"] == []
    assert group["best"]["value"] == pytest.approx(np.mean(vals))


def test_pretrain_ddp_sim_sweep(store, tmp_path) -> None:
    """``pretrain -m seed=0,1 trainer=ddp_sim``: one sweep folder, two job folders with their
    pretrain.json, NT-Xent over both ranks, and one weights file per job (the command names it by
    seed; with the default name the sweep is refused, see test_pretrain_sweep_…_is_refused)."""
    from crc_lightning.models.simclr import load_simclr_weights

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    root, weights = tmp_path / "root", tmp_path / "root" / "w"
    cmd = [
        sys.executable, "-m", "crc_lightning.pretrain", "-m", "seed=0,1", "trainer=ddp_sim",
        "ood=none", f"ood_stores=[{store}]", "res=32", "epochs=1", "batch_size=4",
        f"paths.root_dir={root}", f"paths.weights_dir={weights}",
        "weights_file=${paths.weights_dir}/simclr_res${res}_seed${seed}.ckpt",
        "model.backbone.name=test_efficientnet", "model.hidden_dim=16", "model.output_dim=8",
        "trainer.limit_train_batches=2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert tree(cwd) == []
    (sweep,) = (root / "outputs" / "pretrain" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    assert sorted(p.parent for p in sweep.rglob("pretrain.json")) == jobs
    results = [json.loads((j / "pretrain.json").read_text()) for j in jobs]
    for seed, (job, result) in enumerate(zip(jobs, results)):
        assert result["seed"] == seed
        assert {"pretrain.json", "pretrain.log", "pretrain_rank1.log", "csv", ".hydra"} == {
            p.name for p in job.iterdir()
        }
        assert result["distributed"] == {"world_size": 2, "gather_distributed": True}
        assert result["weights_file"] == str(weights / f"simclr_res32_seed{seed}.ckpt")
        _, _, meta = load_simclr_weights(result["weights_file"], 32, False, "test_efficientnet")
        assert meta["seed"] == seed  # each job's own file: nothing overwritten
    # Outside the sweep folder: only the weights named on the command line and the resumable
    # Lightning checkpoints of each job, in their settings-keyed folder (pretrain.json names it).
    ckpt_dirs = sorted(Path(r["checkpoint_dir"]) for r in results)
    assert len(set(ckpt_dirs)) == 2 and all(d.parent == root / "outputs" / "pretrain" / "checkpoints"
                                            for d in ckpt_dirs)  # fmt: skip
    outside = {t for t in tree(root) if not t.startswith(str(sweep.relative_to(root)))}
    ckpts = {str(d.relative_to(root)) for d in ckpt_dirs}
    assert outside == {
        "outputs", "outputs/pretrain", "outputs/pretrain/multiruns", "outputs/pretrain/checkpoints",
        *ckpts, *(f"{c}/last.ckpt" for c in ckpts), *(f"{c}/run.json" for c in ckpts),
        "w", "w/simclr_res32_seed0.ckpt", "w/simclr_res32_seed1.ckpt",
    }  # fmt: skip
    assert not [p for p in tmp_path.rglob("lightning_logs")]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[job ")]
    assert len(summary) == 2 and "━" not in proc.stdout, proc.stdout[-2000:]
    assert_logged_once(proc, jobs, "pretrain.log")


def _pretrain_sweep_cfg(*task: str, params=None):
    """The config a ``pretrain -m <task>`` sweep hands to its callbacks: composed with the plain
    overrides (Hydra leaves the sweep overrides out in multirun mode), all of them in
    ``hydra.overrides.task``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task))
    plain = [t for t, o in zip(task, parsed) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("pretrain", overrides=plain, return_hydra_config=True)
    cfg.hydra.overrides.task = list(task)
    if params is not None:
        cfg.hydra.sweeper.params = params
    return cfg


def test_pretrain_sweep_that_would_overwrite_weights_is_refused(tmp_path) -> None:
    from crc_lightning.apps.pretrain import (
        DistinctWeightsCallback,
        WeightsClashError,
        weights_clash,
    )

    per_seed = "${paths.weights_dir}/simclr_res${res}_seed${seed}.ckpt"
    assert weights_clash(_pretrain_sweep_cfg("seed=0,1")) == ["seed"]
    assert weights_clash(_pretrain_sweep_cfg("seed=range(0,3)", "ood=lits,crlm")) == ["seed", "ood"]
    assert weights_clash(_pretrain_sweep_cfg(params={"seed": "0,1"})) == ["seed"]  # sweeper params
    # README "Reproducing the paper": one file per res × attention, the list is no sweep
    paper = _pretrain_sweep_cfg("res=32,64,128", "model.attention=false,true", "ood=[lits,ircadb]")
    assert weights_clash(paper) == []
    assert weights_clash(_pretrain_sweep_cfg("seed=0,1", f"weights_file={per_seed}")) == []
    assert weights_clash(_pretrain_sweep_cfg("seed=0,1", "export=false")) == []
    job_dir = "${paths.output_dir}/simclr.ckpt"
    assert weights_clash(_pretrain_sweep_cfg("seed=0,1", f"weights_file={job_dir}")) == []
    fixed = _pretrain_sweep_cfg("res=32,64", "weights_file=/w/simclr.ckpt")
    assert weights_clash(fixed) == ["res"]
    with pytest.raises(WeightsClashError, match=r"varies seed.*weights_file=\$\{paths.weights_dir\}"
                       r"/simclr_res\$\{res\}_seed\$\{seed\}\.ckpt"):  # fmt: skip
        DistinctWeightsCallback().on_multirun_start(_pretrain_sweep_cfg("seed=0,1"))
    with pytest.raises(WeightsClashError, match=r"varies ood.*one pretrain command per value"):
        DistinctWeightsCallback().on_multirun_start(_pretrain_sweep_cfg("ood=lits,crlm"))
    # as typed: refused before any job (or folder) is made — Hydra turns a callback's ordinary
    # exception into a warning, so this must be a SystemExit
    cmd = [sys.executable, "-m", "crc_lightning.pretrain", "-m", "seed=0,1",
           f"paths.root_dir={tmp_path / 'root'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=60)
    assert proc.returncode == 2 and "overwrite" in proc.stderr, proc.stderr[-2000:]
    assert (
        proc.stderr.startswith("pretrain: pretrain -m: every job")
        and "Traceback" not in proc.stderr
    )
    assert tree(tmp_path) == []


def test_pretrain_takes_the_trainer_group_with_its_own_settings() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for name in ("default", "gpu", "ddp", "ddp_sim"):
            cfg = compose("pretrain", overrides=[f"trainer={name}", "epochs=7"])
            t = cfg.trainer
            assert (t.max_epochs, t.limit_val_batches, t.enable_model_summary) == (7, 0, False)
        assert cfg.trainer.devices == 2 and cfg.trainer.strategy.process_group_backend == "gloo"
        cli = compose("pretrain", overrides=["trainer=ddp_sim", "trainer.limit_val_batches=2"])
        assert cli.trainer.limit_val_batches == 2  # the command line still wins


# ----------------------------------------------------------------------------- optuna
def _optuna_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


needs_optuna = pytest.mark.skipif(
    not _optuna_available(),
    reason="hydra-optuna-sweeper not installed (pip install -e '.[optuna]')",
)


@needs_optuna
def test_optuna_sweeper_configs_compose() -> None:
    cfg = compose_run("hydra/sweeper=optuna_search", hydra_config=True).hydra.sweeper
    assert cfg._target_.endswith("OptunaSweeper") and cfg.direction == "maximize"
    assert set(cfg.params) == {"model.optimizer.lr", "model.optimizer.weight_decay",
                               "datamodule.batch_size"}  # fmt: skip
    grid = compose_run("hydra/sweeper=optuna", "experiment=grid_search",
                       "hydra.sweeper.direction=maximize", hydra_config=True).hydra.sweeper  # fmt: skip
    assert grid.params["datamodule.batch_size"] == "16,32" and grid.direction == "maximize"


@needs_optuna
def test_optuna_sweep_optimizes_the_validation_metric(store, tmp_path) -> None:
    """Two Optuna trials: each job returns val/auc, Optuna's best is the best job's val/auc, and the
    project's selection.json agrees."""
    import yaml

    proc = run_sweep(tmp_path, store, "hydra/sweeper=optuna_search", "hydra.sweeper.n_trials=2",
                     "trainer=cpu", "logger=none")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = (tmp_path / "root" / "outputs" / "run" / "multiruns").iterdir()
    jobs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(jobs) == 2
    vals = [json.loads((j / "metrics.json").read_text())["val"]["auc"] for j in jobs]
    lrs = []
    for job in jobs:
        over = dict(
            o.split("=", 1) for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        )
        assert over["datamodule.batch_size"] == "4"  # the command line fixes it: not searched
        lrs.append(float(over["model.optimizer.lr"]))
        assert 5e-5 <= float(over["model.optimizer.weight_decay"]) <= 5e-4
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]
    optuna_result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert optuna_result["best_value"] == pytest.approx(max(vals))
    assert set(optuna_result["best_params"]) == {
        "model.optimizer.lr",
        "model.optimizer.weight_decay",
    }
    selection = json.loads((sweep / "selection.json").read_text())
    assert selection["groups"][0]["best"]["value"] == pytest.approx(max(vals))


# ----------------------------------------------------------------------------- README
def readme_commands() -> list[str]:
    """The ``python -m crc_lightning.…`` commands of the README's "Scale out" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Scale out: DDP, SLURM, W&B") :]
    section = section[: section.index("\n## ", 1)].replace("\\\n", " ")
    out = []
    for line in section.splitlines():
        line = line.split("  #")[0].strip()
        while line and re.match(r"^[A-Z_]+=\S+ ", line):  # WANDB_MODE=online python …
            line = line.split(" ", 1)[1]
        if line.startswith("python -m crc_lightning."):
            out.append(line)
    return out


def first_job(args: list[str]) -> list[str]:
    """The overrides of a sweep's first job: each sweep override (``a,b`` / ``range``) → its first
    value; ``-m`` dropped. (Hydra sweeper settings such as ``hydra.sweeper.params`` stay.)"""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in args if a != "-m"]
    out = []
    for arg, o in zip(args, OverridesParser.create().parse_overrides(args)):
        if o.is_sweep_override() and not o.get_key_element().startswith("hydra"):
            arg = f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
        out.append(arg)
    return out


def test_readme_scale_out_commands_compose() -> None:
    """Every command of the README's scale-out section composes (a sweep: its first job) and its
    trainer, logger, paths, model and launcher settings resolve."""
    import shlex

    from omegaconf import OmegaConf

    from crc_lightning.apps._hydra import expand_ranges

    commands = readme_commands()
    assert len(commands) >= 8, commands
    for command in commands:
        words = shlex.split(command)
        app, args = words[2].rsplit(".", 1)[1], expand_ranges(words[3:])
        if any("sweeper=optuna" in a for a in args) and not _optuna_available():
            continue
        if app == "pretrain":  # its sweeps must not be refused for sharing one weights file
            from crc_lightning.apps.pretrain import weights_clash

            assert weights_clash(_pretrain_sweep_cfg(*(a for a in args if a != "-m"))) == []
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(app, overrides=first_job(args), return_hydra_config=True)
        cfg.hydra.runtime.output_dir = "/tmp/out"
        HydraConfig.instance().set_config(cfg)
        try:
            for key in ("trainer", "logger", "paths", "model", "hydra.launcher"):
                node = OmegaConf.select(cfg, key)
                if OmegaConf.is_config(node):
                    OmegaConf.to_container(node, resolve=True)
        except Exception as err:
            raise AssertionError(f"README command does not resolve: {command}") from err
        finally:
            HydraConfig.instance().cfg = None


@pytest.mark.slow
@pytest.mark.parametrize("app", ["pretrain", "run"])
def test_joblib_runs_single_device_jobs_in_parallel(app, store, tmp_path) -> None:
    """``hydra/launcher=joblib`` (the project's config, 2 workers): both jobs finish, each in its
    folder, with one summary line each."""
    if app == "run":
        proc = run_sweep(tmp_path, store, "seed=0,1", "trainer=cpu", "hydra/launcher=joblib")
        result_file = "metrics.json"
    else:
        cmd = [
            sys.executable, "-m", "crc_lightning.pretrain", "-m", "res=32,48", "trainer=cpu",
            "hydra/launcher=joblib", "ood=none", f"ood_stores=[{store}]", "epochs=1",
            "batch_size=4", f"paths.root_dir={tmp_path / 'root'}",
            "model.backbone.name=test_efficientnet", "trainer.limit_train_batches=2",
        ]  # fmt: skip
        (tmp_path / "cwd").mkdir()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path / "cwd",
                              env=_env(), timeout=300)  # fmt: skip
        result_file = "pretrain.json"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert tree(tmp_path / "cwd") == []
    (sweep,) = (tmp_path / "root" / "outputs" / app / "multiruns").iterdir()
    jobs = sorted(p.parent for p in sweep.rglob(result_file))
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    assert len([line for line in proc.stdout.splitlines() if line.startswith("[job ")]) == 2
    assert "ConfigStore schema" not in proc.stderr  # the shadowing launcher config is quiet


@pytest.mark.slow
def test_ddp_sim_sweep_exits_zero_ten_times(store, tmp_path) -> None:
    """The process group is destroyed after each job: no SIGABRT at exit, no gloo failure in job 2."""
    codes = []
    for i in range(10):
        proc = run_sweep(tmp_path / f"r{i}", store, "seed=0,1", "trainer=ddp_sim")
        codes.append(proc.returncode)
        assert proc.returncode == 0, f"repeat {i}: {proc.stderr[-3000:]}"
        assert len(list((tmp_path / f"r{i}").rglob("metrics.json"))) == 2
    assert codes == [0] * 10
