"""The uninterrupted run the recovery tests compare against, made once per session.

The small embedded setup (``conftest.small_run_config``) with two methods (``METHODS``), each for
``STEPS`` steps with a checkpoint every ``EVERY`` steps, on 2 ranks under ``torchrun`` through
``launchers/torchrun_entry.py`` (so the entry script is exercised too). Ray and torchrun give identical
weights for the same config (test_e2e_unlearn.py), so every interrupted run, whatever its launcher, must
end with these weights.

Import the fixture into a test module with ``from reference_run import reference_run``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BIN, REPO, made_once, small_run_config, write_config
from safetensors.torch import load_file

STEPS, EVERY = 16, 4
_made: dict[str, Path] = {}


METHODS = ("grad_diff", "ga")  # the interruptions come during the first; a second shows what is skipped or redone


def recovery_config(out: Path, target: str, **sections) -> dict:
    """The reference config with ``output.dir=out`` (and ``sections`` merged in)."""
    sections = {"method": {"names": list(METHODS)}, "train": {"steps": STEPS}, **sections}
    return small_run_config(out, target, checkpoint={"every_steps": EVERY}, **sections)


@pytest.fixture(scope="session")
def reference_run(small_target, tmp_path_factory) -> Path:
    """Output dir of the uninterrupted run (``<method>/model``, ``<method>/metrics.jsonl``, ``summary.json``)."""

    def make(out: Path) -> None:
        config = write_config(out / "run.yaml", recovery_config(out, small_target))
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launchers/torchrun_entry.py", str(config)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]

    if small_target not in _made:  # several test modules import this fixture: run it once
        _made[small_target] = made_once(tmp_path_factory, "reference", make)
    return _made[small_target]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported model of a method's run directory."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted((run_dir / "model").glob("*.safetensors")):
        out.update(load_file(str(path)))
    assert out, f"no exported model in {run_dir}"
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
