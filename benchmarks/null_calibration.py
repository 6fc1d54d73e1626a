"""Benchmark: how often a no-signal cross-validated AUC "beats chance" under each CI the report
could use.

A sweep = R repeats of a k-fold CV on N patients whose labels carry no signal. The score of
patient i in repeat r is ``a_i + e_ir + f_{r,fold}``: ``a_i`` ~ N(0, τ²) is what a model sees in a
patient whatever it was trained on (τ = 0: repeats independent; large τ: repeats nearly
identical, as when models of overlapping training sets agree on the same images), ``e_ir`` the
training noise, ``f`` a per-fold offset (each fold's model calibrates differently). Each sweep's
cell = mean over repeats of the pooled out-of-fold AUC, and it "beats chance" when the lower end
of its 95 % CI is above 0.5. Three CIs, all :func:`crc_lightning.evaluation.stats.corrected_t`
(or its plain version):

* ``t over repeats``: Student t over the R pooled values (ratio 0);
* ``corrected t over repeats``: Nadeau–Bengio with ratio 1/(k−1), over the R pooled values;
* ``corrected t over splits``: Nadeau–Bengio with ratio 1/(k−1), over the k·R fold values (what the
  report uses), centred on the same mean.

A valid one-sided claim rate is ≤ 2.5 % (the report's nominal limit is 5 %).

    .venv/bin/python benchmarks/null_calibration.py [--sims 2000] [--patients 50] [--k 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats as sps

from crc_lightning.evaluation.stats import corrected_t


def auc(y: np.ndarray, s: np.ndarray) -> float:
    r = sps.rankdata(s)
    n1 = int(y.sum())
    n0 = y.size - n1
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def sweep(rng: np.random.Generator, n: int, k: int, repeats: int, tau: float) -> dict[str, bool]:
    y = (rng.random(n) < 0.45).astype(int)
    y[:3], y[3:6] = 1, 0  # both classes present
    a = rng.normal(0.0, tau, n)
    pooled, folds = [], []
    for _ in range(repeats):
        fold = np.empty(n, int)
        fold[rng.permutation(n)] = np.arange(n) % k
        s = a + rng.normal(0.0, 1.0, n) + rng.normal(0.0, 0.5, k)[fold]
        pooled.append(auc(y, s))
        for f in range(k):
            m = fold == f
            if 0 < y[m].sum() < m.sum():
                folds.append(auc(y[m], s[m]))
    center = float(np.mean(pooled))
    ratio = 1.0 / (k - 1)
    out = {}
    for name, values, rho in (
        ("t over repeats", pooled, 0.0),
        ("corrected t over repeats", pooled, ratio),
        ("corrected t over splits", folds, ratio),
    ):
        iv = corrected_t(values, rho, 0.95, center)
        out[name] = iv.low is not None and iv.low > 0.5 + 1e-9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sims", type=int, default=2000)
    ap.add_argument("--patients", type=int, default=50)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(
        f"{args.sims} no-signal sweeps per τ: {args.patients} patients, k={args.k}, "
        f"{args.repeats} repeats; share of sweeps whose AUC CI clears 0.5"
    )
    started = time.perf_counter()
    for tau in args.taus:
        hits: dict[str, int] = {}
        for _ in range(args.sims):
            for name, won in sweep(rng, args.patients, args.k, args.repeats, tau).items():
                hits[name] = hits.get(name, 0) + int(won)
        line = ", ".join(f"{name} {100 * v / args.sims:.1f} %" for name, v in hits.items())
        print(f"τ={tau:g}: {line}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
