"""First runs as a user starts them: an empty output directory, the embedded models not prepared, and
none of the test suite's environment settings (``TOKENIZERS_PARALLELISM``, ``HF_HUB_OFFLINE``).

Under ``torchrun`` rank 0 prepares the embedded target and oracle alone while the other ranks wait;
before that was so, rank 0's preparation ran a collective that the waiting rank never joined and the
run hung for ever.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, TEST_ONLY_ENV, fresh_run_config, write_config

pytestmark = pytest.mark.slow


def _user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TEST_ONLY_ENV}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "dist_unlearn.cli", *args]
    result = subprocess.run(cmd, cwd=REPO, env=_user_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}\n{result.stderr[-5000:]}"
    return result


def test_ray_run_on_an_empty_output_dir(tmp_path: Path) -> None:
    """``dist-unlearn run`` as the README starts it: a local Ray cluster of its own, the driver prepares the
    models, 2 Ray workers train."""
    out = tmp_path / "fresh"
    config = write_config(tmp_path / "run.yaml", fresh_run_config(out))
    cmd = [str(BIN / "dist-unlearn"), "run", str(config)]
    result = subprocess.run(cmd, cwd=REPO, env=_user_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert set(json.loads((out / "embedded" / "prepare.json").read_text())) >= {"target", "oracle", "fingerprint"}
    summary = json.loads((out / "summary.json").read_text())["grad_diff"]
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert "grad_diff" in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_torchrun_run_then_eval_on_an_empty_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    cfg = fresh_run_config(out, ray={"enabled": False})
    config = write_config(tmp_path / "run.yaml", cfg)
    assert not out.exists()

    run = _torchrun(["run", str(config)])
    prepared = json.loads((out / "embedded" / "prepare.json").read_text())
    assert set(prepared) >= {"target", "oracle", "fingerprint"}
    assert not (out / "embedded.tmp").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grad_diff"]["steps"] == 2
    assert "grad_diff" in run.stdout

    # eval from a second fresh directory: its ranks must not race to prepare the same models
    out2 = tmp_path / "fresh_eval"
    config2 = write_config(tmp_path / "eval.yaml", {**cfg, "output": {**cfg["output"], "dir": str(out2)}})
    evaluated = _torchrun(["eval", str(config2)])
    for name in ("original", "oracle"):
        result = json.loads((out2 / name / "eval.json").read_text())
        assert result["name"] == name
    assert "original" in evaluated.stdout and "oracle" in evaluated.stdout
    # the same seed and settings give the same prepared models in both directories
    assert json.loads((out2 / "embedded" / "prepare.json").read_text())["fingerprint"] == prepared["fingerprint"]


def test_a_stop_during_the_preparation_ends_it_on_every_launcher(tmp_path: Path) -> None:
    """Minutes of preparation are not finished for a run told to stop. ``dist-unlearn run`` (Ray: the
    driver prepares before any Ray process starts) gets SIGTERM during the target's fine-tuning; 2
    ``torchrun`` ranks start with ``OUTPUT/STOP`` present (rank 0 prepares, rank 1 waits and is told).
    Each exits 75 at once, and nothing half-prepared is left under the final name."""
    out = tmp_path / "ray"
    config = write_config(tmp_path / "ray.yaml", fresh_run_config(out, prepare={"steps": 100_000}))
    cmd = [str(BIN / "dist-unlearn"), "run", str(config)]
    env = {**_user_env(), "PYTHONUNBUFFERED": "1"}  # each line as it is printed, as on a terminal
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("prepare: fine-tuning the target model"):
                break
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert time.monotonic() - started < 60
    assert "of preparing the target model; nothing saved: it starts again" in err, err[-3000:]
    assert not (out / "embedded").exists() and not (out / "STOP").exists()

    out = tmp_path / "torchrun"
    config = write_config(tmp_path / "torchrun.yaml", fresh_run_config(out, ray={"enabled": False}))
    out.mkdir()
    (out / "STOP").touch()
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "dist_unlearn.cli", "run", str(config)]
    result = subprocess.run(cmd, cwd=REPO, env=_user_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and re.search(r"exitcode\s*:\s*75\b", result.stderr), result.stderr[-3000:]
    assert "after step 1 of preparing the target model" in result.stderr
    assert not (out / "embedded").exists() and not (out / "STOP").exists()
