"""The first hour of a new user (issue 15): the README's commands on a fresh checkout, one-line
errors with exit 2 and no folder for every bad value, quiet logs with a line per epoch, and
pretraining that never overwrites another run.

The apps are started in-process through their real entry points (``main()`` with ``sys.argv``, as
``python -m crc_lightning.<app>`` does), from an empty folder that stands for a fresh checkout.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import multiprocessing
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from crc_lightning.apps._hydra import (
    UsageError,
    collapse_repeated_warnings,
    expand_ranges,
)
from crc_lightning.apps.preprocess import ensure_store, synthetic_spec
from crc_lightning.apps.pretrain import pretrain
from crc_lightning.cropstore.format import is_store, read_meta
from tests.apps.test_pretrain import make_cfg as pretrain_cfg
from tests.helpers.config import compose_app
from tests.helpers.stores import write_fake_store


@pytest.fixture
def fresh(tmp_path, monkeypatch) -> Path:
    """An empty folder as the current folder (paths.root_dir follows it): a fresh checkout."""
    root = tmp_path / "checkout"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.delenv("CRC_ROOT", raising=False)
    return root


def start(app: str, *argv: str, monkeypatch, capsys) -> tuple[int, str, str]:
    """``python -m crc_lightning.<app> *argv`` in this process: (exit code, stdout, stderr)."""
    module = importlib.import_module(f"crc_lightning.apps.{app}")
    monkeypatch.setattr(sys, "argv", [f"crc_lightning.{app}", *argv])
    code = 0
    try:
        module.main()
    except SystemExit as err:  # a message as the code: Python prints it, exit status 1
        code = err.code if isinstance(err.code, int) else 1
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def everything_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----------------------------------------------------------------------------- 1. fresh checkout
def test_readme_sweep_as_typed_names_the_pretrain_command_and_makes_nothing(
    fresh, monkeypatch, capsys
):
    code, out, err = start(
        "run", "-m", "variant=oodp_sa", "res=128", "seed=0..4", monkeypatch=monkeypatch,
        capsys=capsys,
    )  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run: "), err
    assert "`python -m crc_lightning.pretrain res=128 model.attention=true`" in lines[0]
    assert str(fresh / "weights" / "simclr_res128_sa.ckpt") in lines[0]
    assert "Traceback" not in out + err
    assert everything_under(fresh) == []  # no sweep folder, no job folder, no store yet


def test_run_on_a_fresh_checkout_builds_the_synthetic_store_once(fresh, monkeypatch, capsys):
    args = (
        "res=32", "labels=three", "model.backbone.weights=none", "trainer=cpu",
        "+trainer.fast_dev_run=true", "datamodule.batch_size=64", "data.synthetic.n_patients=24",
        "data.synthetic.dicom_fraction=0", "logger=none", "print_metrics=false",
    )  # fmt: skip
    code, _, err = start(
        "run", *args, "hydra.run.dir=first", monkeypatch=monkeypatch, capsys=capsys
    )
    assert code == 0, err[-2000:]
    store = fresh / "data" / "crops" / "synthetic"
    assert is_store(store) and read_meta(store)["summary"]["patients"] == 24
    log = (fresh / "first" / "run.log").read_text()  # the job's log (Hydra's file handler)
    assert log.count("building the synthetic crop store once") == 1
    assert (fresh / "first" / "metrics.json").is_file()
    # the next command finds it: ensure_store returns without touching a file
    stamp = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    spec = synthetic_spec(compose_app("run", f"paths.root_dir={fresh}").data)
    assert ensure_store(store, spec, "-") == store
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == stamp


def _ensure_in_child(args: tuple[str, dict, object]) -> list[str]:
    """One of two processes asking for the same missing store at the same moment."""
    from crc_lightning.apps.preprocess import ensure_store

    store, spec, barrier = args
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("crc_lightning.apps.preprocess")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    barrier.wait()
    ensure_store(store, spec, "unused")
    return messages


def test_concurrent_processes_build_the_store_once(tmp_path):
    store = tmp_path / "data" / "crops" / "synthetic"
    spec = {
        "kind": "synthetic",
        "name": "synthetic",
        "root": str(tmp_path / "data" / "raw" / "synthetic"),
        "synthetic": {"n_patients": 4, "seed": 3, "dicom_fraction": 0.0},
    }
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        logs = pool.map(_ensure_in_child, [(str(store), spec, barrier)] * 2)
    builds = [m for msgs in logs for m in msgs if m.startswith("building the synthetic")]
    assert len(builds) == 1, logs
    assert is_store(store) and read_meta(store)["summary"]["computed"] == 4


def test_other_data_without_a_store_names_the_preprocess_command(fresh, monkeypatch, capsys):
    code, _, err = start(
        "run", "data=manifest", "data.manifest=cohort/labels.csv", "model.backbone.weights=none",
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    want = (
        "`python -m crc_lightning.preprocess data=manifest data.manifest=cohort/labels.csv "
        f"data.store={fresh / 'data' / 'crops' / 'cohort'}`"
    )
    assert err.startswith("run: ") and want in err
    assert everything_under(fresh) == []


# ----------------------------------------------------------------------------- 2. one error style
BAD = [
    ("run", ["res=abc"], "`res=abc`: res must be a positive integer"),
    ("run", ["res=0"], "`res=0`: res must be a positive integer"),
    ("run", ["res=1.5"], "`res=1.5`: res must be a positive integer"),
    ("run", ["seed=x"], "`seed=x`: seed must be an integer"),
    ("run", ["-m", "seed=0..x"], "`seed=0..x`: a range a..b needs two integers"),
    ("run", ["seed=0..4"], "add -m"),
    (
        "run",
        ["labels=four"],
        "Could not find 'labels/four'. Available options in 'labels': five, three",
    ),
    ("run", ["variant=oodp_xl"], "Could not find 'variant/oodp_xl'"),
    ("run", ["model.backbone.weights=imagenett"], "choose imagenet, simclr or none"),
    ("run", ["model.backbone.weights=imagenet"], "ImageNet weights for 'efficientnet_b0'"),
    ("pretrain", ["res=-32"], "`res=-32`: res must be a positive integer"),
    ("pretrain", ["epochs=ten"], "`epochs=ten`: epochs must be a positive integer"),
    ("pretrain", ["checkpoint_every_n_epochs=0"], "checkpoint_every_n_epochs must be a positive"),
    ("pretrain", ["ood=lits"], "build it with `python -m crc_lightning.preprocess data=lits"),
    ("preprocess", ["data=manifest"], "`data.manifest` is required, e.g. `python -m"),
    ("preprocess", ["n_jobs=many"], "`n_jobs=many`: n_jobs must be an integer"),
    ("preprocess", ["preprocess.connectivity=5"], "connectivity must be 6, 18 or 26"),
    ("report", [], "`sweep=` is required"),
    ("report", ["sweep=nowhere"], "nowhere: no such sweep folder"),
    ("report", ["sweep=."], "no metrics.json below this folder"),
    ("predict", [], "`checkpoint=` is required"),
    ("predict", ["checkpoint=model.ckpt"], "model.ckpt: no such checkpoint file"),
]


@pytest.mark.parametrize(("app", "argv", "message"), BAD, ids=lambda x: str(x))
def test_bad_value_is_one_line_exit_2_and_no_folder(fresh, monkeypatch, capsys, app, argv, message):
    monkeypatch.setenv("CRC_IMAGENET_FILE", "")  # no user ImageNet file leaks into the check
    monkeypatch.setattr("crc_lightning.models.backbone._cached_imagenet_file", lambda name: None)
    code, out, err = start(app, *argv, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{app}: "), err
    if message:
        assert message in lines[0]
    assert "Traceback" not in out + err and "HYDRA_FULL_ERROR" not in out + err
    assert everything_under(fresh) == []


def test_failed_sweep_leaves_no_sweep_or_job_folder(fresh, monkeypatch, capsys):
    sweep = fresh / "sweeps" / "s"
    for argv in (["-m", "res=32,abc"], ["-m", "seed=0..x"], ["-m", "labels=five,four"]):
        code, _, err = start(
            "run", *argv, "model.backbone.weights=none", f"hydra.sweep.dir={sweep}",
            monkeypatch=monkeypatch, capsys=capsys,
        )  # fmt: skip
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert everything_under(fresh) == [], argv
    assert "(job `res=abc`)" in start(
        "run", "-m", "res=32,abc", "model.backbone.weights=none", monkeypatch=monkeypatch,
        capsys=capsys,
    )[2]  # fmt: skip


def test_full_error_shows_the_traceback(fresh, monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    code, _, err = start("run", "res=abc", monkeypatch=monkeypatch, capsys=capsys)
    assert code != 0 and "Traceback" in err and "res must be a positive integer" in err


def test_range_like_values_that_are_not_ranges_pass() -> None:
    argv = ["-m", "data.store=../crops", "paths.root_dir=/a/../b", "seed=0..2"]
    assert expand_ranges(argv) == ["-m", "data.store=../crops", "paths.root_dir=/a/../b",
                                   "seed=range(0,3)"]  # fmt: skip
    with pytest.raises(UsageError, match="needs two integers"):
        expand_ranges(["-m", "res=32..sixty"])


# ----------------------------------------------------------------------------- 3. quiet logs
def test_undefined_metric_warnings_collapse_into_one_line(caplog) -> None:
    from torchmetrics.functional.classification import binary_roc

    caplog.set_level(logging.WARNING, logger="crc_lightning.apps._hydra")
    preds, no_positive = torch.tensor([0.2, 0.7, 0.4]), torch.tensor([0, 0, 0])
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with collapse_repeated_warnings() as counts:
            for _ in range(7):  # torchmetrics' own warning, as a validation epoch raises it
                binary_roc(preds, no_positive)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert sum(counts.values()) == 7
    assert [str(w.message) for w in shown] == ["something else"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no positive sample" in lines[0] and "7×" in lines[0]


def test_one_progress_line_per_epoch_when_bars_are_off(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="crc_lightning.apps.progress")
    write_fake_store(tmp_path / "data" / "crops" / "a", n_patients=24, seed=0, source="a")
    pretrain(
        pretrain_cfg(
            tmp_path, "ood=none", "ood_stores=[a]", "epochs=2", "export=false",
            "model.backbone.name=test_efficientnet", "trainer.limit_train_batches=2",
        )
    )  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "crc_lightning.apps.progress"]
    assert len(lines) == 2, lines
    pattern = r"^epoch (\d)/2: loss \d+\.\d{4} \| [\w ]+ elapsed(, ETA [\w ]+)?$"
    assert [int(re.match(pattern, ln)[1]) for ln in lines] == [1, 2], lines
    assert "ETA" in lines[0] and "ETA" not in lines[-1]


# ----------------------------------------------------------------------------- 4. no overwrite
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pool(tmp_path) -> Path:
    write_fake_store(tmp_path / "data" / "crops" / "a", n_patients=24, seed=0, source="a")
    return tmp_path


COMMON = ("ood=none", "ood_stores=[a]", "model.backbone.name=test_efficientnet",
          "trainer.limit_train_batches=2")  # fmt: skip


def test_pretraining_never_overwrites_another_run(pool, monkeypatch) -> None:
    first = pretrain(pretrain_cfg(pool, *COMMON, "epochs=1"))
    ckpt_dir, weights = Path(first["checkpoint_dir"]), Path(first["weights_file"])
    before = {p.name: _sha(p) for p in ckpt_dir.glob("*.ckpt")}
    exported = _sha(weights)
    assert "last.ckpt" in before

    # the same command again: refused, naming both ways forward; nothing touched
    with pytest.raises(UsageError, match=r"ckpt_path=last.*\+overwrite=true.*checkpoint_dir="):
        pretrain(pretrain_cfg(pool, *COMMON, "epochs=2"))
    assert {p.name: _sha(p) for p in ckpt_dir.glob("*.ckpt")} == before
    assert _sha(weights) == exported

    # another run's checkpoints in a folder given by hand: refused even with ckpt_path=last
    other = ("temperature=0.2", f"checkpoint_dir={ckpt_dir}", "ckpt_path=last")
    with pytest.raises(UsageError, match="another pretraining run"):
        pretrain(pretrain_cfg(pool, *COMMON, "epochs=2", *other))

    # a run that fails leaves the exported weights as they were (replaced only at the end)
    from crc_lightning.models.simclr import SimCLRModule

    def boom(self, batch, batch_idx):
        raise RuntimeError("killed mid-epoch")

    monkeypatch.setattr(SimCLRModule, "training_step", boom)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(pretrain_cfg(pool, *COMMON, "epochs=1", "+overwrite=true"))
    assert _sha(weights) == exported
    assert {p.name: _sha(p) for p in ckpt_dir.glob("*.ckpt")} == before  # put back
    monkeypatch.undo()

    # asked to continue: resumes at epoch 1; asked to start again: removes the old checkpoints
    resumed = pretrain(pretrain_cfg(pool, *COMMON, "epochs=2", "ckpt_path=last"))
    assert resumed["resumed_from"] == str(ckpt_dir / "last.ckpt")
    assert len(resumed["epoch_losses"]) == 1 and _sha(weights) != exported
    again = pretrain(pretrain_cfg(pool, *COMMON, "epochs=1", "+overwrite=true"))
    assert again["resumed_from"] is None
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["epoch"] == 0


def test_checkpoint_every_epoch(pool) -> None:
    result = pretrain(
        pretrain_cfg(pool, *COMMON, "epochs=2", "checkpoint_every_n_epochs=1", "export=false")
    )
    ckpt_dir = Path(result["checkpoint_dir"])
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == [
        "epoch0000.ckpt", "epoch0001.ckpt", "last.ckpt"
    ]  # fmt: skip
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["epoch"] == 1


def test_sweep_jobs_are_enumerated_as_the_basic_sweeper_launches_them(tmp_path) -> None:
    """The validator sees every job of a ``hydra.sweeper.params`` grid (12 = 3 lr × 2 wd × 2 batch),
    each with its own values, and the sweep's other settings."""
    from hydra import compose, initialize_config_dir

    from crc_lightning.apps._hydra import CONF_DIR, sweep_job_configs

    overrides = [
        f"paths.root_dir={tmp_path}",
        "experiment=grid_search",
        "variant=oodp_sa",
        "res=32",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=overrides, return_hydra_config=True)
        jobs = sweep_job_configs(cfg, "run")
    got = sorted(
        (float(c.model.optimizer.lr), float(c.model.optimizer.weight_decay),
         int(c.datamodule.batch_size)) for _, c in jobs
    )  # fmt: skip
    want = sorted(
        (lr, wd, bs) for lr in (1e-2, 1e-3, 1e-4) for wd in (5e-4, 5e-5) for bs in (16, 32)
    )
    assert got == want
    assert {(c.variant.name, c.res) for _, c in jobs} == {("oodp_sa", 32)}
