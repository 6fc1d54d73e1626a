"""Benchmark: does SimCLR pretraining on the synthetic OOD pool give better frozen features?

Logistic regression (sklearn) on frozen pooled features (``backbone.forward_features`` → global
average pool) of the synthetic *target* cohort store, RAS-vs-rest (label set ``three``), split by
patient (``GroupShuffleSplit``), test AUC. Two encoders, same architecture: the SimCLR-pretrained
EfficientNet-B0 (``--pretrain-epochs`` on the synthetic OOD store, a different seed than the
target cohort) vs random init. Both stores are built once under ``--root``.

    .venv/bin/python benchmarks/linear_probe.py [--root /tmp/crc_probe] [--res 32] [--pretrain-epochs 100] [--repeats 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from crc_lightning.apps._hydra import CONF_DIR as CONF
from crc_lightning.apps.pretrain import ensure_synthetic_ood, pretrain
from crc_lightning.cropstore.reader import CropStore
from crc_lightning.data.augment import normalize
from crc_lightning.data.datamodule import load_images
from crc_lightning.models.backbone import create_backbone
from crc_lightning.models.simclr import load_simclr_weights


@torch.no_grad()
def features(backbone: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    backbone.eval()
    out = [
        backbone.forward_features(normalize(x, 0.449, 0.226)).mean((2, 3))
        for x in images.split(128)
    ]
    return torch.cat(out).numpy()


def probe_aucs(x: np.ndarray, y: np.ndarray, groups: np.ndarray, repeats: int) -> np.ndarray:
    """Test AUC on each of ``repeats`` patient-grouped 70/30 splits (the same splits for every
    encoder: ``random_state=0``), NaN where a test side holds one class only."""
    aucs = []
    for tr, te in GroupShuffleSplit(repeats, test_size=0.3, random_state=0).split(x, y, groups):
        if len(set(y[te])) < 2:
            aucs.append(np.nan)
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        clf.fit(x[tr], y[tr])
        aucs.append(roc_auc_score(y[te], clf.predict_proba(x[te])[:, 1]))
    return np.asarray(aucs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/crc_probe")
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20, help="patient-grouped probe splits")
    a = ap.parse_args()
    root = Path(a.root)
    target = root / "data" / "crops" / "synthetic"
    ensure_synthetic_ood(
        target, {"root": root / "data" / "raw" / "synthetic", "n_patients": 48, "seed": 2024}
    )
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "pretrain",
            overrides=[
                f"paths.root_dir={root}",
                f"paths.output_dir={root}/out",
                "logger=none",
                f"res={a.res}",
                f"epochs={a.pretrain_epochs}",
                f"batch_size={a.batch_size}",
                "model.warmup_epochs=2",
                "trainer.enable_progress_bar=false",
            ],
        )
    weights = Path(str(cfg.paths.weights_dir)) / f"simclr_res{a.res}.ckpt"
    if not weights.is_file():
        pretrain(cfg)
    store = CropStore(target)
    idx = store.index
    y = ((idx["KRAS"].astype(int) + idx["NRAS"].astype(int)) > 0).to_numpy().astype(int)
    groups = idx["patient_id"].astype(str).to_numpy()
    images = load_images(store, a.res, 400.0, 40.0)  # conf/input/default.yaml
    bb_state, _, meta = load_simclr_weights(weights, a.res, False, "efficientnet_b0")
    pre, _ = create_backbone("efficientnet_b0", 1, "none")
    pre.load_state_dict(bb_state, strict=True)
    torch.manual_seed(0)
    rnd, _ = create_backbone("efficientnet_b0", 1, "none")
    print(f"target: {len(idx)} crops, {len(set(groups))} patients, RAS prevalence {y.mean():.2f}")
    print(
        f"OOD pretraining: {meta['epochs']} epochs, {meta['ood']['n_crops']} crops, "
        f"final loss {meta['final_loss']:.3f}"
    )
    a_pre = probe_aucs(features(pre, images), y, groups, a.repeats)
    a_rnd = probe_aucs(features(rnd, images), y, groups, a.repeats)
    ok = ~(np.isnan(a_pre) | np.isnan(a_rnd))
    diff = a_pre[ok] - a_rnd[ok]
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    print(f"linear probe RAS-vs-rest test AUC over {ok.sum()} patient-grouped 70/30 splits:")
    print(f"  SimCLR-pretrained: {a_pre[ok].mean():.3f} ± {a_pre[ok].std(ddof=1):.3f} (sd)")
    print(f"  random init:       {a_rnd[ok].mean():.3f} ± {a_rnd[ok].std(ddof=1):.3f} (sd)")
    print(
        f"  paired difference: {diff.mean():+.3f}, 95 % CI [{diff.mean() - half:+.3f}, "
        f"{diff.mean() + half:+.3f}]; pretrained better on {(diff > 0).sum()}/{len(diff)} splits"
    )


if __name__ == "__main__":
    main()
