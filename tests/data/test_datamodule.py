"""CropDataModule on a tiny fake crop store written here (index.parquet + store.json + npz)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from crc_lightning.data import datamodule as dm_mod
from crc_lightning.data.balance import assign_groups, median_target
from crc_lightning.data.datamodule import CropDataModule
from crc_lightning.data.inputs import resize_square
from crc_lightning.data.labels import LabelSet
from crc_lightning.io.errors import InputError
from tests.helpers.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
GENES = ["KRAS", "NRAS", "BRAF", "PIK3CA"]
RES = 16
W, L = 400.0, 40.0
SPLIT = {"mode": "holdout", "test_size": 0.2, "val_size": 0.2}
WINDOW = {"width": W, "level": L}
NORM = {"mean": 0.449, "std": 0.226}


def _labels() -> LabelSet:
    return LabelSet.from_config(OmegaConf.load(Path(CONF_DIR) / "labels/three.yaml"))


def write_fake_store(folder: Path, n_patients: int = 12, labelled: bool = True, seed: int = 0):
    """A crop store per CONTRACTS.md; returns (folder, {crop_id: int16 HU}, {crop_id: genes})."""
    rng = np.random.default_rng(seed)
    (folder / "cases").mkdir(parents=True)
    rows, crops, genes_of = [], {}, {}
    for p in range(n_patients):
        pid = f"pat{p:02d}"
        arrays = {}
        case_file = f"cases/{p:04d}abcd.npz"
        for lesion in range(1, 1 + int(rng.integers(1, 3))):
            g = dict(zip(GENES, (rng.random(4) < [0.45, 0.1, 0.15, 0.25]).astype(int)))
            size = RES if (p + lesion) % 3 else 24  # mostly res-sized crops, some to resize
            for z in range(int(rng.integers(2, 4))):
                crop_id = f"{pid}/{lesion}/{10 + z}"
                hu = rng.integers(-400, 500, size=(size, size)).astype(np.int16)
                key = f"l{lesion}_s{10 + z}"
                arrays[key] = hu
                crops[crop_id] = hu
                genes_of[crop_id] = g
                rows.append(
                    {
                        "crop_id": crop_id,
                        "patient_id": pid,
                        "lesion": lesion,
                        "lesion_uid": f"{pid}/{lesion}",
                        "slice": 10 + z,
                        "area_mm2": 50.0,
                        "spacing_y": 0.8,
                        "spacing_x": 0.8,
                        "size_px": size,
                        "source": "fake",
                        "case_file": case_file,
                        "key": key,
                        **{k: (int(v) if labelled else None) for k, v in g.items()},
                    }
                )
        np.savez(folder / case_file, **arrays)
    index = pd.DataFrame(rows)
    for gname in GENES:
        index[gname] = pd.array(index[gname].to_numpy(dtype=object), dtype="Int8")
    index.to_parquet(folder / "index.parquet")
    (folder / "store.json").write_text(json.dumps({"version": "test", "params": {}, "inputs": {}}))
    return folder, crops, genes_of


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_fake_store(tmp_path_factory.mktemp("store") / "fake")


def _dm(folder: Path, **kw) -> CropDataModule:
    args = {
        "store_dir": folder,
        "labels": _labels(),
        "res": RES,
        "window": WINDOW,
        "normalize": NORM,
        "batch_size": 4,
        "split": SPLIT,
        "seed": 0,
    }
    args.update(kw)
    dm = CropDataModule(**args)
    dm.setup("fit")
    return dm


def _hand_window(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu.astype(np.float64) - (L - W / 2)) / W, 0.0, 1.0)


def test_batch_format(store):
    dm = _dm(store[0])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, RES, RES) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (4, 3) and batch["target"].dtype == torch.float32
    assert batch["index"].shape == (4,) and batch["index"].dtype == torch.long
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    assert dm.class_names == ["RAS", "PIK3CA_BRAF", "OTHER"] and dm.num_classes == 3
    for name in ("train_index", "val_index", "test_index"):
        assert {"crop_id", "patient_id", "lesion", "slice"} <= set(getattr(dm, name).columns)


@pytest.mark.parametrize("cache", ["lazy", "memory"])
def test_windowing_targets_and_index_match_the_store(store, cache):
    folder, crops, genes_of = store
    dm = _dm(folder, cache=cache)
    n_checked = 0
    for loader, frame in (
        (dm.test_dataloader(), dm.test_index),
        (dm.val_dataloader(), dm.val_index),
    ):
        for batch in loader:
            for img, tgt, row in zip(batch["image"], batch["target"], batch["index"]):
                crop_id = frame["crop_id"].iat[int(row)]
                hu, g = crops[crop_id], genes_of[crop_id]
                if hu.shape[0] == RES:  # hand formula, exact
                    np.testing.assert_allclose(img[0].numpy(), _hand_window(hu), atol=1e-6)
                else:  # windowed by hand, then the store's resize
                    expect = np.clip(resize_square(_hand_window(hu).astype(np.float32), RES), 0, 1)
                    np.testing.assert_allclose(img[0].numpy(), expect, atol=1e-5)
                ras = int(g["KRAS"] or g["NRAS"])
                pb = int(g["PIK3CA"] or g["BRAF"])
                assert tgt.tolist() == [ras, pb, int(not (ras or pb))]
                n_checked += 1
    assert n_checked == len(dm.test_index) + len(dm.val_index)


def test_patients_on_one_side_only(store):
    for seed in range(5):
        dm = _dm(store[0], seed=seed)
        tr, va, te = (set(f["patient_id"]) for f in (dm.train_index, dm.val_index, dm.test_index))
        assert tr and va and te
        assert not tr & te and not va & te and not tr & va
        assert te == set(dm.split.test) and tr == set(dm.split.train) and va == set(dm.split.val)
        assert len(dm.train_index) + len(dm.val_index) + len(dm.test_index) == len(store[1])


def test_same_seed_same_batches_and_epochs_differ(store):
    def epochs(seed: int, n: int = 2) -> list[list[int]]:
        dm = _dm(store[0], seed=seed)
        loader = dm.train_dataloader()
        return [torch.cat([b["index"] for b in loader]).tolist() for _ in range(n)]

    a, b = epochs(3), epochs(3)
    assert a == b
    assert a[0] != a[1], "the train loader reshuffles each epoch"
    assert epochs(4)[0] != a[0]


def test_train_set_is_median_balanced(store):
    dm = _dm(store[0])
    y = dm._datasets["train"].targets.numpy().astype(int)
    groups = assign_groups(y)
    picked = groups[dm.train_sample]
    for g in np.unique(groups):
        assert np.sum(picked == g) == median_target(y)
    assert len(dm.train_dataloader().dataset) == len(dm.train_sample)
    plain = _dm(store[0], balance=False)
    assert len(plain.train_dataloader().dataset) == len(plain.train_index)
    # val/test keep their natural distribution: every row exactly once
    assert len(dm.val_dataloader().dataset) == len(dm.val_index)


def _draws_per_lesion(dm: CropDataModule, epochs: int) -> pd.Series:
    """Mean draws an epoch of every training lesion (the store's own ``lesion_uid`` column),
    counted over ``epochs`` epochs of the training loader's sampler."""
    loader = dm.train_dataloader()
    rows = np.concatenate(
        [np.fromiter(iter(loader.sampler), dtype=np.int64) for _ in range(epochs)]
    )
    uid = dm.train_index["lesion_uid"].astype(str)
    drawn = uid.iloc[dm.train_sample[rows]].value_counts() / epochs
    return drawn.reindex(uid.unique(), fill_value=0.0)


def test_lesion_sampling_draws_every_lesion_equally_whatever_its_slice_count(store):
    image = _dm(store[0], balance=False)
    lesion = _dm(store[0], balance=False, sampling="lesion")
    n, uid = len(lesion.train_index), lesion.train_index["lesion_uid"].astype(str)
    slices = uid.value_counts()
    assert slices.nunique() > 1, "the fake store must have lesions of different slice counts"
    # the paper's sampling: each image once an epoch, so a lesion is drawn as often as its slices
    pd.testing.assert_series_equal(
        _draws_per_lesion(image, 1).sort_index(), slices.sort_index().astype(float),
        check_names=False,
    )  # fmt: skip
    # lesion sampling: the same epoch length, n / L expected draws for every lesion
    assert len(list(iter(lesion.train_dataloader().sampler))) == n == lesion.train_epoch_length
    per = _draws_per_lesion(lesion, 3000)
    np.testing.assert_allclose(per.to_numpy(), n / uid.nunique(), rtol=0.06)


def test_lesion_sampling_keeps_the_median_balanced_budget_per_group(store):
    dm = _dm(store[0], sampling="lesion")
    y = dm._datasets["train"].targets.numpy().astype(int)
    groups = assign_groups(y)
    balanced = _dm(store[0])
    assert dm.train_epoch_length == len(balanced.train_sample)  # the paper's epoch length
    uid = dm.train_index["lesion_uid"].astype(str).to_numpy()
    per = _draws_per_lesion(dm, 3000)
    for g in np.unique(groups):
        lesions = np.unique(uid[groups == g])
        # every lesion of the group: m / L_g expected draws an epoch
        np.testing.assert_allclose(
            per[lesions].to_numpy(), median_target(y) / len(lesions), rtol=0.08
        )
    # exact weights: the group's budget, whatever its slices
    for g in np.unique(groups):
        assert dm.train_weights[groups == g].sum() == pytest.approx(median_target(y))


def test_lesion_sampling_is_seeded_and_redrawn_each_epoch(store):
    def epochs(seed: int) -> list[list[int]]:
        loader = _dm(store[0], seed=seed, sampling="lesion").train_dataloader()
        return [torch.cat([b["index"] for b in loader]).tolist() for _ in range(2)]

    a = epochs(1)
    assert a == epochs(1) and a[0] != a[1] and a[0] != epochs(2)[0]
    with pytest.raises(ValueError, match=r"datamodule\.sampling='slice'"):
        _dm(store[0], sampling="slice")


def test_after_transfer_augments_only_while_training(store):
    dm = _dm(store[0], normalize={"mean": 0.5, "std": 0.25})
    raw = next(iter(dm.val_dataloader()))
    evaluated = dm.on_after_batch_transfer(raw, 0)  # no trainer attached → eval path
    torch.testing.assert_close(evaluated["image"], (raw["image"] - 0.5) / 0.25)
    assert torch.equal(evaluated["index"], raw["index"])
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    trained = dm.on_after_batch_transfer(raw, 0)
    assert trained["image"].shape == raw["image"].shape
    assert not torch.allclose(trained["image"], evaluated["image"], atol=1e-3)
    dm.trainer = SimpleNamespace(training=False)
    torch.testing.assert_close(dm.on_after_batch_transfer(raw, 0)["image"], evaluated["image"])


class _Probe(pl.LightningModule):
    """Records what the model sees in each stage; one linear layer so the optimiser has work."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(RES * RES, 3)
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def training_step(self, batch, _):
        self.seen["train"].append(batch["image"].detach().clone())
        self.seen.setdefault("train_index", []).append(batch["index"].clone())
        logits = self.layer(batch["image"].flatten(1))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["target"])

    def validation_step(self, batch, _):
        self.seen["val"].append(batch["image"].detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_uses_augment_in_fit_and_normalize_in_validation(store):
    dm = CropDataModule(store[0], _labels(), RES, WINDOW, NORM, batch_size=4, split=SPLIT, seed=0)
    model = _Probe()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    raw_val = next(iter(dm.val_dataloader()))["image"]
    torch.testing.assert_close(model.seen["val"][0], dm.normalize(raw_val))
    assert len(model.seen["train"]) == 2
    assert model.seen["train"][0].shape[1:] == (1, RES, RES)
    ds = dm._datasets["train"]
    rows = model.seen["train_index"][0]
    raw_train = torch.stack([ds.images[ds.store_rows[r]] for r in rows])
    assert not torch.allclose(model.seen["train"][0], dm.normalize(raw_train), atol=1e-3)
    assert len(dm.test_dataloader().dataset) == len(dm.test_index)


def test_hydra_config_instantiates(store):
    cfg = OmegaConf.create(
        {
            "data": {"store": str(store[0])},
            "res": RES,
            "seed": 1,
            "labels": OmegaConf.load(Path(CONF_DIR) / "labels/five.yaml"),
            "split": OmegaConf.load(Path(CONF_DIR) / "split/kfold.yaml"),
            "datamodule": OmegaConf.load(Path(CONF_DIR) / "datamodule/default.yaml"),
            "input": OmegaConf.load(Path(CONF_DIR) / "input/default.yaml"),
        }
    )
    cfg.split.n_splits = 3
    dm = instantiate(cfg.datamodule)
    assert isinstance(dm, CropDataModule)
    dm.setup("fit")
    assert dm.class_names == ["KRAS", "NRAS", "BRAF", "PIK3CA", "OTHER"]
    assert dm.split.mode == "kfold" and dm.split.fold == 0
    assert dm.split_summary()["n_test_patients"] == len(set(dm.test_index["patient_id"]))
    assert dm.augment.res == RES and dm.window_width == 400.0 and dm.window_level == 40.0


def test_unlabelled_rows_dropped_and_excluded_patients_removed(tmp_path, store):
    folder, _, _ = write_fake_store(tmp_path / "mixed", n_patients=8, seed=5)
    index = pd.read_parquet(folder / "index.parquet")
    index.loc[index["patient_id"] == "pat00", "KRAS"] = pd.NA
    index.to_parquet(folder / "index.parquet")
    dm = _dm(folder, exclude_patients=["pat01"])
    seen = set(pd.concat([dm.train_index, dm.val_index, dm.test_index])["patient_id"])
    assert seen == {f"pat{p:02d}" for p in range(2, 8)}


def test_unlabelled_store_and_missing_store_are_clear_errors(tmp_path):
    folder, _, _ = write_fake_store(tmp_path / "ood", n_patients=4, labelled=False)
    with pytest.raises(InputError, match="no gene labels"):
        _dm(folder)
    with pytest.raises(InputError, match="no crop store"):
        _dm(tmp_path / "nowhere")
    small, _, _ = write_fake_store(tmp_path / "tiny", n_patients=2)
    with pytest.raises(InputError, match="at least 3 patients"):
        _dm(small)


def test_preloaded_images_are_cached_per_store_res_and_window(store):
    dm_mod.clear_cache()
    a, b = _dm(store[0], cache="memory"), _dm(store[0], seed=9, cache="memory")
    assert a._datasets["train"].images is b._datasets["train"].images
    c = _dm(store[0], window={"width": 1000.0, "level": L}, cache="memory")
    assert c._datasets["train"].images is not a._datasets["train"].images


def test_lazy_images_equal_the_preloaded_ones_bit_for_bit(store):
    from crc_lightning.cropstore.reader import CropStore
    from crc_lightning.data.images import StoreImages

    st = CropStore(store[0])
    for res, window in ((RES, (W, L)), (24, (1000.0, 100.0)), (9, (W, L))):
        memory = dm_mod.load_images(st, res, *window)
        lazy = dm_mod.store_images(st, res, *window)
        assert isinstance(lazy, StoreImages) and lazy.shape == tuple(memory.shape)
        for i in range(len(st)):
            assert torch.equal(lazy[i], memory[i]), (res, i)
    assert len(lazy.reader._open) <= lazy.reader.max_open


def test_lazy_loaders_give_the_memory_batches_also_from_worker_processes(store):
    """The same seed → the same training batches from ``cache=lazy`` read in 2 DataLoader worker
    processes as from the pre-loaded tensor in this process; the lazy module holds no crop."""
    from crc_lightning.data.images import StoreImages

    memory = _dm(store[0], cache="memory")
    lazy = _dm(store[0], cache="lazy", num_workers=2)
    assert isinstance(lazy._datasets["train"].images, StoreImages)
    assert not any(isinstance(v, torch.Tensor) and v.ndim == 4 for v in vars(lazy).values())
    for stage in ("train_dataloader", "val_dataloader"):
        for _ in range(2):  # two epochs: persistent workers, the shuffle advances the same way
            a, b = list(getattr(memory, stage)()), list(getattr(lazy, stage)())
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])


def test_lazy_store_with_a_missing_case_file_fails_at_setup(tmp_path):
    folder, _, _ = write_fake_store(tmp_path / "s")
    victim = sorted((folder / "cases").iterdir())[3]
    victim.unlink()
    with pytest.raises(
        InputError, match=rf"{victim.name}: case file listed in the index is missing"
    ):
        _dm(folder, cache="lazy")
    with pytest.raises(ValueError, match="cache must be one of"):
        _dm(folder, cache="disk")
