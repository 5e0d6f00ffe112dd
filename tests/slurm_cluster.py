"""A real Slurm cluster for tests: ``munged``, ``slurmctld`` and one ``slurmd`` per node from Debian's
``slurm-wlm`` and ``munge`` packages, configured and started inside a temporary directory.

By default this host is both the controller and the only node (CPUs = ``nproc``). The daemons run in
the foreground as children of the test process, with their own munge key and socket, state and spool
directories and free ports, so they never touch a system Slurm; :meth:`SlurmCluster.stop` ends them
by the process ids it started. Commands (``sbatch``, ``squeue``, ``scontrol``) find this cluster
through ``SLURM_CONF`` in :attr:`SlurmCluster.env`.

Several nodes: pass :class:`Node` s (name and address) and a controller address, and override
:meth:`SlurmCluster.node_command` to start each node's ``slurmd`` where that node lives
(:mod:`netns_cluster` runs each in its own network and UTS namespace). Every ``slurmd`` then has its
own spool directory, pid file and log (``%n`` in the config: the node's name).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")


@dataclass(frozen=True)
class Node:
    """A Slurm node: its name (what ``scontrol show hostnames`` prints) and the address slurmctld uses."""

    name: str
    addr: str


def missing_binaries() -> list[str]:
    """The Slurm/munge programs this helper needs that are not installed."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=search) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(1024, int(line.split()[1]) // 1024 - 1024)
    return 4096


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` is the environment for clients."""

    def __init__(self, root: Path, nodes: Sequence[Node] = (), controller_addr: str = "127.0.0.1") -> None:
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.nodes = list(nodes) or [Node(self.host, "127.0.0.1")]
        self.controller_addr = controller_addr
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        self.bin = {name: shutil.which(name, path=search) for name in DAEMONS}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- configuration ------------------------------------------------------------------------
    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        user = os.environ.get("USER") or "root"
        lines = {
            "ClusterName": "distunlearntest",
            "SlurmctldHost": f"{self.host}({self.controller_addr})",
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.socket}",
            "SlurmUser": user,
            "SlurmdUser": "root",
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool" / "%n",
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd-%n.pid",
            "SlurmctldLogFile": self.root / "log" / "slurmctld.log",
            "SlurmdLogFile": self.root / "log" / "slurmd-%n.log",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "MailProg": "/bin/true",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/backfill",
            "JobRequeue": 1,
            "ReturnToService": 2,
            "KillWait": 30,
            "MinJobAge": 3600,
            "InactiveLimit": 0,
        }
        text = "".join(f"{key}={value}\n" for key, value in lines.items())
        for node in self.nodes:
            text += (
                f"NodeName={node.name} NodeAddr={node.addr} CPUs={os.cpu_count() or 1} "
                f"RealMemory={_memory_mb()} State=UNKNOWN\n"
            )
            (self.root / "spool" / node.name).mkdir(parents=True, exist_ok=True, mode=0o755)
        names = ",".join(node.name for node in self.nodes)
        text += f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP\n"
        self.conf.write_text(text)

    # --- daemons ------------------------------------------------------------------------------
    def node_command(self, node: Node, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` on ``node`` (here: this host, as is). Whatever it wraps
        ``argv`` in must end by exec'ing it, so that the started process id is the daemon's own."""
        return argv

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.root / "log" / f"{name}.out").open("w") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        (self.root / f"{name}.test.pid").write_text(str(self.procs[name].pid))

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        """Write the config, start the three daemons and wait until the node is idle."""
        self._write_config()
        munge = self.root / "munge"
        self._spawn(
            "munged",
            [
                self.bin["munged"],
                "--foreground",
                "--force",
                f"--socket={self.socket}",
                f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        self._wait(lambda: self.socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", [self.bin["slurmctld"], "-D", "-f", str(self.conf)])
        for node in self.nodes:
            argv = [self.bin["slurmd"], "-D", "-f", str(self.conf), "-N", node.name]
            self._spawn(f"slurmd-{node.name}", self.node_command(node, argv))
        self._wait(self._node_idle, timeout, "the Slurm nodes did not become idle")
        return self

    def _node_idle(self) -> bool:
        """Every daemon alive (else raise with its log) and every node idle."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.daemon_log(name)}")
        result = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False)
        states = result.stdout.split()
        return result.returncode == 0 and states == ["idle"] * len(self.nodes)

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.daemon_log('slurmctld')}")
            time.sleep(0.5)

    def daemon_log(self, name: str, chars: int = 3000) -> str:
        """The tail of a daemon's own log file (``<name>.log``, else its captured output)."""
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.out"):
            if path.exists() and path.stat().st_size:
                return path.read_text(errors="replace")[-chars:]
        return ""

    def logs(self) -> str:
        """The tails of slurmctld's and every slurmd's log, for a failing test's message."""
        names = ["slurmctld", *(f"slurmd-{node.name}" for node in self.nodes)]
        return "\n".join(f"--- {name} ---\n{self.daemon_log(name)}" for name in names)

    def wait_until_requeued_job_may_start(self, job_id: str, timeout: float = 120.0) -> None:
        """Wait until a requeued job can be started again at once, which Slurm's two-minute hold on a
        requeued job otherwise guarantees: no step daemon of the previous run is left (they detach from
        ``slurmd`` as ``slurmstepd: [<job>.<step>]``, so they are found by that title, only watched,
        never signalled), the node is idle, and the second in which ``slurmd`` revoked the previous
        run's credential is over (a credential issued in that same second counts as revoked: the new
        run is killed as "Job credential revoked" before it starts)."""
        time.sleep(2.0)
        title = f"slurmstepd: [{job_id}."

        def gone() -> bool:
            for proc in psutil.process_iter(["cmdline"]):
                if title in " ".join(proc.info["cmdline"] or []):
                    return False
            return self._node_idle()

        self._wait(gone, timeout, f"job {job_id}'s step daemons did not end")

    def stop(self) -> None:
        """Stop the daemons this object started (by pid, newest first)."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    # --- client commands ----------------------------------------------------------------------
    def run(self, args: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        env = {**self.env, **kwargs.pop("env", {})}
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout.strip()
        fields: dict[str, str] = {}
        for item in out.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of ``states``; returns its fields."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info.get("JobState") not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")
            time.sleep(1)
            info = self.job(job_id)
        return info
