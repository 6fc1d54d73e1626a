"""SSL data: batched CT augmentation (per-sample windows, bounds, shapes), the OOD pool (duplicates,
exclusions, neighbouring slices), the datamodule's batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crc_lightning.cropstore.reader import CropStore
from crc_lightning.data.ssl import (
    SSLAugment,
    SSLDataModule,
    affine_grid,
    load_ood_pool,
    target_test_patients,
)
from tests.helpers.stores import write_fake_store

RES = 24
WINDOW = {"width": 400.0, "level": 40.0}  # conf/input/default.yaml
NORM = {"mean": 0.449, "std": 0.226}


def test_views_shape_range_and_per_sample_params():
    torch.manual_seed(0)
    hu = torch.randn(32, 1, 40, 40) * 150 + 40
    aug = SSLAugment(RES, None, WINDOW)
    v0, v1 = aug(hu)
    for v in (v0, v1):
        assert v.shape == (32, 1, RES, RES)
        assert v.dtype == torch.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    p = aug.last_params
    for k in ("level", "width"):
        assert p[k].shape == (2, 32)
        assert len(torch.unique(p[k])) == 64  # every sample and view draws its own
    for k in ("blur_sigma", "noise_std"):  # 0 where a sample drew "off" (p = 0.5)
        assert p[k].shape == (2, 32)
        assert len(torch.unique(p[k][p[k] > 0])) == int((p[k] > 0).sum()) > 0
    assert float(p["level"].min()) >= 20.0 and float(p["level"].max()) <= 60.0
    assert float(p["width"].min()) >= 400 * 0.8 - 1e-3
    assert float(p["width"].max()) <= 400 * 1.25 + 1e-3
    # geometry differs per sample too: the two views of one crop are not equal
    assert not torch.allclose(v0, v1)


def test_affine_grid_equals_torchs():
    torch.manual_seed(5)
    mat = torch.randn(16, 2, 3)
    for res in (7, 32):
        want = torch.nn.functional.affine_grid(mat, [16, 1, res, res], align_corners=False)
        torch.testing.assert_close(affine_grid(mat, res), want, atol=1e-5, rtol=0)


def test_blur_equals_kornias_gaussian_blur_per_sample():
    """Oracle: kornia.filters.gaussian_blur2d (reflect border) with each sample's recorded σ;
    samples drawn without blur come back unchanged."""
    from kornia.filters import gaussian_blur2d

    torch.manual_seed(4)
    x = torch.rand(64, 1, 32, 32)
    aug = SSLAugment(32, {"blur_p": 0.5, "blur_sigma": (0.3, 2.0), "blur_kernel": 7}, WINDOW)
    y, sigma = aug.blur(x)
    on = sigma > 0
    assert 10 < int(on.sum()) < 54  # both kinds present (p = 0.5)
    assert float(sigma[on].min()) >= 0.3 and float(sigma.max()) <= 2.0
    want = gaussian_blur2d(x[on], (7, 7), sigma[on, None].expand(-1, 2), border_type="reflect")
    torch.testing.assert_close(y[on], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(y[~on], x[~on], atol=1e-6, rtol=0)


def test_window_jitter_matches_the_window_formula_on_constant_crops():
    """A constant-HU crop stays constant through geometry and blur, so each output pixel must be
    the CT window of that HU with the sample's recorded (level, width) — an independent oracle."""
    torch.manual_seed(1)
    c = torch.linspace(-150, 250, 16)
    hu = c.view(16, 1, 1, 1).expand(16, 1, 32, 32).clone()
    aug = SSLAugment(RES, {"noise_p": 0.0}, WINDOW)
    v0, _ = aug(hu)
    level, width = aug.last_params["level"][0], aug.last_params["width"][0]
    expected = np.clip((c.numpy() - (level.numpy() - width.numpy() / 2)) / width.numpy(), 0, 1)
    got = v0.flatten(1)
    np.testing.assert_allclose(got.mean(1).numpy(), expected, atol=1e-4)
    assert float((got.max(1).values - got.min(1).values).max()) < 1e-4
    # bounds of the jitter: the window is monotonic in level and in width, so the output of every
    # sample lies between the four corners (level 40 ± 20, width 400 × {0.8, 1.25})
    corners = np.stack(
        [np.clip((c.numpy() - lv) / w + 0.5, 0, 1) for lv in (20, 60) for w in (320, 500)]
    )
    out = got.mean(1).numpy()
    assert np.all(out >= corners.min(0) - 1e-4) and np.all(out <= corners.max(0) + 1e-4)
    assert len(np.unique(np.round(out[(out > 0) & (out < 1)], 5))) == int(
        ((out > 0) & (out < 1)).sum()
    )


