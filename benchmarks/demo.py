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
# make echoes each command: `<PY> -m crc_lightning.<app> …` at the start of a line (PY: the venv's
# python, here wrapped by this script's --child mode, which reports the command's CPU time)
_STAGE = re.compile(r"^\S*python\S*(?: \S+ --child)? -m crc_lightning\.(?P<app>\w+)(?P<rest>.*)")
_CPU = re.compile(r"^\[demo\.py\] cpu (?P<s>[\d.]+) s")
_JOB_DONE = re.compile(r"^\[job \d+\] .*\| \d+ s")  # a sweep job's summary line
_REPORT = re.compile(r"sweep report: ")  # logged once the sweep's report is written
TARGET_S = 300.0


def stage_name(app: str, rest: str) -> str:
    """``run variant=baseline …`` → ``run baseline``; other apps by their name."""
    m = re.search(r"variant=(\w+)", rest)
    return f"{app} {m[1]}" if app == "run" and m else app


def child(argv: list[str]) -> None:
    """``--child -m crc_lightning.<app> …``: run the app with this interpreter, then print the CPU
    seconds (user + system) it used: a load-independent measure of the stage's work."""
    import resource

    code = subprocess.call([sys.executable, *argv])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"[demo.py] cpu {usage.ru_utime + usage.ru_stime:.1f} s", flush=True)
    sys.exit(code)


def time_demo(
    root: Path, make_args: list[str]
) -> tuple[list[tuple[str, float]], dict[str, float], float, int]:
    """Run ``make demo`` with everything under ``root``: ((stage, wall seconds)…, {stage: CPU
    seconds}, total wall seconds, exit code)."""
    env = {**os.environ, "CRC_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    py = f"{ROOT / '.venv' / 'bin' / 'python'} {Path(__file__).resolve()} --child"
    cmd = ["make", "--no-print-directory", "demo", f"DEMO_DIR={root / 'demo'}", f"PY={py}",
           *make_args]  # fmt: skip
    t0 = time.monotonic()
    stages: list[tuple[str, float]] = []
    cpu: dict[str, float] = {}
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
            elif c := _CPU.search(line):
                app = next((n for n, _ in reversed(stages) if n != "report"), current)
                cpu[current if current != "report" else app] = float(c["s"])
            elif _JOB_DONE.search(line):
                last_job = now
            elif _REPORT.search(line) and current.startswith("run") and last_job > since:
                # the report ran between the sweep's last job and this line
                stages.append((current, last_job - since))
                current, since = "report", last_job
        code = proc.wait()
    end = time.monotonic()
    stages.append((current, end - since))
    return [(s, t) for s, t in stages if t >= 0.05], cpu, end - t0, code


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
        stages, cpu, total, code = time_demo(args.keep.resolve(), shlex.split(args.make_args))
    else:
        with tempfile.TemporaryDirectory(prefix="crc-demo-") as tmp:
            stages, cpu, total, code = time_demo(Path(tmp), shlex.split(args.make_args))
    load_after = os.getloadavg()
    print(f"\nmake demo: exit {code}; {os.cpu_count()} CPU(s); load average (1 min) "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")  # fmt: skip
    print(f"{'stage':<22} {'wall s':>8} {'share':>6} {'CPU s':>8}")
    for name, seconds in stages:
        used = (
            f"{cpu[name]:>8.1f}" if name in cpu else f"{'(above)' if name == 'report' else '':>8}"
        )
        print(f"{name:<22} {seconds:>8.1f} {seconds / total:>6.0%} {used}")
    print(f"{'total':<22} {total:>8.1f} {'':>6} {sum(cpu.values()):>8.1f}")
    print(f"wall-time target ≤ {TARGET_S:.0f} s: {'met' if total <= TARGET_S else 'NOT met'} here; "
          f"on 2 idle cores the wall time is between CPU/2 and CPU ({sum(cpu.values()) / 2:.0f}–"
          f"{sum(cpu.values()):.0f} s)")  # fmt: skip
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
