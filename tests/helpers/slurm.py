"""A real single-node SLURM cluster on this machine, for the ``slurm`` tests.

Debian's ``slurm-wlm`` (slurmctld + slurmd), ``slurmdbd`` over a private MariaDB (so ``sacct``
answers from a real accounting database, as on a cluster — submitit itself polls ``sacct`` for job
states) and ``munge``, all started as root in the foreground from one private folder, on free
localhost ports, with a generated ``slurm.conf``: one node with the machine's cores and memory and
no GPU (``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``,
``SelectType=select/cons_tres``); ``JobCompType=jobcomp/filetxt`` also writes every job's final
state to a text file, a second record beside the database. Nothing of the system's own SLURM or
munge configuration is read or touched: every daemon and client gets ``SLURM_CONF`` and its own
munge socket.

Missing packages are installed with ``apt-get`` only when ``CRC_SLURM_INSTALL=1`` (``make
test-slurm`` / ``.ci/run`` set it) and the process runs as root; otherwise :func:`unavailable`
says why the tests skip.

``python -m tests.helpers.slurm install`` installs the packages; ``python -m tests.helpers.slurm
up`` starts a cluster and prints the ``SLURM_CONF`` to export (Ctrl-C stops it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PACKAGES", "LocalSlurm", "install_packages", "start_cluster", "unavailable"]

PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server")
# the executables the cluster needs, per package that provides them
EXECUTABLES = {
    "slurmctld": "slurm-wlm",
    "slurmd": "slurm-wlm",
    "sbatch": "slurm-wlm",
    "sacct": "slurm-wlm",
    "sacctmgr": "slurm-wlm",
    "slurmdbd": "slurmdbd",
    "munged": "munge",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
}
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
CLUSTER = "crc"
NODE = "crcnode"
DB_USER, DB_PASS = "slurm", "crc-test"
ACTIVE_STATES = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_executables() -> list[str]:
    return [name for name in EXECUTABLES if _which(name) is None]


def install_packages() -> None:
    """``apt-get update`` once, then ``apt-get install -y`` the packages that are missing."""
    packages = sorted({EXECUTABLES[n] for n in missing_executables()})
    if not packages:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )


def unavailable(install: bool | None = None) -> str | None:
    """Why a local SLURM cluster cannot be started here (None: it can). Installs the packages
    first when ``install`` (default: ``CRC_SLURM_INSTALL=1``) and this process is root."""
    if install is None:
        install = os.environ.get("CRC_SLURM_INSTALL") == "1"
    if sys.platform != "linux":
        return "a local SLURM cluster needs Linux"
    missing = missing_executables()
    if not missing:
        return None if os.geteuid() == 0 else "the SLURM daemons are started as root; not root"
    packages = " ".join(sorted({EXECUTABLES[n] for n in missing}))
    if not install:
        return (
            f"SLURM not installed ({', '.join(missing)} missing): `make test-slurm` installs "
            f"{packages} with apt-get when run as root"
        )
    if os.geteuid() != 0:
        return f"SLURM not installed and not root: cannot apt-get install {packages}"
    if _which("apt-get") is None:
        return f"SLURM not installed and no apt-get to install {packages}"
    try:
        install_packages()
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as err:
        return f"could not install {packages}: {err}"
    still = missing_executables()
    return f"after apt-get install, still missing: {', '.join(still)}" if still else None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


@dataclass
class LocalSlurm:
    """A running cluster: ``env`` (``SLURM_CONF``) is what every client command needs."""

    root: Path
    cpus: int
    memory_mb: int
    ports: dict[str, int]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def jobcomp(self) -> Path:
        return self.root / "jobcomp.txt"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def client(self, *cmd: str, timeout: float = 60, check: bool = True) -> str:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def sacct(self, *job_ids: str) -> list[dict[str, str]]:
        """``sacct -X`` rows (allocations, not steps) of ``job_ids`` (array ids expand) or all."""
        fields = "JobID,JobName,State,ExitCode,Elapsed"
        cmd = ["sacct", "-X", "-n", "-P", "-a", f"--format={fields}", "--starttime=2000-01-01"]
        if job_ids:
            cmd += ["-j", ",".join(job_ids)]
        keys = fields.split(",")
        out = self.client(*cmd)
        return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]

    def final_states(self, *job_ids: str, timeout: float = 60) -> dict[str, str]:
        """``{job id: state}`` from ``sacct`` once every job has a final state (slurmctld hands
        job ends to slurmdbd asynchronously, so a job that just ended may still read RUNNING)."""
        end = time.monotonic() + timeout
        while True:
            rows = {r["JobID"]: r["State"] for r in self.sacct(*job_ids)}
            pending = [j for j in job_ids if rows.get(j, "") in ("", *ACTIVE_STATES)]
            if not pending or time.monotonic() > end:
                return rows
            time.sleep(0.5)

    def sacct_text(self, *job_ids: str) -> str:
        """``sacct`` as a person reads it (for test reports)."""
        cmd = ["sacct", "-X", "-a", "--format=JobID%16,JobName%12,State,ExitCode,Elapsed"]
        return self.client(*cmd, "--starttime=2000-01-01", "-j", ",".join(job_ids))

    def jobcomp_states(self) -> dict[str, str]:
        """``{job id: final state}`` from the ``jobcomp/filetxt`` file (array jobs:
        ``<array id>_<task>``)."""
        out: dict[str, str] = {}
        if not self.jobcomp.is_file():
            return out
        for line in self.jobcomp.read_text().splitlines():
            kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
            job = kv.get("JobId", "")
            if kv.get("ArrayJobId") and kv.get("ArrayTaskId"):
                job = f"{kv['ArrayJobId']}_{kv['ArrayTaskId']}"
            out[job] = kv.get("JobState", "")
        return out

    def wait_idle(self, timeout: float = 120) -> None:
        """Until no job is queued or running."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.client("squeue", "-h", "-a").strip():
                return
            time.sleep(0.5)
        raise TimeoutError(f"jobs still queued after {timeout} s:\n{self.client('squeue', '-a')}")

    def logs(self) -> str:
        parts = []
        for name in ("munged", "mariadb", "slurmdbd", "slurmctld", "slurmd"):
            path = self.root / "log" / f"{name}.log"
            if path.is_file():
                parts.append(f"--- {name}.log\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is still queued, stop every daemon (reverse start order), remove the
        folder."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.client("scancel", "--full", "-u", "root", check=False, timeout=10)
                self.wait_idle(timeout=20)
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ start-up
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.root / "log" / f"{name}.out", "ab") as log:  # the daemon keeps its copy
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env or self.env,
                start_new_session=True,
            )  # fmt: skip

    def _wait(self, what: str, ok, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for "
                                       f"{what}\n{self.logs()}{self._out(name)}")  # fmt: skip
            with contextlib.suppress(Exception):
                if ok():
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{what} not ready after {timeout} s\n{self.logs()}")

    def _out(self, name: str) -> str:
        path = self.root / "log" / f"{name}.out"
        return f"\n--- {name}.out\n{path.read_text()[-2000:]}" if path.is_file() else ""

    def _write_configs(self) -> None:
        r, p = self.root, self.ports
        munge = f"AuthType=auth/munge\nAuthInfo=socket={r / 'munge' / 'munge.sock'}\n"
        dbd = self.conf.parent / "slurmdbd.conf"
        dbd.write_text(
            munge + f"DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={p['dbd']}\nSlurmUser=root\n"
            f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={p['mysql']}\nStorageUser={DB_USER}\nStoragePass={DB_PASS}\n"
            f"StorageLoc=slurm_acct_db\nLogFile={r / 'log' / 'slurmdbd.log'}\n"
            f"PidFile={r / 'run' / 'slurmdbd.pid'}\n"
        )
        dbd.chmod(0o600)  # slurmdbd refuses a readable one (it holds the DB password)
        self.conf.write_text(
            f"ClusterName={CLUSTER}\nSlurmctldHost={socket.gethostname()}(127.0.0.1)\n"
            + munge
            + f"CredType=cred/munge\nSlurmUser=root\nSlurmdUser=root\n"
            f"SlurmctldPort={p['ctld']}\nSlurmdPort={p['slurmd']}\n"
            f"StateSaveLocation={r / 'state'}\nSlurmdSpoolDir={r / 'spool'}\n"
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}\n"
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
            "SchedulerType=sched/builtin\nMpiDefault=none\nReturnToService=2\n"
            "JobAcctGatherType=jobacct_gather/none\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=localhost\nAccountingStoragePort={p['dbd']}\n"
            # the munge socket of connections to slurmdbd (AuthInfo covers the others)
            f"AccountingStoragePass={r / 'munge' / 'munge.sock'}\n"
            f"JobCompType=jobcomp/filetxt\nJobCompLoc={self.jobcomp}\n"
            "MailProg=/bin/true\nInactiveLimit=0\nKillWait=5\nMinJobAge=600\n"
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} "
            f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN\n"
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n"
        )

    def _start_munge(self) -> None:
        d = self.root / "munge"
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--key-file={key}",
            f"--socket={d / 'munge.sock'}", f"--pid-file={d / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={d / 'munged.seed'}",
        ])  # fmt: skip
        self._wait("munged", lambda: (d / "munge.sock").exists())

    def _start_mariadb(self) -> None:
        data, sock = self.root / "db", self.root / "run" / "mysql.sock"
        proc = subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
             "--skip-test-db", "--auth-root-authentication-method=socket"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{proc.stdout[-2000:]}{proc.stderr}")
        init = self.root / "etc" / "init.sql"
        init.write_text(
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}';\n"
            f"GRANT ALL ON slurm_acct_db.* TO '{DB_USER}'@'127.0.0.1';\n"
        )
        self._spawn("mariadb", [
            _which("mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={sock}",
            f"--port={self.ports['mysql']}", "--bind-address=127.0.0.1", "--user=root",
            f"--pid-file={self.root / 'run' / 'mariadb.pid'}", f"--init-file={init}",
            f"--log-error={self.root / 'log' / 'mariadb.log'}", "--skip-name-resolve",
            "--innodb-buffer-pool-size=64M", "--innodb-lock-wait-timeout=900",
        ])  # fmt: skip

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", self.ports["mysql"]), timeout=1):
                return True

        self._wait("mariadb", listening, timeout=120)

    def start(self) -> LocalSlurm:
        for sub in ("etc", "log", "run", "state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_configs()
        self._start_munge()
        self._start_mariadb()
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: self.client("sacctmgr", "-n", "list", "cluster") is not None)
        self.client("sacctmgr", "-i", "add", "cluster", CLUSTER)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        self._wait("slurmctld", lambda: self.client("scontrol", "ping").count("UP") > 0)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE])
        self._wait("slurmd", self._node_idle, timeout=90)
        return self

    def _node_idle(self) -> bool:
        state = self.client("sinfo", "-h", "-N", "-o", "%T", "-n", NODE).strip()
        if state.startswith(("down", "drain")):
            self.client("scontrol", "update", f"nodename={NODE}", "state=resume", check=False)
        return state.startswith("idle")


def start_cluster(root: str | Path | None = None, cpus: int | None = None) -> LocalSlurm:
    """Start munged, MariaDB, slurmdbd, slurmctld and slurmd (in that order) under ``root``."""
    path = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="crcslurm-"))
    mem = max(1024, _memory_mb() - 1024)
    cluster = LocalSlurm(path, int(cpus or os.cpu_count() or 1), mem, dict(zip(
        ("ctld", "slurmd", "dbd", "mysql"), _free_ports(4))))  # fmt: skip
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


def _main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        reason = unavailable(install=True)
        print(reason or "SLURM, slurmdbd, munge and MariaDB are installed")
        return 0 if reason is None else 1
    if argv[:1] == ["up"]:
        reason = unavailable()
        if reason:
            print(reason)
            return 1
        cluster = start_cluster()
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            cluster.stop()
        return 0
    print("usage: python -m tests.helpers.slurm install|up")
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