def test_noise_is_per_sample_and_output_clamped():
    torch.manual_seed(2)
    hu = torch.full((64, 1, RES, RES), 40.0)
    aug = SSLAugment(RES, {"noise_p": 1.0, "noise_std": 0.05, "blur_p": 0.0}, WINDOW)
    v0, _ = aug(hu)
    std = aug.last_params["noise_std"][0]
    assert len(torch.unique(std)) == 64 and float(std.max()) <= 0.05
    measured = v0.flatten(1).std(1)
    assert float(torch.corrcoef(torch.stack([measured, std]))[0, 1]) > 0.9


def test_unknown_augment_key_is_refused():
    with pytest.raises(ValueError, match="unknown ssl augment keys"):
        SSLAugment(RES, {"colour": 1}, WINDOW)


def test_pool_drops_duplicates_across_stores_and_excluded_patients(tmp_path):
    a = write_fake_store(tmp_path / "a", n_patients=10, seed=0, source="a")
    b = write_fake_store(tmp_path / "b", n_patients=4, seed=0, source="b")  # = a's first 4
    c = write_fake_store(tmp_path / "c", n_patients=3, seed=5, source="c")
    sa, sb, sc = CropStore(a), CropStore(b), CropStore(c)
    # oracle: b's crops equal to some crop of a, compared array by array
    a_crops = [sa.load(i) for i in sa.index["crop_id"]]
    dup_b = sum(
        any(x.shape == y.shape and np.array_equal(x, y) for y in a_crops)
        for x in (sb.load(i) for i in sb.index["crop_id"])
    )
    assert dup_b == len(sb.index)  # the fixture really shares them
    pool = load_ood_pool({"a": a, "b": b, "c": c}, RES, exclude_patients=["P001"])
    n_p001 = int(
        (sa.index["patient_id"] == "P001").sum() + (sb.index["patient_id"] == "P001").sum()
    )
    n_c_p001 = int((sc.index["patient_id"] == "P001").sum())
    assert pool.n_excluded == n_p001 + n_c_p001
    assert pool.n_duplicates == dup_b - int((sb.index["patient_id"] == "P001").sum())
    assert (
        len(pool)
        == len(sa.index)
        + len(sc.index)
        - n_p001
        + int((sb.index["patient_id"] == "P001").sum())
        - n_c_p001
    )
    assert "P001" not in set(pool.index["patient_id"])
    assert pool.images.shape == (len(pool), 1, RES, RES)
    # HU kept (not windowed): values outside [0, 1]
    assert float(pool.images.max()) > 100


def test_exclude_by_store_only_touches_that_store(tmp_path):
    a = write_fake_store(tmp_path / "a", n_patients=4, seed=0)
    c = write_fake_store(tmp_path / "c", n_patients=4, seed=9)
    pool = load_ood_pool({"a": a, "c": c}, RES, exclude_by_store={"a": ["P000"]})
    by_src = pool.index.groupby("source")["patient_id"].unique()
    assert "P000" not in set(by_src["a"]) and "P000" in set(by_src["c"])


def test_target_test_patients_matches_the_classifier_split(tmp_path):
    """Oracle: the run's own datamodule, for every seed, label set and protocol — the exclusion
    used to recompute the split with labels=five, holdout, seed 0 whatever the run did."""
    from crc_lightning.apps.run import plan_job
    from crc_lightning.data.datamodule import CropDataModule
    from tests.helpers.config import compose_app

    store = write_fake_store(tmp_path / "t", n_patients=20, seed=3)
    labels = {
        "name": "three",
        "genes": ["KRAS", "NRAS", "BRAF", "PIK3CA"],
        "classes": {"RAS": ["KRAS", "NRAS"], "PIK3CA_BRAF": ["PIK3CA", "BRAF"], "OTHER": []},
    }
    five = {**labels, "name": "five",
            "classes": {"KRAS": ["KRAS"], "NRAS": ["NRAS"], "BRAF": ["BRAF"],
                        "PIK3CA": ["PIK3CA"], "OTHER": []}}  # fmt: skip
    split = {"mode": "holdout", "test_size": 0.2, "val_size": 0.1}
    excluded = ["P004", "P011"]
    expected = set()
    for seed in (0, 1):
        dm = CropDataModule(store, labels, 16, WINDOW, NORM, split=split, seed=seed,
                            exclude_patients=excluded)  # fmt: skip
        dm.setup("fit")
        expected |= {str(p) for p in dm.split.test}
    got = target_test_patients(store, labels, split, [0, 1], excluded)
    assert set(got) == expected and not set(got) & set(excluded)
    assert target_test_patients(store, five, split, [0, 1], excluded) == got  # label-set free
    # the run app's plan (same function): a holdout run of seed 1 tests a subset of them
    cfg = compose_app("run", f"data.store={store}", f"paths.root_dir={tmp_path}",
                      "paths.output_dir=/tmp/unused", "split=holdout", "split.test_size=0.2",
                      "seed=1", f"datamodule.exclude_patients=[{','.join(excluded)}]")  # fmt: skip
    plan, _ = plan_job(cfg)
    assert set(plan.test_patients()) <= set(got)
    # cv (run's default) and kfold: every labelled patient is tested by some fold
    everyone = {f"P{i:03d}" for i in range(20)} - set(excluded)
    for mode in ("cv", "kfold"):
        cv = {"mode": mode, "n_splits": 3, "val_size": 0.1}
        assert set(target_test_patients(store, labels, cv, [0], excluded)) == everyone


