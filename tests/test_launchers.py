"""launchers/: the torchrun/deepspeed/srun entry script and the Ray job submission script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest
from conftest import BIN, REPO, small_run_config, write_config


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_takes_the_local_rank_that_launchers_append():
    entry = _module("torchrun_entry")
    assert entry.split_launcher_args(["a.yaml", "--local_rank=3", "train.steps=2"]) == (
        ["a.yaml", "train.steps=2"],
        "3",
    )
    assert entry.split_launcher_args(["--local-rank", "1", "a.yaml"]) == (["a.yaml"], "1")
    assert entry.split_launcher_args(["a.yaml"]) == (["a.yaml"], None)


def test_entry_maps_slurm_task_variables_to_ranks():
    entry = _module("torchrun_entry")
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123"}
    env["SLURM_JOB_NODELIST"] = "node[07-08]"
    ranks = entry.slurm_rank_environment(env)
    assert ranks == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node07", "MASTER_PORT": "29623"}
    assert entry.slurm_rank_environment({**env, "RANK": "0"}) == {}  # torchrun already set the ranks
    assert entry.first_host("gpu-a[001-004,010],cpu1") == "gpu-a001"
    assert entry.first_host("rack[2-3]-n[05,07]") == "rack2-n05" and entry.first_host("n1,n2") == "n1"


def test_ray_job_submit_needs_a_shared_absolute_output_dir(tmp_path):
    submit = _module("ray_job_submit")
    config = write_config(tmp_path / "exp.yaml", {"output": {"dir": "runs/x"}})
    problem = submit.check_output_dir(config, [])
    assert problem.startswith("output.dir: 'runs/x' is relative") and "output.dir=/shared/runs/exp" in problem
    assert submit.check_output_dir(config, ["output.dir=/shared/runs/x"]) is None
    assert submit.entrypoint(config, ["train.steps=3"]) == "dist-unlearn run exp.yaml train.steps=3 ray.address=auto"


@pytest.mark.slow
def test_torchrun_entry_runs_two_ranks(tmp_path, small_target):
    cfg = small_run_config(tmp_path, small_target, train={"steps": 2}, checkpoint={"every_steps": 0})
    config = write_config(tmp_path / "run.yaml", cfg)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launchers/torchrun_entry.py", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["grad_diff"]["world_size"] == 2 and summary["grad_diff"]["steps"] == 2
