"""The report: golden tables from hand-made run results, figures, and the Hydra app."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from crc_lightning.evaluation import figures
from crc_lightning.evaluation.report import (
    find_job_dirs,
    focus_for,
    load_job,
    make_report,
    report_from_jobs,
    results_frame,
    summarize,
)
from crc_lightning.io.errors import InputError
from tests.helpers.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {
    "three": ["RAS", "PIK3CA_BRAF", "OTHER"],
    "five": ["KRAS", "NRAS", "BRAF", "PIK3CA", "OTHER"],
}
# hand values of the focus class at lesion level, per variant, seeds 0..2 (three-class set)
F1 = {"baseline": [0.7, 0.8, 0.9], "oodp_sa": [0.80, 0.82, 0.84]}
AUC = {"baseline": [0.55, 0.60, 0.50], "oodp_sa": [0.70, 0.75, 0.80]}
N_LESIONS, RAS_POS = 10, (4, 3, 5)  # pooled lesion-level RAS prevalence = 12 / 30 = 0.4
PATIENTS = ["p1", "p2", "p3", "p4"]  # test patients; lesions: p1 x2, p2 x1, p3 x2, p4 x1


def _level(classes, focus, f1, auc, n, pos, weights_none=False):
    per = {}
    for c in classes:
        sup = pos if c == focus else n // 3
        per[c] = {
            "f1": f1 if c == focus else 0.3,
            "auc": auc if c == focus else 0.5,
            "sensitivity": 0.5 + f1 / 4,
            "specificity": 0.9 - f1 / 4,
            "support": sup,
            "prevalence": sup / n,
        }
    return {"auc": auc, "f1_macro": f1 / 2, "hamming": 0.4 - f1 / 10, "n": n, "per_class": per}


def write_job(
    root: Path, variant: str, labels: str, seed: int, res: int = 64, init: str = "imagenet"
):
    """One job folder as crc_lightning.run writes it (metrics.json, predictions.csv, .hydra/)."""
    d = root / f"{seed}_variant={variant},labels={labels},res={res},seed={seed}"
    (d / ".hydra").mkdir(parents=True)
    classes = CLASSES[labels]
    focus = focus_for(classes)
    f1 = F1.get(variant, F1["baseline"])[seed]
    auc = AUC.get(variant, AUC["baseline"])[seed]
    metrics = {
        lv: _level(classes, focus, f1, auc, n, pos)
        for lv, n, pos in (
            ("image", 40, 16),
            ("lesion", N_LESIONS, RAS_POS[seed]),
            ("patient", 4, 2),
        )
    }
    m = {
        "variant": variant,
        "res": res,
        "seed": seed,
        "labels": labels,
        "classes": classes,
        "split": {"mode": "holdout", "fold": 0},
        "weights": {"init": init, "file": None},
        "data": {"name": "synthetic"},
        "best_epoch": 1,
        "val": {"loss": 0.6, "auc": 0.5},
        "metrics": metrics,
    }
    (d / "metrics.json").write_text(json.dumps(m))
    rng = np.random.default_rng(seed + 10 * len(variant))
    rows = []
    lesions = [("p1", 1), ("p1", 2), ("p2", 1), ("p3", 1), ("p3", 2), ("p4", 1)]
    truth = {"p1": 0, "p2": 1, "p3": 2, "p4": 1}  # index of the one positive class
    for pid, les in lesions:
        for sl in range(2):
            y = [int(i == truth[pid] % len(classes)) for i in range(len(classes))]
            p = list(np.clip(np.array(y) * 0.3 + rng.random(len(classes)) * 0.7, 0, 1))
            rows.append(
                {
                    "patient_id": pid,
                    "lesion": les,
                    "crop_id": f"{pid}/{les}/{sl}",
                    "slice": sl,
                    **dict(zip(classes, y, strict=True)),
                    **{f"p_{c}": v for c, v in zip(classes, p, strict=True)},
                }
            )
    pd.DataFrame(rows).to_csv(d / "predictions.csv", index=False)
    (d / ".hydra" / "config.yaml").write_text(f"logger: {{}}\nseed: {seed}\n")
    return d


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multiruns" / "2026-01-01"
    for variant in ("baseline", "oodp_sa"):
        for labels in ("three", "five"):
            for seed in range(3):
                write_job(
                    root, variant, labels, seed, init="none" if variant == "baseline" else "simclr"
                )
    return root


def _row(summary, variant, metric, level="lesion", labels="three"):
    s = summary[
        (summary.variant == variant)
        & (summary.metric == metric)
        & (summary.level == level)
        & (summary.labels == labels)
    ]
    assert len(s) == 1
    return s.iloc[0]


def test_golden_tables(sweep: Path):
    jobs = [load_job(d) for d in find_job_dirs(sweep)]
    assert len(jobs) == 12
    summary = summarize(results_frame(jobs), ci=0.95)
    p = sum(RAS_POS) / (3 * N_LESIONS)
    t975 = sps.t.ppf(0.975, 2)
    for variant, dagger in (("baseline", True), ("oodp_sa", False)):
        r = _row(summary, variant, "f1")
        x = F1[variant]
        assert r["n"] == 3 and r["focus"] == "RAS"
        assert r["mean"] == pytest.approx(sum(x) / 3)
        sd = math.sqrt(sum((v - sum(x) / 3) ** 2 for v in x) / 2)
        assert r["ci_half"] == pytest.approx(t975 * sd / math.sqrt(3))
        assert r["prevalence"] == pytest.approx(0.4)
        assert r["baseline"] == pytest.approx(2 * p / (1 + p))  # always-positive F1 = 0.5714
        assert bool(r["dagger"]) is dagger
    # AUC: baseline's CI straddles 0.5 (†), oodp_sa's clears it
    assert (
        bool(_row(summary, "baseline", "auc")["dagger"])
        and not _row(summary, "oodp_sa", "auc")["dagger"]
    )
    assert _row(summary, "oodp_sa", "sensitivity")["baseline"] == pytest.approx(p)
    assert _row(summary, "oodp_sa", "specificity")["baseline"] == pytest.approx(1 - p)
    # Hamming baseline: mean over classes of 2 q (1 - q); classes RAS (pooled 0.4) and two at 3/10
    qs = [0.4, 0.3, 0.3]
    assert _row(summary, "oodp_sa", "hamming")["baseline"] == pytest.approx(
        np.mean([2 * q * (1 - q) for q in qs])
    )
    # five-class set: RAS is read as KRAS
    assert _row(summary, "oodp_sa", "f1", labels="five")["focus"] == "KRAS"


def test_report_files_and_markdown(sweep: Path, tmp_path: Path):
    out = tmp_path / "rep"
    path = report_from_jobs(find_job_dirs(sweep), out, permutations=100)
    md = path.read_text()
    for name in (
        "table3_auc_f1",
        "table4_spec_sens",
        "table_classes",
        "table_hamming",
        "permutation_tests",
        "paired_tests",
    ):
        assert (out / f"{name}.csv").is_file(), name
    t3 = pd.read_csv(out / "table3_auc_f1.csv")
    assert set(t3["metric"]) == {"auc", "f1"}
    assert "†" in md and "Random-init backbones" in md and "| none |" in md.replace("  ", " ")
    x = F1["oodp_sa"]
    half = sps.t.ppf(0.975, 2) * np.std(x, ddof=1) / math.sqrt(3)
    assert f"{np.mean(x):.2f} ± {half:.2f} (n=3; base 0.57)" in md
    assert "p1" not in md  # no patient ids in the report
    # paired test equals scipy on the hand values
    pt = pd.read_csv(out / "paired_tests.csv")
    r = pt[(pt.labels == "three") & (pt.level == "lesion") & (pt.metric == "f1")].iloc[0]
    want = sps.ttest_rel(F1[r.variant_a], F1[r.variant_b])
    assert r.p_ttest == pytest.approx(want.pvalue) and r.t == pytest.approx(want.statistic)
    assert pd.isna(r.p_wilcoxon)  # n = 3 < 5
    # permutation: 4 patients, pooled over 3 seeds; three-class RAS positive = p1 → C(4,1) = 4;
    # oracle: lesion means by pandas, every patient permutation scored by sklearn
    perm = pd.read_csv(out / "permutation_tests.csv")
    r = perm[(perm.labels == "three") & (perm.variant == "oodp_sa")].iloc[0]
    assert (r.n_patients, r.n_lesions, r.method, r.n_permutations) == (4, 18, "exact", 4)
    pooled = pd.concat(
        pd.read_csv(d / "predictions.csv")
        .groupby(["patient_id", "lesion"])["p_RAS"]
        .mean()
        .reset_index()
        for d in sorted(sweep.glob("*oodp_sa,labels=three*"))
    )
    truth = {"p1": 1, "p2": 0, "p3": 0, "p4": 0}
    obs = roc_auc_score(pooled.patient_id.map(truth), pooled.p_RAS)
    hits = [
        roc_auc_score(
            pooled.patient_id.map(dict(zip(PATIENTS, [truth[q] for q in perm_]))), pooled.p_RAS
        )
        >= obs - 1e-12
        for perm_ in itertools.permutations(PATIENTS)
    ]
    assert r.auc_pooled == pytest.approx(obs) and r.p_value == pytest.approx(np.mean(hits))
    # figures: exist, > 5 kB, referenced
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {
        "fig3_f1_auc_res64.png",
        "fig4_auc_three.png",
        "fig5_hamming_five.png",
        "fig1_cooccurrence_three.png",
        "roc_three.png",
    }
    for p in pngs:
        assert p.stat().st_size > 5000, p
        assert f"]({p.name})" in md
        Image.open(p).verify()


def test_bar_counts(sweep: Path, tmp_path: Path):
    jobs = [load_job(d) for d in find_job_dirs(sweep)]
    summary = summarize(results_frame(jobs))
    s = summary[summary.level == "lesion"]
    import matplotlib.pyplot as plt

    captured = {}
    orig = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig)  # keep the figure to inspect
    try:
        figures.bar_chart(s, ["f1", "auc"], "variant", "labels", tmp_path / "f.png", "t")
    finally:
        plt.close = orig
    fig = captured["fig"]
    axes = fig.axes
    assert len(axes) == 2
    for ax in axes:  # 2 variants × 2 label sets
        assert len(ax.patches) == 4
    heights = sorted(round(p.get_height(), 6) for p in axes[0].patches)
    want = sorted(round(v, 6) for v in s[s.metric == "f1"]["mean"])
    assert heights == want
    plt.close(fig)


def test_bad_input(tmp_path: Path):
    with pytest.raises(InputError, match=r"no metrics\.json"):
        find_job_dirs(tmp_path)
    with pytest.raises(InputError, match="no such sweep"):
        find_job_dirs(tmp_path / "missing*")
    d = tmp_path / "job"
    d.mkdir()
    (d / "metrics.json").write_text("{not json")
    with pytest.raises(InputError, match=r"metrics\.json"):
        load_job(d)
    (d / "metrics.json").write_text(json.dumps({"variant": "x"}))
    with pytest.raises(InputError, match="missing keys"):
        load_job(d)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_app_compose_writes_only_into_sweep(sweep: Path, tmp_path: Path, monkeypatch):
    from crc_lightning.apps.report import report

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _files(tmp_path)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "report",
            overrides=[f"sweep={sweep}", "permutations=50", "wandb=false"],
            return_hydra_config=True,
        )
    assert cfg.hydra.output_subdir is None
    path = report(cfg)
    assert path == sweep / "report.md" and path.is_file()
    new = _files(tmp_path) - before
    assert new and all(sweep in p.parents for p in new)
    assert (sweep / "table3_auc_f1.csv").is_file() and not any(cwd.iterdir())


def test_cli_glob_no_stray_folders(sweep: Path, tmp_path: Path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "crc_lightning.report",
            f"sweep={sweep.parent}/2026-*",
            "permutations=20",
            "levels=[lesion]",
        ],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(sweep / "report.md")
    assert not any(cwd.iterdir())
    assert not (sweep / ".hydra").exists()
    md = (sweep / "report.md").read_text()
    assert "level=lesion" in md and "level=image" not in md


def test_make_report_out_dir(sweep: Path, tmp_path: Path):
    out = tmp_path / "elsewhere"
    path = make_report(sweep, out_dir=out, permutations=10, levels=["patient"])
    assert path == out / "report.md" and not (sweep / "report.md").exists()
