"""A ``dist-unlearn run`` that is stopped (SIGTERM) leaves none of its processes behind:
not its Ray workers, and not the GCS, raylet or agents of the local Ray cluster it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import pytest
from conftest import BIN, REPO, small_run_config, write_config

pytestmark = pytest.mark.slow

SESSION = re.compile(r"/[^\s=]*/session_[0-9][^/\s]*")


def _session_of(proc: psutil.Process) -> str | None:
    """The Ray session directory (``.../session_<date>_<pid>``) named on a descendant's command line."""
    for child in proc.children(recursive=True):
        try:
            match = SESSION.search(" ".join(child.cmdline()))
        except psutil.Error:
            continue
        if match:
            return match.group(0)
    return None


def _command_line(proc: psutil.Process) -> str:
    """The process's command line, or "" once it has exited or is a zombie (children come and go)."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _naming(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def test_a_run_stopped_with_sigterm_leaves_no_process_behind(tmp_path, small_target) -> None:
    sig = signal.SIGTERM  # SIGINT ends in the same clean-up (ray/trainer.disconnect), through KeyboardInterrupt
    out = tmp_path / "out"
    cfg = small_run_config(out, small_target, train={"steps": 400}, checkpoint={"every_steps": 0})
    config = write_config(tmp_path / "run.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = subprocess.Popen(
        [str(BIN / "dist-unlearn"), "run", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc = psutil.Process(cli.pid)
    try:
        deadline = time.monotonic() + 240
        started: list[psutil.Process] = []
        while time.monotonic() < deadline:  # until both Ray Train workers are up
            started = proc.children(recursive=True)
            if sum("RayTrainWorker" in _command_line(p) for p in started) >= 2:
                break
            assert cli.poll() is None, cli.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("the Ray workers did not start within 240 s")
        time.sleep(5)  # let the workers get into the training loop
        session = _session_of(proc)
        assert session, "no Ray session directory found on the command lines of the run's processes"
        started = proc.children(recursive=True) + _naming(session)
        assert len({p.pid for p in started}) >= 4  # at least GCS, raylet and two workers
        cli.send_signal(sig)
        output, _ = cli.communicate(timeout=240)
        assert cli.returncode == 75, output[-3000:]  # a stop request: checkpoint, exit 75, resumable
        time.sleep(1)
        left = [p for p in {p.pid: p for p in started}.values() if p.is_running() and p.status() != "zombie"]
        assert not left, [" ".join(p.cmdline())[:150] for p in left]
        assert not [p for p in _naming(session) if p.status() != "zombie"]
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for p in proc.children(recursive=True) if proc.is_running() else []:
            p.kill()