def test_neighbour_slices_are_same_lesion_within_gap(tmp_path):
    store = write_fake_store(tmp_path / "s", n_patients=6, seed=1)
    pool = load_ood_pool({"s": store}, RES)
    near = pool.neighbours(1)
    idx = pool.index
    for i in range(len(idx)):
        brute = [
            j
            for j in range(len(idx))
            if j != i
            and idx["lesion_uid"].iat[j] == idx["lesion_uid"].iat[i]
            and abs(int(idx["slice"].iat[j]) - int(idx["slice"].iat[i])) <= 1
        ]
        assert sorted(near[i].tolist()) == brute


def test_datamodule_batches_slices_positives(tmp_path):
    store = write_fake_store(tmp_path / "s", n_patients=6, seed=1)
    dm = SSLDataModule(
        {"s": store}, RES, WINDOW, NORM, batch_size=8, positives="slices", max_slice_gap=1
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.drop_last
    n = 0
    pool = dm.pool
    near_all = pool.neighbours(1)
    assert sum(len(x) > 0 for x in near_all) > len(pool) // 2  # the fixture has multi-slice lesions
    for batch in loader:
        assert batch["hu"].shape == (8, 1, RES, RES)
        # the second image is another slice of the same lesion whenever one exists
        for k, i in enumerate(batch["index"].tolist()):
            near = near_all[i]
            allowed = near.tolist() if len(near) else [i]
            assert any(torch.equal(batch["hu2"][k], pool.images[j]) for j in allowed)
            assert torch.equal(batch["hu"][k], pool.images[i])
        out = dm.on_after_batch_transfer(batch, 0)
        assert out["view0"].shape == out["view1"].shape == (8, 1, RES, RES)
        n += 1
    assert n == len(pool) // 8
    assert dm.summary()["n_crops"] == len(pool)


def test_batch_larger_than_pool_is_refused(tmp_path):
    store = write_fake_store(tmp_path / "s", n_patients=2, seed=1)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        SSLDataModule({"s": store}, RES, WINDOW, NORM, batch_size=512).setup("fit")


def test_lazy_pool_equals_the_preloaded_pool(tmp_path):
    """``cache=lazy``: the same crops, duplicates, exclusions and HU tensors as the pre-loaded
    pool, and the datamodule gives the same batches (second views of neighbour slices included)."""
    from crc_lightning.data.images import StoreImages

    a = write_fake_store(tmp_path / "a", n_patients=6, seed=0, source="a")
    b = write_fake_store(tmp_path / "b", n_patients=3, seed=0, source="b")  # duplicates of a
    stores = {"a": a, "b": b}
    memory = load_ood_pool(stores, RES, exclude_patients=["P002"], cache="memory")
    lazy = load_ood_pool(stores, RES, exclude_patients=["P002"], cache="lazy")
    assert isinstance(lazy.images, StoreImages) and isinstance(memory.images, torch.Tensor)
    assert (lazy.n_duplicates, lazy.n_excluded) == (memory.n_duplicates, memory.n_excluded) > (0, 0)
    assert lazy.index.equals(memory.index) and lazy.images.shape == tuple(memory.images.shape)
    for i in range(len(memory)):
        assert torch.equal(lazy.images[i], memory.images[i])
    batches = {}
    for cache in ("memory", "lazy"):
        dm = SSLDataModule(stores, RES, WINDOW, NORM, batch_size=4, positives="slices",
                           cache=cache)  # fmt: skip
        dm.setup("fit")
        torch.manual_seed(0)
        batches[cache] = list(dm.train_dataloader())
    assert len(batches["lazy"]) == len(batches["memory"]) > 0
    for x, y in zip(batches["memory"], batches["lazy"]):
        assert all(torch.equal(x[k], y[k]) for k in ("hu", "hu2", "index"))
