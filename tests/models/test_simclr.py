"""SimCLR module: NT-Xent against the formula written out, the exported weights load strictly into a
fresh classifier backbone (+ SA block), and :func:`load_simclr_weights` refuses what does not fit."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from lightly.loss import NTXentLoss

from crc_lightning.io.errors import InputError
from crc_lightning.models.attention import make_pool
from crc_lightning.models.backbone import WeightsNotFoundError, create_backbone
from crc_lightning.models.simclr import (
    SimCLRModule,
    export_simclr_weights,
    load_simclr_weights,
    patient_key,
    pool_overlap,
    pool_record,
    read_simclr_meta,
    simclr_weights_name,
)


def nt_xent_by_hand(z0: np.ndarray, z1: np.ndarray, t: float) -> float:
    """Chen et al. 2020, eq. 1: 2N views, positive = the other view, negatives = the 2N-2 others."""
    z = np.concatenate([z0, z1]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sims = np.array([z[i] @ z[k] / t for k in range(n2) if k != i])
        pos = z[i] @ z[j] / t
        total += -(pos - np.log(np.exp(sims).sum()))
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_ntxent_equals_the_formula(t):
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    got = float(NTXentLoss(temperature=t)(z0, z1))
    assert got == pytest.approx(nt_xent_by_hand(z0.numpy(), z1.numpy(), t), rel=1e-5)


def test_module_loss_is_ntxent_of_one_forward_over_both_views():
    torch.manual_seed(0)
    m = SimCLRModule(attention=False, hidden_dim=64, output_dim=16, temperature=0.2, res=32)
    m.eval()
    v0, v1 = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)
    z = m(torch.cat([v0, v1])).detach()
    expected = nt_xent_by_hand(z[:4].numpy(), z[4:].numpy(), 0.2)
    m.log = lambda *a, **k: None  # no trainer attached
    loss = m.training_step({"view0": v0, "view1": v1}, 0)
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert m.projection_head.layers[0].in_features == 1280  # sized to num_features


def _meta(res: int, attention: bool) -> dict:
    return {"res": res, "attention": attention, "backbone": "efficientnet_b0", "in_chans": 1}


@pytest.fixture(scope="module")
def sa_weights(tmp_path_factory) -> tuple[Path, SimCLRModule]:
    torch.manual_seed(1)
    m = SimCLRModule(attention=True, hidden_dim=32, output_dim=8, res=32)
    with torch.no_grad():  # make every tensor distinguishable from a fresh init
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for b in m.buffers():
            if b.is_floating_point():
                b.add_(0.5)
    path = tmp_path_factory.mktemp("w") / simclr_weights_name(32, True)
    export_simclr_weights(m, path, _meta(32, True))
    return path, m


def test_export_loads_strictly_into_a_fresh_backbone_and_pool(sa_weights):
    path, m = sa_weights
    assert path.name == "simclr_res32_sa.ckpt"
    raw = torch.load(path, weights_only=True)  # plain tensors + JSON-able metadata only
    assert raw["meta"]["res"] == 32
    bb_state, pool_state, meta = load_simclr_weights(path, 32, True, "efficientnet_b0")
    backbone, _ = create_backbone("efficientnet_b0", 1, "none")
    pool = make_pool(1280, True, 8)
    # strict=True raises on any missing or unexpected key: every tensor is matched
    r1 = backbone.load_state_dict(bb_state, strict=True)
    r2 = pool.load_state_dict(pool_state, strict=True)
    assert not r1.missing_keys and not r1.unexpected_keys
    assert not r2.missing_keys and not r2.unexpected_keys
    assert set(bb_state) == set(backbone.state_dict()) == set(m.backbone.state_dict())
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v), k
    for k, v in m.pool.state_dict().items():
        assert torch.equal(pool.state_dict()[k], v), k
    assert meta["attention"] is True


def test_plain_export_has_no_pool(tmp_path):
    m = SimCLRModule(attention=False, hidden_dim=32, output_dim=8, res=16)
    path = export_simclr_weights(m, tmp_path / "simclr_res16.ckpt", _meta(16, False))
    bb, pool, _ = load_simclr_weights(path, 16, False)
    assert pool is None and len(bb) == len(m.backbone.state_dict())


def test_export_records_the_pool_as_salted_hashes(tmp_path):
    """Membership is testable, the ids are not listed: hashes are sha256(salt + "<source>/<id>")
    (hashlib as the oracle), the salt is random per file, and a key of another source is not a
    member although its patient id is."""
    import hashlib

    m = SimCLRModule(attention=False, hidden_dim=32, output_dim=8, res=16)
    keys = [patient_key("lits", f"P{i:03d}") for i in range(5)]
    a = export_simclr_weights(m, tmp_path / "a.ckpt", _meta(16, False), pool_patients=keys)
    b = export_simclr_weights(m, tmp_path / "b.ckpt", _meta(16, False), pool_patients=keys)
    pool_a, pool_b = read_simclr_meta(a)["pool"], read_simclr_meta(b)["pool"]
    assert pool_a["salt"] != pool_b["salt"] and pool_a["patients"] != pool_b["patients"]
    want = sorted(hashlib.sha256((pool_a["salt"] + k).encode()).hexdigest() for k in keys)
    assert pool_a["patients"] == want and pool_a["n_patients"] == 5
    text = a.read_bytes()
    assert b"P001" not in text and b"lits/" not in text  # no id in clear anywhere in the file
    meta = read_simclr_meta(a)
    assert pool_overlap(meta, [patient_key("lits", "P001"), patient_key("lits", "P404")]) == 1
    assert pool_overlap(meta, [patient_key("crc", "P001")]) == 0  # same id, other cohort
    assert pool_overlap(_meta(16, False), keys) is None  # no pool record: cannot tell
    assert pool_record([], salt="ab") == {
        "scheme": pool_record([])["scheme"], "salt": "ab", "n_patients": 0, "patients": []
    }  # fmt: skip


def test_mismatches_are_refused_with_the_command(sa_weights):
    path, _ = sa_weights
    with pytest.raises(InputError, match=r"res=64.*python -m crc_lightning\.pretrain res=64"):
        load_simclr_weights(path, 64, True)
    with pytest.raises(InputError, match="attention block"):
        load_simclr_weights(path, 32, False)
    with pytest.raises(InputError, match="backbone is 'efficientnet_b0'"):
        load_simclr_weights(path, 32, True, "resnet18")


def test_missing_file_names_the_command(tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        load_simclr_weights(tmp_path / "simclr_res128_sa.ckpt", 128, True)
    assert "python -m crc_lightning.pretrain res=128 model.attention=true" in str(err.value)
    with pytest.raises(WeightsNotFoundError, match=r"pretrain res=64`"):
        load_simclr_weights(tmp_path / "nope.ckpt", 64, False)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("via", ["pickle", "torch.save"])
def test_crafted_pickle_is_refused_without_running(tmp_path, via):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "simclr_res32.ckpt"
    evil = {"format": "crc_lightning.simclr/1", "meta": _Payload(str(marker))}
    if via == "pickle":
        path.write_bytes(pickle.dumps(evil))
    else:
        torch.save(evil, path)
    with pytest.raises(InputError, match="refused"):
        load_simclr_weights(path, 32, False)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(str(marker))))  # the payload is real: it does write
    assert marker.exists()
