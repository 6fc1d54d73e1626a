"""Benchmark: how long does ``make demo`` take, stage by stage, from a fresh checkout's data?

Target (issue 15): ≤ 5 minutes of wall time on 2 CPU cores after the install, every stage shown
(preprocess, pretrain, the baseline and OODp runs, the report).

``make demo`` runs as a user would type it, with its data, weights and outputs in a fresh folder
(``CRC_ROOT``, so nothing from an earlier demo is reused, and ``DEMO_DIR`` inside it). Every line
it prints is read as it comes; a stage starts at the line where make echoes its command
(``… -m crc_lightning.<app> …``) and ends where the next one starts. The report is written by the
last run's sweep callback, so its time is split off at the callback's "sweep report" log line.
Also printed: the CPU count and the load average before and after — on a machine shared with
other work the figures are upper bounds; compare them with the same script on an idle machine.

    .venv/bin/python benchmarks/demo.py [--keep DIR] [--make-args "DEMO_EPOCHS=6 ..."]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# make echoes each command: `.venv/bin/python -m crc_lightning.<app> …` at the start of a line
_STAGE = re.compile(r"^\S*python\S* -m crc_lightning\.(?P<app>\w+)(?P<rest>.*)")
_JOB_DONE = re.compile(r"^\[job \d+\] .*\| \d+ s")  # a sweep job's summary line
_REPORT = re.compile(r"sweep report: ")  # logged once the sweep's report is written
TARGET_S = 300.0


def stage_name(app: str, rest: str) -> str:
    """``run variant=baseline …`` → ``run baseline``; other apps by their name."""
    m = re.search(r"variant=(\w+)", rest)
    return f"{app} {m[1]}" if app == "run" and m else app


def time_demo(root: Path, make_args: list[str]) -> tuple[list[tuple[str, float]], float, int]:
    """Run ``make demo`` with everything under ``root``; ((stage, seconds)…, total, exit code)."""
    env = {**os.environ, "CRC_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    cmd = ["make", "--no-print-directory", "demo", f"DEMO_DIR={root / 'demo'}", *make_args]
    t0 = time.monotonic()
    stages: list[tuple[str, float]] = []
    current, since, last_job = "make (install check)", t0, t0
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic()
            sys.stdout.write(f"[{now - t0:6.1f} s] {line}")
            m = _STAGE.search(line)
            if m:
                stages.append((current, now - since))
                current, since = stage_name(m["app"], m["rest"]), now
            elif _JOB_DONE.search(line):
                last_job = now
            elif _REPORT.search(line) and current.startswith("run") and last_job > since:
                # the report ran between the sweep's last job and this line
                stages.append((current, last_job - since))
                current, since = "report", last_job
        code = proc.wait()
    end = time.monotonic()
    stages.append((current, end - since))
    return [(s, t) for s, t in stages if t >= 0.05], end - t0, code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--keep", type=Path, help="run in this folder and keep it (default: a temp dir)"
    )
    ap.add_argument("--make-args", default="", help="extra make variables, e.g. 'DEMO_EPOCHS=6'")
    args = ap.parse_args()
    load_before = os.getloadavg()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        stages, total, code = time_demo(args.keep.resolve(), shlex.split(args.make_args))
    else:
        with tempfile.TemporaryDirectory(prefix="crc-demo-") as tmp:
            stages, total, code = time_demo(Path(tmp), shlex.split(args.make_args))
    load_after = os.getloadavg()
    print(f"\nmake demo: exit {code}; {os.cpu_count()} CPU(s); load average (1 min) "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")  # fmt: skip
    print(f"{'stage':<22} {'seconds':>8} {'share':>6}")
    for name, seconds in stages:
        print(f"{name:<22} {seconds:>8.1f} {seconds / total:>6.0%}")
    print(f"{'total':<22} {total:>8.1f}   target ≤ {TARGET_S:.0f} s: "
          f"{'met' if total <= TARGET_S else 'NOT met'}")  # fmt: skip
    sys.exit(code)


if __name__ == "__main__":
    main()
