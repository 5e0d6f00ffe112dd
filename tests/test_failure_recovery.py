"""Failure recovery on real processes: a Ray worker killed with SIGKILL mid-run, and a process killed
by the kernel in the middle of writing a checkpoint.

- Ray: ``failure.max_failures=1``; once the first checkpoint exists the test SIGKILLs one Ray Train
  worker process. Ray restarts the worker group, which resumes from the last reported checkpoint;
  the final weights equal those of the uninterrupted :mod:`reference_run`.
- Checkpoint write: ``RLIMIT_FSIZE`` makes the kernel kill the writer (``SIGXFSZ``) half-way through
  the second checkpoint; the first stays complete and loads into a fresh engine with the same
  weights, and the next save replaces the half-written ``.tmp`` directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import BIN, REPO, write_config
from reference_run import EVERY, STEPS, logged_steps, max_diff, recovery_config, reference_run, weights

__all__ = ["reference_run"]  # a fixture


def _ray_workers(root_pid: int) -> list[psutil.Process]:
    """Ray Train worker processes started (indirectly) by the process ``root_pid``."""
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.Error:
            continue
    return sorted(found, key=lambda p: p.pid)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_ray_worker_is_restarted_and_the_run_matches_an_uninterrupted_one(tmp_path, small_target, reference_run):
    cfg = recovery_config(tmp_path / "killed", small_target, failure={"max_failures": 1})
    config = write_config(tmp_path / "killed" / "run.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "dist-unlearn"), "run", str(config)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run_dir = tmp_path / "killed" / "grad_diff"
    try:
        first = run_dir / "checkpoints" / f"step_{EVERY:06d}"
        _wait_for(first.is_dir, 600, "the first checkpoint", proc, log)
        workers = _ray_workers(proc.pid)
        assert len(workers) == 2, workers
        victim = workers[-1]
        victim.send_signal(signal.SIGKILL)
        killed_at = logged_steps(run_dir)[-1]
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-6000:]
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    assert EVERY <= killed_at < STEPS, f"the kill came at step {killed_at}, not mid-run"
    resumed = sorted({int(m) for m in re.findall(r"\[grad_diff\] resumed from \S+ at step (\d+)", output)})
    assert len(resumed) == 1 and EVERY <= resumed[0] <= killed_at, (resumed, killed_at, output[-4000:])
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    diff = max_diff(weights(run_dir), weights(reference_run / "grad_diff"))
    print(f"killed worker pid {victim.pid} at step {killed_at}, resumed at step {resumed[0]}, max |dw| = {diff:.3g}")
    assert diff < 1e-6


def _child(mode: str, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = Path(__file__).with_name("checkpoint_child.py")
    return subprocess.run(
        [sys.executable, str(script), mode, str(root)], env=env, capture_output=True, text=True, timeout=600
    )


def test_crash_during_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    from dist_unlearn.engine.checkpoint import latest_checkpoint, list_checkpoints

    crashed = _child("crash", tmp_path)
    assert crashed.returncode == -signal.SIGXFSZ, (crashed.returncode, crashed.stdout[-2000:], crashed.stderr[-4000:])
    root = tmp_path / "checkpoints"
    limit = json.loads((tmp_path / "limit.json").read_text())
    partial = root / "step_000002.tmp"
    sizes = [p.stat().st_size for p in partial.rglob("*") if p.is_file()]
    assert max(sizes) == limit["limit"] < limit["largest_file"], "the crash did not cut a file short"
    assert not (root / "step_000002").exists()
    assert [p.name for p in list_checkpoints(root)] == ["step_000001"]
    assert latest_checkpoint(root).name == "step_000001"

    loaded = _child("load", tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert json.loads((tmp_path / "loaded.json").read_text()) == {"latest": "step_000001", "step": 1}
    before, after = torch.load(tmp_path / "weights_step1.pt"), torch.load(tmp_path / "weights_loaded.pt")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the next save replaced the half-written directory
    assert [p.name for p in list_checkpoints(root)] == ["step_000001", "step_000002"]
    assert not partial.exists()
