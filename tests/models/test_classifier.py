"""MutationClassifier: heads, weight sources (and their provenance), loss, optimizer, checkpoints."""

from __future__ import annotations

import hashlib
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from crc_lightning.models.attention import GlobalPool, SpatialSelfAttention
from crc_lightning.models.backbone import WeightsNotFoundError
from crc_lightning.models.checkpoint import load_model
from crc_lightning.models.classifier import MutationClassifier
from tests.helpers.config import CONF_DIR

CONF = CONF_DIR
CLASSES = ["RAS", "PIK3CA_BRAF", "OTHER"]


def _model(**kw) -> MutationClassifier:
    kw.setdefault("backbone", {"weights": "none"})
    return MutationClassifier(CLASSES, res=32, **kw)


@pytest.fixture(scope="module")
def imagenet_like_file(tmp_path_factory) -> Path:
    """A random 3-channel, 1000-class timm EfficientNet-B0 state dict, as an ImageNet file would be."""
    torch.manual_seed(1)
    net = timm.create_model("efficientnet_b0", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "effb0.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.parametrize("attention", [False, True])
def test_forward_shapes_and_head(attention: bool) -> None:
    torch.manual_seed(0)
    model = _model(attention=attention).eval()
    assert isinstance(model.pool, SpatialSelfAttention if attention else GlobalPool)
    logits = model(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, len(CLASSES))
    assert model.fc.in_features == 1280
    assert model.weights_info == {"init": "none", "file": None, "sha256": None}


def test_loss_is_multilabel_bce() -> None:
    torch.manual_seed(0)
    model = _model().eval()
    batch = {"image": torch.rand(4, 1, 32, 32), "target": torch.tensor([[1, 1, 0]] * 4).float()}
    loss, logits = model._step(batch)
    p = torch.sigmoid(logits)
    y = batch["target"]
    by_hand = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_imagenet_file_is_loaded_and_recorded(imagenet_like_file: Path) -> None:
    model = _model(backbone={"weights": "imagenet", "weights_file": str(imagenet_like_file)})
    src = torch.load(imagenet_like_file)
    # 1-channel stem = ImageNet RGB kernels summed over channels; deeper layers copied as they are
    want_stem = src["conv_stem.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.backbone.conv_stem.weight, want_stem)
    torch.testing.assert_close(model.backbone.conv_head.weight, src["conv_head.weight"])
    info = model.weights_info
    assert info["init"] == "imagenet"
    assert info["file"] == str(imagenet_like_file)
    assert info["sha256"] == hashlib.sha256(imagenet_like_file.read_bytes()).hexdigest()


def test_imagenet_file_serves_imagenet_variants_only(imagenet_like_file: Path, tmp_path) -> None:
    """``imagenet_file`` is read by weights=imagenet when weights_file is null; a SimCLR variant of
    the same sweep ignores it and looks for its checkpoint by name in weights_dir."""
    model = _model(backbone={"weights": "imagenet", "imagenet_file": str(imagenet_like_file)})
    assert model.weights_info["file"] == str(imagenet_like_file)
    bb = {
        "weights": "simclr",
        "imagenet_file": str(imagenet_like_file),
        "weights_dir": str(tmp_path),
    }
    with pytest.raises(WeightsNotFoundError, match=r"simclr_res32\.ckpt does not exist"):
        _model(backbone=bb)


def test_missing_imagenet_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="weights_file"):
        _model(backbone={"weights": "imagenet", "weights_file": str(tmp_path / "nope.pth")})


@pytest.mark.parametrize("attention", [False, True])
def test_simclr_without_checkpoint_names_the_pretrain_command(tmp_path: Path, attention) -> None:
    bb = {
        "weights": "simclr",
        "weights_file": str(tmp_path / "simclr_res32.ckpt"),
    }
    with pytest.raises(WeightsNotFoundError, match=r"python -m crc_lightning\.pretrain res=32"):
        _model(backbone=bb, attention=attention)


def test_label_smoothing_trains_on_smoothed_targets_and_validates_on_hard_ones() -> None:
    torch.manual_seed(0)
    model = _model(label_smoothing=0.1).eval()  # eval: dropout off, the same logits twice
    with torch.no_grad():  # confident logits, so smoothing changes the loss visibly
        model.fc.bias.copy_(torch.tensor([4.0, -3.0, 2.0]))
    y = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1]]).float()
    batch = {"image": torch.rand(4, 1, 32, 32), "target": y}
    loss = model.training_step(batch, 0)
    logits = model(batch["image"])
    hand = torch.tensor([[0.95, 0.05, 0.05], [0.95, 0.95, 0.95], [0.95, 0.05, 0.05],
                         [0.05, 0.05, 0.95]])  # fmt: skip  # y(1 - 0.1) + 0.1/2, by hand
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(
        logits, hand))  # fmt: skip
    # validation / test: the hard targets (val/loss comparable across ε)
    val_loss, _ = model._step(batch)
    torch.testing.assert_close(val_loss, torch.nn.BCEWithLogitsLoss()(logits, y))
    assert not torch.allclose(loss, val_loss)  # (columns with as many 1s as 0s would tie)
    with pytest.raises(ValueError, match="label_smoothing"):
        _model(label_smoothing=1.0)


class _LrRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))


