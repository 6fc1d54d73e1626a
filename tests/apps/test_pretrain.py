"""The pretrain app: `ood=[a,b]` composes, a short run lowers the NT-Xent loss and exports weights the
classifier's backbone loads, a killed run resumes at the right epoch with ``ckpt_path=last``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from crc_lightning.apps.pretrain import pretrain
from crc_lightning.models.backbone import create_backbone
from crc_lightning.models.simclr import load_simclr_weights
from tests.helpers.config import CONF_DIR
from tests.helpers.stores import write_fake_store

CONF = CONF_DIR


def make_cfg(root: Path, *overrides: str):
    base = [
        f"paths.root_dir={root}",
        f"paths.output_dir={root}/out",
        "logger=none",
        "res=32",
        "batch_size=16",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.deterministic=true",
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("pretrain", overrides=[*base, *overrides])


def test_ood_list_override_composes(tmp_path):
    both = make_cfg(tmp_path, "ood=[lits,ircadb]")
    assert dict(both.ood.sources) == {
        "lits": f"{tmp_path}/data/crops/lits",
        "ircadb": f"{tmp_path}/data/crops/ircadb",
    }
    assert "python -m crc_lightning.preprocess data=lits" in both.ood.hints.lits
    assert dict(make_cfg(tmp_path, "ood=lits_ircadb").ood.sources) == dict(both.ood.sources)
    assert list(make_cfg(tmp_path, "ood=crlm").ood.sources) == ["crlm"]
    default = make_cfg(tmp_path)
    assert dict(default.ood.sources) == {"synthetic_ood": f"{tmp_path}/data/crops/synthetic_ood"}
    # the synthetic OOD cohort is drawn from another seed than the target cohort (conf/data)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        target = compose("run", overrides=[f"paths.root_dir={tmp_path}"])
    assert default.ood.build_synthetic.synthetic_ood.seed != target.data.synthetic.seed
    assert default.model.backbone.weights == "none" and default.epochs == 1000


def test_missing_store_names_the_build_command(tmp_path):
    cfg = make_cfg(tmp_path, "ood=[lits,ircadb]")
    with pytest.raises(ValueError, match=r"python -m crc_lightning\.preprocess data=lits"):
        pretrain(cfg)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pre")
    write_fake_store(root / "data" / "crops" / "a", n_patients=24, seed=0, source="a")
    return root


def test_short_pretraining_lowers_the_loss_and_exports(root):
    # test_efficientnet: the same factory and code path as EfficientNet-B0, 10× cheaper on a CPU
    cfg = make_cfg(
        root,
        "ood=none",
        "ood_stores=[a]",
        "epochs=12",
        "model.backbone.name=test_efficientnet",
        "model.base_lr=1.0",  # lr 0.0625 at batch 16, cosine after 1 warmup epoch
        "model.warmup_epochs=1",
        "model.attention=true",
        "temperature=0.2",
        "seed=5",
    )
    result = pretrain(cfg)
    losses = result["epoch_losses"]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.15, losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert result["meta"]["ood"]["stores"]["a"]["n_crops"] > 0
    path = Path(result["weights_file"])
    assert path == root / "weights" / "simclr_res32_sa.ckpt"
    bb, pool, meta = load_simclr_weights(path, 32, True, "test_efficientnet")
    assert meta["epochs"] == 12 and meta["attention"] is True and meta["res"] == 32
    fresh, _ = create_backbone("test_efficientnet", 1, "none")
    fresh.load_state_dict(bb, strict=True)
    model = result["trainer"].lightning_module
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v.cpu())
    assert pool is not None and set(pool) == set(model.pool.state_dict())


def test_resume_after_kill_starts_at_epoch_k(root):
    common = [
        "ood=none",
        "ood_stores=[a]",
        "checkpoint_every_n_epochs=5",  # last.ckpt is still written every epoch
        "export=false",
        "model.backbone.name=test_efficientnet",
    ]
    first = pretrain(make_cfg(root, *common, "epochs=1"))
    ckpt = Path(first["checkpoint_dir"]) / "last.ckpt"
    assert ckpt.is_file()
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain hparams
    steps_per_epoch = first["trainer"].global_step
    assert stored["epoch"] == 0 and stored["global_step"] == steps_per_epoch
    assert not (Path(first["checkpoint_dir"]) / "epoch0000.ckpt").exists()  # every 5 epochs

    second = pretrain(make_cfg(root, *common, "epochs=2", "ckpt_path=last"))
    assert second["resumed_from"] == str(ckpt)
    trainer = second["trainer"]
    assert len(second["epoch_losses"]) == 1  # only epoch k=1 ran in this process
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * steps_per_epoch
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] == 1

    # other settings → another checkpoint folder: never continued by mistake
    other = make_cfg(root, *common, "epochs=2", "ckpt_path=last", "temperature=0.2")
    from crc_lightning.apps.pretrain import checkpoint_dir, ood_stores

    assert checkpoint_dir(other, ood_stores(other)) != Path(first["checkpoint_dir"])


def test_target_cohort_in_the_pool_is_excluded_and_run_checks_the_pool(tmp_path):
    """The target store in the OOD pool: unnamed, its patients go into the checkpoint's pool and
    `run` refuses the checkpoint; named (exclude_test_of.store), the default drops all of its
    labelled patients and `run` accepts it; patients=test drops exactly the run's holdout test
    patients (the run's own plan as the oracle), so a holdout run of those seeds is accepted and
    a cv run — which tests everyone — is refused."""
    from crc_lightning.apps.run import plan_job, run
    from crc_lightning.io.errors import InputError
    from crc_lightning.models.simclr import read_simclr_meta

    target = write_fake_store(tmp_path / "data" / "crops" / "target", 16, seed=0, source="target")
    other = write_fake_store(tmp_path / "data" / "crops" / "other", 6, seed=1, source="other")
    common = [
        "ood=none",
        f"ood_stores=[{target},{other}]",
        "epochs=1",
        "trainer.limit_train_batches=1",
    ]

    def pretrain_to(name: str, *extra: str) -> Path:
        weights = tmp_path / "w" / f"{name}.ckpt"
        pretrain(make_cfg(tmp_path, *common, f"weights_file={weights}", *extra))
        return weights

    def run_cfg(weights: Path, job: str, *extra: str):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose("run", overrides=[
                f"data.store={target}", f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path / job}", "res=32", "trainer=cpu", "variant=oodp",
                f"model.backbone.weights_file={weights}", "+trainer.fast_dev_run=true",
                "trainer.enable_progress_bar=false", "print_metrics=false", "logger=none",
                "datamodule.batch_size=64", "split.n_splits=2", *extra,
            ])  # fmt: skip

    leaky = pretrain_to("leaky")
    assert read_simclr_meta(leaky)["pool"]["n_patients"] == 16 + 6
    with pytest.raises(InputError, match="pool holds 16 of this job's 16 test patients"):
        run(run_cfg(leaky, "a"))

    safe = pretrain_to("safe", f"exclude_test_of.store={target}")
    assert read_simclr_meta(safe)["pool"]["n_patients"] == 6  # the other cohort only
    assert run(run_cfg(safe, "b"))["weights"]["file"] == str(safe)

    holdout = ["split@exclude_test_of.split=holdout", "exclude_test_of.split.test_size=0.25"]
    partial = pretrain_to("partial", f"exclude_test_of.store={target}",
                          "exclude_test_of.patients=test", "exclude_test_of.seeds=[0,1]", *holdout)  # fmt: skip
    tested = set()
    for seed in (0, 1):
        plan, _ = plan_job(run_cfg(partial, "plan", "split=holdout", "split.test_size=0.25",
                                   f"seed={seed}"))  # fmt: skip
        tested |= set(plan.test_patients())
    assert read_simclr_meta(partial)["pool"]["n_patients"] == 16 - len(tested) + 6
    run(run_cfg(partial, "c", "split=holdout", "split.test_size=0.25", "seed=1"))
    with pytest.raises(InputError, match="refused"):
        run(run_cfg(partial, "d"))  # cv tests every patient, some of them pretrained on
