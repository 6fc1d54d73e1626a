"""Test-wide settings (offline hubs and W&B, no denormals) and the fixture that composes each
app's real config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from tests.helpers.config import compose_app

torch.set_flush_denormal(True)


@pytest.fixture
def app_config(tmp_path):
    """``app_config("run", "res=32")``: the app's composed config, with every path under this
    test's ``tmp_path`` (nothing is ever written into the repository)."""

    def make(app: str, *overrides: str, hydra_config: bool = False):
        base = [f"paths.root_dir={tmp_path}"]
        if not hydra_config:
            base.append(f"paths.output_dir={tmp_path / 'out'}")
        return compose_app(app, *base, *overrides, hydra_config=hydra_config)

    return make


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM cluster (slurmctld, slurmd, slurmdbd + MariaDB, munge) for the
    session, stopped at its end (:mod:`tests.helpers.slurm`); skips with the reason when this
    machine cannot run one. Tests using it are marked ``slurm``."""
    from tests.helpers.slurm import start_cluster, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
