"""A real SLURM cluster on localhost, owned by the test session.

Installs Debian's `slurm-wlm` and `munge` when they are missing, then starts `munged`,
`slurmctld` and one `slurmd` per node, all on this host, with every file (key, config,
state, spool, logs, sockets) under one temporary folder, and stops each daemon it started
by PID. Nodes are named after host names that resolve to this machine (`localhost`, the
host name, its aliases), so that a job's node list is also a usable rendezvous address.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
KILL_WAIT_S = 30  # SIGTERM -> SIGKILL grace at cancel, requeue and time limit (SLURM's default)


class SlurmUnavailable(RuntimeError):
    """SLURM could not be installed or started here; the reason says why."""


def ensure_installed() -> None:
    if all(shutil.which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"{'/'.join(DAEMONS)} missing and apt-get is not usable here (needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(command)} failed: {result.stderr[-2000:]}")


def loopback_host_names() -> list[str]:
    """Distinct names that resolve to a loopback address, the host name first."""
    candidates = [socket.gethostname(), "localhost"]
    hosts = Path("/etc/hosts")
    if hosts.exists():
        for line in hosts.read_text().splitlines():
            fields = line.split("#")[0].split()
            candidates += fields[1:] if fields and fields[0].startswith("127.") else []
    names = []
    for name in candidates:
        try:
            loopback = socket.gethostbyname(name).startswith("127.")
        except OSError:
            loopback = False
        if loopback and name not in names and "." not in name:
            names.append(name)
    return names


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class LocalSlurmCluster:
    """`with LocalSlurmCluster(tmp, nodes=1) as cluster:` sets SLURM_CONF for this process
    and its children; `cluster.env` is the environment for subprocesses."""

    def __init__(self, root: Path, nodes: int = 1, cpus: int | None = None, memory_mb: int = 8000):
        self.root, self.node_count = Path(root), nodes
        self.cpus, self.memory_mb = cpus or os.cpu_count() or 1, memory_mb
        self.pids: dict[str, int] = {}
        self._previous_conf = None

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        names = loopback_host_names()
        if len(names) < self.node_count:
            raise SlurmUnavailable(f"{self.node_count} nodes need as many host names that resolve to this machine; "
                                   f"found {names}")
        self.nodes = names[: self.node_count]
        ctld_port, *node_ports = _free_ports(1 + self.node_count)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=vilbert-test",
            f"SlurmctldHost={self.nodes[0]}",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.root / 'munge.socket'}",
            "CredType=cred/munge",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            f"KillWait={KILL_WAIT_S}",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "SlurmctldTimeout=60",
            *(f"NodeName={name} NodeHostname={name} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
              f"RealMemory={self.memory_mb} State=UNKNOWN" for name, port in zip(self.nodes, node_ports)),
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, name: str, command: list[str], pid_file: Path) -> None:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{name} did not start: {result.stderr[-2000:]}")
        deadline = time.time() + 20
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.time() > deadline:
                raise SlurmUnavailable(f"{name} wrote no PID file {pid_file}")
            time.sleep(0.1)
        self.pids[name] = int(pid_file.read_text().split()[0])

    def start(self) -> LocalSlurmCluster:
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_config()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._start("munged", ["munged", "--force", f"--socket={self.root / 'munge.socket'}", f"--key-file={key}",
                               f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'log/munged.log'}",
                               f"--seed-file={self.root / 'munged.seed'}"], self.root / "munged.pid")
        self._start("slurmctld", ["slurmctld", "-f", str(self.conf)], self.root / "slurmctld.pid")
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            self._start(f"slurmd {node}", ["slurmd", "-f", str(self.conf), "-N", node],
                        self.root / f"slurmd-{node}.pid")
        self.wait_idle()
        self._previous_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        return self

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            result = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], env=self.env,
                                    capture_output=True, text=True)
            states = result.stdout + result.stderr
            if result.returncode == 0 and all(f"{node} idle" in states for node in self.nodes):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s: {states.strip()!r}; logs in {self.root}/log")

    def stop(self) -> None:
        for pid in reversed(list(self.pids.values())):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        if self._previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._previous_conf

    def __enter__(self) -> LocalSlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True
