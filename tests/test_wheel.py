"""A built wheel (not the editable checkout) installed into a fresh venv runs every app: the configs
ship inside the package.

The dependencies (torch etc., several GB) are not reinstalled: the fresh venv sees this
environment's site-packages through a path file, *after* its own, and outside this repository, so
the only ``crc_lightning`` it can import is the one the wheel installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APPS = ("preprocess", "pretrain", "run", "report", "predict")


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), "."],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list(out.glob("crc_lightning-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = out / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run(
        [str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_wheel_is_what_gets_imported(wheel_python, tmp_path) -> None:
    proc = _run(wheel_python, tmp_path, "-c", "import crc_lightning; print(crc_lightning.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    location = Path(proc.stdout.strip())
    assert REPO not in location.parents and wheel_python.parents[1] in location.parents
    assert (location.parent / "conf" / "run.yaml").is_file()


@pytest.mark.parametrize("app", APPS)
def test_every_app_composes_its_config_from_the_wheel(wheel_python, tmp_path, app) -> None:
    args = ["sweep=/nonexistent"] if app == "report" else []
    proc = _run(wheel_python, tmp_path, "-m", f"crc_lightning.{app}", "--cfg", "job", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task_name: " + app in proc.stdout
    assert not list(tmp_path.iterdir()), "composing a config wrote files"


def test_preprocess_help_from_the_wheel(wheel_python, tmp_path) -> None:
    proc = _run(wheel_python, tmp_path, "-m", "crc_lightning.preprocess", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preprocess is powered by Hydra" in proc.stdout
    assert "data: crlm, ircadb, lits, manifest, synthetic" in proc.stdout


def test_the_slurm_launcher_plugin_ships_in_the_wheel(wheel_python, tmp_path) -> None:
    """Hydra finds launchers only under ``hydra_plugins``: the wheel must carry the project's."""
    code = (
        "from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher; "
        "import hydra_plugins.crc_lightning_slurm.slurm_launcher as m; print(m.__file__); "
        "print(sorted(f'{c.__module__}.{c.__name__}' for c in Plugins.instance().discover(Launcher)))"
    )
    proc = _run(wheel_python, tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    location = Path(proc.stdout.splitlines()[0])
    assert REPO not in location.parents and wheel_python.parents[1] in location.parents
    assert "hydra_plugins.crc_lightning_slurm.slurm_launcher.SlurmLauncher" in proc.stdout
