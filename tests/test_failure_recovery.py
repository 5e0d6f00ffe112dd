"""Failure recovery on real processes: a Ray worker killed with SIGKILL mid-run (then the whole run stopped
with SIGTERM and resumed), and a process killed by the kernel in the middle of writing a checkpoint.

- Ray: ``failure.max_failures=1``; once the first checkpoint exists the test SIGKILLs one Ray Train
  worker process. Ray restarts the worker group, which resumes from the last reported checkpoint; a
  SIGTERM then stops the run without leaving a process behind, and the resumed run ends with the
  weights of the uninterrupted :mod:`reference_run`.
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
from conftest import BIN, REPO, run_cli, write_config
from reference_run import EVERY, METHODS, STEPS, logged_steps, max_diff, recovery_config, reference_run, weights

from dist_unlearn.engine.preemption import REQUEUE_EXIT_CODE

__all__ = ["reference_run"]  # a fixture


SESSION = re.compile(r"/[^\s=]*/session_[0-9][^/\s]*")


def _ray_workers(root_pid: int) -> list[psutil.Process]:
    """Ray Train worker processes started (indirectly) by the process ``root_pid``."""
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()  # once: a process that exits between two reads has an empty one
            if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.Error:
            continue
    return sorted(found, key=lambda p: p.pid)


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


def _naming(marker: str) -> list[psutil.Process]:
    """Live (not zombie) processes whose command line contains ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for proc in {p.pid: p for p in procs}.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(proc.cmdline())[:150])
        except psutil.Error:
            continue
    return left


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)


def _files(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``directory``: relative path -> (mtime in ns, content)."""
    return {
        str(f.relative_to(directory)): (f.stat().st_mtime_ns, f.read_bytes())
        for f in directory.rglob("*")
        if f.is_file()
    }


@pytest.mark.slow
def test_killed_worker_is_replaced_sigterm_stops_every_process_and_the_resumed_run_matches(
    tmp_path, small_target, reference_run, ray_address
):
    """One run of two methods (``grad_diff`` then ``ga``) on a local Ray cluster of its own, with
    ``failure.max_failures=1``:

    1. once the second method's first checkpoint exists, one Ray Train worker gets SIGKILL; Ray starts a new
       worker group, which skips the finished first method (its outputs stay untouched) and resumes the
       second from that checkpoint;
    2. as soon as the new group's processes exist, ``dist-unlearn run`` gets SIGTERM: the workers save a
       checkpoint at their next step, the CLI exits 75 and none of the processes the run started is left
       (workers, GCS, raylet, agents: everything under its process or naming its Ray session directory);
    3. the same command again (on the session's Ray cluster: ``ray.address`` may change on resume) finishes
       the run: both methods end with the weights of the uninterrupted :mod:`reference_run`.
    """
    out = tmp_path / "killed"
    config = write_config(out / "run.yaml", recovery_config(out, small_target, failure={"max_failures": 1}))
    first, second = METHODS
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = tmp_path / "killed.log"
    with log.open("w") as stream:
        proc = subprocess.Popen(
            [str(BIN / "dist-unlearn"), "run", str(config)],
            cwd=REPO,
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run_dir = out / second
    cli = psutil.Process(proc.pid)
    try:
        checkpoint = run_dir / "checkpoints" / f"step_{EVERY:06d}"
        _wait_for(checkpoint.is_dir, 600, f"the first checkpoint of {second}", proc, log)
        finished = _files(out / first)
        workers = _ray_workers(proc.pid)
        assert len(workers) == 2, workers
        session = _session_of(cli)
        assert session, "no Ray session directory on the command lines of the run's processes"
        victim = workers[-1]
        victim.send_signal(signal.SIGKILL)
        killed_at = logged_steps(run_dir)[-1]

        old = {w.pid for w in workers}
        _wait_for(lambda: len({w.pid for w in _ray_workers(proc.pid)} - old) == 2, 600, "a new worker group", proc, log)
        started = cli.children(recursive=True) + _naming(session)
        assert len({p.pid for p in started}) >= 4  # at least GCS, raylet and two workers
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-6000:]
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    assert EVERY <= killed_at < STEPS, f"the kill came at step {killed_at}, not mid-run"
    resumed = sorted({int(m) for m in re.findall(rf"\[{second}\] resumed from \S+ at step (\d+)", output)})
    assert len(resumed) == 1 and EVERY <= resumed[0] <= killed_at, (resumed, killed_at, output[-4000:])
    assert f"[{first}] resumed" not in output and _files(out / first) == finished  # skipped, untouched
    stopped_at = logged_steps(run_dir)[-1]
    assert resumed[0] <= stopped_at < STEPS, (resumed, stopped_at)
    time.sleep(1)
    assert not _alive(started), _alive(started)
    assert not _naming(session), [" ".join(p.cmdline())[:150] for p in _naming(session)]

    run_cli(["run", str(config), f"ray.address={ray_address}"])
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    diffs = {m: max_diff(weights(out / m), weights(reference_run / m)) for m in METHODS}
    print(
        f"killed a worker at step {killed_at} of {second} (resumed at {resumed[0]}), SIGTERM stop at step "
        f"{stopped_at}; max |dw| after the final resume: {diffs}"
    )
    assert max(diffs.values()) < 1e-6


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
