"""Peak-memory probes and a runner that measures one configuration in a fresh Python process.

On the CPU the probe reads the kernel's resident-set figures from ``/proc/self/status``: ``VmRSS`` (now)
and ``VmHWM`` (the high-water mark). Before the measured work it resets the high-water mark (writing ``5``
to ``/proc/self/clear_refs``, Linux >= 4.0) so that a transient peak while loading the model does not hide
the step's own peak; where that is not allowed it falls back to the high-water mark so far (the reported
increase is then a lower bound, and ``hwm_reset`` says so). Without ``/proc`` it uses
``resource.getrusage(RUSAGE_SELF).ru_maxrss``. On CUDA it reports ``torch.cuda.max_memory_allocated``
above the memory allocated at the start.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_STATUS = "/proc/self/status"
_MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status``; None without ``/proc``."""
    try:
        with open(_STATUS) as handle:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_mib() -> float:
    """Resident set size now, MiB (the peak so far where ``/proc`` is missing)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else peak_rss_mib()


def peak_rss_mib() -> float:
    """High-water resident set size of this process, MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS; True if the kernel allowed it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


@dataclass
class PeakProbe:
    """Peak memory of a block of work above the memory in use when :meth:`start` was called.

    ``device="cpu"``: resident set size (MiB). ``device="cuda"``: ``torch.cuda.max_memory_allocated``.
    """

    device: str = "cpu"
    baseline_mib: float = 0.0
    hwm_reset: bool = False

    def start(self) -> None:
        """Record the baseline (and reset the high-water mark) just before the measured work."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mib = torch.cuda.memory_allocated() / _MIB
            self.hwm_reset = True
            return
        self.hwm_reset = reset_peak_rss()
        self.baseline_mib = rss_mib() if self.hwm_reset else peak_rss_mib()

    def peak_increase_mib(self) -> float:
        """Peak memory since :meth:`start` minus the baseline, MiB."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / _MIB - self.baseline_mib
        return peak_rss_mib() - self.baseline_mib

    def report(self) -> dict[str, Any]:
        """``{"peak_increase_mib", "baseline_mib", "metric", "hwm_reset"}`` for the JSON output."""
        metric = "cuda.max_memory_allocated" if self.device == "cuda" else "rss(VmHWM)"
        return {
            "peak_increase_mib": round(self.peak_increase_mib(), 1),
            "baseline_mib": round(self.baseline_mib, 1),
            "metric": metric,
            "hwm_reset": self.hwm_reset,
        }


def run_worker(spec: dict[str, Any], timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure one configuration in a fresh interpreter (``python -m dist_unlearn.bench.worker SPEC``),
    with ``env`` added to its environment (e.g. ``MALLOC_MMAP_THRESHOLD_``, see :func:`malloc_env`).

    Returns the worker's JSON result, or ``{"error": ...}`` when it fails, runs out of memory or time.
    """
    cmd = [sys.executable, "-m", "dist_unlearn.bench.worker", json.dumps(spec)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {}))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def run_ranks(spec: dict[str, Any], world_size: int, timeout_s: float, env: dict[str, str] | None = None) -> list:
    """:func:`run_worker` on ``world_size`` fresh interpreters at once, ranks of one process group (``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in their environments; the worker joins
    the group). Their output goes to files, so that no rank blocks on a full pipe while the others wait
    for it in a collective. Returns each rank's JSON result (or ``{"error": ...}``), by rank."""
    import socket
    import tempfile
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "dist_unlearn.bench.worker", json.dumps(spec)]
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        procs, logs = [], []
        for rank in range(world_size):
            rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)}
            rank_env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            full_env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {}), **rank_env)
            out, err = open(f"{tmp}/{rank}.out", "w"), open(f"{tmp}/{rank}.err", "w")  # noqa: SIM115
            logs.append((out, err))
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=full_env))
        deadline = time.monotonic() + timeout_s
        try:
            for proc in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
                proc.wait()
            return [{"error": f"timed out after {timeout_s:.0f} s"} for _ in procs]
        finally:
            for out, err in logs:
                out.close()
                err.close()
        results: list[dict[str, Any]] = []
        for rank, proc in enumerate(procs):
            stdout, stderr = (Path(tmp, f"{rank}.{kind}").read_text() for kind in ("out", "err"))
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (stderr or stdout).strip().splitlines()[-3:]
                results.append({"error": f"rank {rank} exit {proc.returncode}: {' | '.join(tail)}"})
            else:
                results.append(json.loads(lines[-1]))
    return results


def malloc_env(mmap_threshold: int) -> dict[str, str]:
    """Environment fixing glibc's mmap threshold at ``mmap_threshold`` bytes (0: leave glibc's default).

    By default glibc raises the threshold dynamically (up to 32 MiB) after large blocks are freed, so
    later blocks of a few MiB come from the heap and freed ones often stay resident: the RSS then
    counts memory that the process freed long ago (seen for the chunked LM loss, whose chunks are
    allocated and freed many times). A fixed threshold returns every large block to the OS on free,
    so the RSS peak follows the memory actually live, as ``torch.cuda.max_memory_allocated`` does on GPU.
    """
    return {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold > 0 else {}