def _fit_lrs(model: MutationClassifier, epochs: int, n: int = 8, batch: int = 2) -> list[float]:
    rec = _LrRecorder()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[rec])  # fmt: skip
    trainer.fit(model, DataLoader(_Batches(n), batch_size=batch))
    return rec.lrs


def test_cosine_schedule_warms_up_then_anneals_per_step_as_the_closed_form() -> None:
    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    schedule = {"name": "cosine", "warmup_epochs": 1, "warmup_start_factor": 0.1,
                "min_lr_factor": 0.01}  # fmt: skip
    torch.manual_seed(0)
    lrs = _fit_lrs(_model(optimizer=sgd, lr_schedule=schedule), epochs=3)  # 4 steps an epoch
    base, start, low, warm, total = 0.1, 0.1, 0.1 * 0.01, 4, 12
    by_hand = [base * (start + (1 - start) * t / warm) for t in range(warm)] + [
        low + (base - low) * (1 + math.cos(math.pi * k / (total - warm))) / 2
        for k in range(total - warm)
    ]
    assert lrs == pytest.approx(by_hand, rel=1e-6)
    # constant (the paper): the optimizer alone, the lr never moves
    assert _fit_lrs(_model(optimizer=sgd), epochs=1) == pytest.approx([0.1] * 4)


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match=r"lr_schedule\.name='step'"):
        _model(lr_schedule={"name": "step"})
    with pytest.raises(ValueError, match="unknown keys"):
        _model(lr_schedule={"name": "cosine", "warmup": 2})
    plateau = partial(torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(ValueError, match="both set"):
        _model(lr_schedule={"name": "cosine"}, scheduler=plateau)


def test_config_optimizer_is_the_papers_sgd() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "run",
            overrides=["labels=three", "model.backbone.weights=none", "paths.root_dir=/tmp"],
        )
    from hydra.utils import instantiate

    model = instantiate(cfg.model)
    assert model.class_names == CLASSES
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (1e-3, 0.9, 5e-4)
    assert cfg.datamodule.batch_size == 16


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 32, 32, generator=g)
        self.y = (torch.rand(n, 3, generator=g) > 0.5).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "target": self.y[i], "index": torch.tensor(i)}


def test_checkpoint_is_self_describing(tmp_path: Path, imagenet_like_file: Path) -> None:
    """A checkpoint alone rebuilds the model (no ImageNet file needed) and names its provenance."""
    from functools import partial

    L.seed_everything(0)
    meta = {
        "labels": {"name": "three"},
        "window": {"width": 400.0, "level": 40.0},
        "normalize": {"mean": 0.449, "std": 0.226},
        "preprocess": {"epsilon": 0.4},
    }
    model = MutationClassifier(
        CLASSES,
        backbone={"weights": "imagenet", "weights_file": str(imagenet_like_file)},
        attention=True,
        res=32,
        optimizer=partial(torch.optim.SGD, lr=1e-3),
        meta=meta,
    )
    loader = DataLoader(_Batches(), batch_size=4)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    # the weights file is gone: loading must not need it
    moved = tmp_path / "moved.pth"
    imagenet_like_file.rename(moved)
    try:
        back, card = load_model(ckpt)
    finally:
        moved.rename(imagenet_like_file)
    assert back.class_names == CLASSES
    assert back.hparams["res"] == 32 and back.hparams["attention"] is True
    assert card["window"] == meta["window"] and card["labels"] == meta["labels"]
    assert card["preprocess"]["epsilon"] == 0.4
    assert back.weights_info["init"] == "imagenet"
    assert back.weights_info["file"] == str(imagenet_like_file)
    x = torch.rand(3, 1, 32, 32)
    model.eval()
    torch.testing.assert_close(back(x), model(x))


def test_val_auc_leaves_out_classes_without_positives_or_negatives() -> None:
    """val/auc = sklearn ``roc_auc_score(average="weighted")`` over the classes that have both a
    positive and a negative, fed in batches as the validation loop does; torchmetrics'
    MultilabelAUROC scores the undefined classes 0 and keeps them in the mean."""
    import numpy as np
    from sklearn.metrics import roc_auc_score
    from torchmetrics.classification import MultilabelAUROC

    from crc_lightning.models.classifier import DefinedClassAUROC

    rng = np.random.default_rng(0)
    n = 37
    y = np.stack([rng.random(n) < 0.4, np.ones(n, bool), rng.random(n) < 0.2, np.zeros(n, bool)], 1)
    p = np.clip(0.3 * y + rng.random(y.shape) * 0.8, 0, 1).astype(np.float32)
    metric = DefinedClassAUROC(4)
    for lo in range(0, n, 8):  # batches of 8
        metric.update(torch.from_numpy(p[lo : lo + 8]), torch.from_numpy(y[lo : lo + 8]).long())
    keep = [0, 2]  # class 1: no negative, class 3: no positive
    want = roc_auc_score(y[:, keep], p[:, keep], average="weighted")
    assert float(metric.compute()) == pytest.approx(want, abs=1e-6)
    old = MultilabelAUROC(num_labels=4, average="weighted")
    old.update(torch.from_numpy(p), torch.from_numpy(y).long())
    assert abs(float(old.compute()) - want) > 0.05  # the defect it replaces
    empty = DefinedClassAUROC(2)
    empty.update(torch.rand(3, 2), torch.ones(3, 2).long())
    assert torch.isnan(empty.compute())
