"""A real multi-node Slurm cluster on one machine: each node a Linux network namespace with its own
address and hostname, its own ``slurmd``, and the filesystem shared as-is (like NFS on a real cluster).

Layout (``TAG`` = ``du<pid><n>``, unique per object, so that concurrent test sessions never meet)::

    root namespace: munged, slurmctld, the test's client commands (sbatch, scontrol)
        bridge TAGb  198.51.100.(B+1)/28     <- the controller's address
          |-- veth TAGh1 <-> TAGp1 in netns TAGn1: 198.51.100.(B+2), hostname TAGn1, slurmd
          |-- veth TAGh2 <-> TAGp2 in netns TAGn2: 198.51.100.(B+3), hostname TAGn2, slurmd
          ...

``B`` is the first block of 16 addresses in 198.51.100.0/24 (a documentation range, never routed)
that no interface of this host uses yet; traffic between the nodes stays on the bridge.

How a process runs on a node: :meth:`NetnsCluster.node_command` wraps a command line as ::

    nsenter --net=/run/netns/TAGn1 unshare --uts --mount \\
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh HOSTS TAGn1 CMD...

``nsenter`` enters the node's network namespace (not ``ip netns exec``, which mounts a fresh ``/sys``
without ``/sys/fs/cgroup``, where ``slurmd`` refuses to start), ``unshare --uts`` gives it its own hostname,
and ``--mount`` a private mount table in which the cluster's own hosts file (every node's name and
address, as DNS would give on a real cluster) is bind-mounted over ``/etc/hosts``; every other path
is the host's. Each step ``exec``s the next, so the process id started is the command's own. The
``slurmd`` started this way passes all of it on to what it starts: the batch script, ``srun`` steps,
``torchrun`` agents, Ray nodes all run "on" that node.

Shared as-is includes ``/tmp``, which is node-local on a real cluster: a Ray job's temp dir
(``/tmp/ray-JOBID``) is then one directory for both nodes, so each node's Ray log monitor also echoes
the other node's worker lines (the job log shows some lines twice, once without ``ip=``).

Clean-up is by handle: :meth:`NetnsCluster.stop` ends the daemons by pid, then any process still in
one of this object's namespaces (``ip netns pids``), deletes each namespace (which deletes its veth
pair) and the bridge by name, and removes the hosts file. A failed start calls it too. Only a test
process killed outright (SIGKILL) leaves them behind: ``ip netns list`` and ``ip link`` show them by
their ``du<pid>`` names.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and ``ip`` (iproute2); :func:`unavailable_reason` says
why the cluster cannot be made here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from slurm_cluster import Node, SlurmCluster

SUBNET = "198.51.100"
BLOCK = 16  # addresses per cluster: the bridge, then one per node
_serial = itertools.count(1)
_WRAP = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can): not root, no ``ip``/``unshare``, or
    the kernel refuses a network namespace. Probes with a namespace of its own and removes it."""
    missing = [name for name in ("ip", "unshare", "nsenter") if shutil.which(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed: apt-get install iproute2 util-linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    probe = f"du{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _used_addresses() -> set[str]:
    out = _ip("-o", "-4", "addr", "show").stdout
    return {field.split("/")[0] for line in out.splitlines() for field in line.split()[3:4]}


def _free_block(nodes: int) -> int:
    """The first offset in ``SUBNET`` whose ``BLOCK`` addresses no interface of this host holds (a /28:
    network address, the bridge, the nodes, broadcast)."""
    if nodes > BLOCK - 3:
        raise ValueError(f"at most {BLOCK - 3} nodes fit in a block of {BLOCK} addresses")
    used = _used_addresses()
    for base in range(0, 256, BLOCK):
        if not any(f"{SUBNET}.{base + i}" in used for i in range(BLOCK)):
            return base
    raise RuntimeError(f"no free block of {BLOCK} addresses left in {SUBNET}.0/24")


class NetnsCluster(SlurmCluster):
    """``nodes`` Slurm nodes, each in its own network namespace; start with :meth:`start`, stop with
    :meth:`stop`. :attr:`netns` maps a node name to its namespace's name (here the same)."""

    def __init__(self, root: Path, nodes: int = 2) -> None:
        self.tag = f"du{os.getpid()}{next(_serial)}"
        self.base = _free_block(nodes)
        bridge_addr = f"{SUBNET}.{self.base + 1}"
        members = [Node(f"{self.tag}n{i}", f"{SUBNET}.{self.base + 1 + i}") for i in range(1, nodes + 1)]
        super().__init__(root, members, controller_addr=bridge_addr)
        self.bridge = f"{self.tag}b"
        self.netns = {node.name: node.name for node in self.nodes}
        self.hosts = self.root / "hosts"
        self._made: list[tuple[str, str]] = []  # ("netns" | "link", name), in order of creation

    # --- the network ------------------------------------------------------------------------------
    def _make_network(self) -> None:
        self._made.append(("link", self.bridge))
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.controller_addr}/28", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, node in enumerate(self.nodes, 1):
            ns, host_end, node_end = self.netns[node.name], f"{self.tag}h{i}", f"{self.tag}p{i}"
            self._made.append(("netns", ns))
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{node.addr}/28", "dev", node_end)
            _ip("-n", ns, "link", "set", node_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost", f"{self.controller_addr} {self.host}"]
        lines += [f"{node.addr} {node.name}" for node in self.nodes]
        self.hosts.write_text("\n".join(lines) + "\n")

    def node_command(self, node: Node, argv: list[str]) -> list[str]:
        """``argv`` run in ``node``'s namespaces with its hostname and the cluster's hosts file."""
        wrap = ["sh", "-c", _WRAP, "sh", str(self.hosts), node.name]
        netns = f"--net=/run/netns/{self.netns[node.name]}"
        return ["nsenter", netns, "unshare", "--uts", "--mount", *wrap, *argv]

    def node_of(self, pid: int) -> str | None:
        """The name of the node whose network namespace process ``pid`` is in (None: not ours)."""
        try:
            inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        for name, ns in self.netns.items():
            if os.stat(f"/run/netns/{ns}").st_ino == inode:
                return name
        return None

    # --- start and stop ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> NetnsCluster:
        """Make the namespaces and the bridge, then start the daemons; on any failure remove what was made."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._make_network()
            self._write_hosts()
            super().start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the daemons (by pid), then whatever still runs in our namespaces, then remove the
        namespaces, links and hosts file this object made (by name, newest first)."""
        try:
            super().stop()
        finally:
            for kind, name in reversed(self._made):
                if kind == "netns":
                    self._end_processes_in(name)
                    _ip("netns", "del", name, check=False)
                else:
                    _ip("link", "del", name, check=False)
            self._made.clear()
            self.hosts.unlink(missing_ok=True)

    @staticmethod
    def _end_processes_in(ns: str, grace: float = 10.0) -> None:
        """TERM, then KILL, every process in network namespace ``ns`` (all of them started by us)."""

        def pids() -> list[int]:
            return [int(pid) for pid in _ip("netns", "pids", ns, check=False).stdout.split()]

        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while pids() and time.monotonic() < deadline:
                time.sleep(0.2)
