"""launchers/: the torchrun/deepspeed/srun entry script and the Ray job submission script."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, write_config
from reference_run import STEPS, logged_steps, reference_run

__all__ = ["reference_run"]  # a fixture


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
def test_torchrun_entry_runs_two_ranks(reference_run):
    """The shared reference run is ``torchrun --nproc_per_node=2 launchers/torchrun_entry.py CONFIG``."""
    summary = json.loads((reference_run / "summary.json").read_text())["grad_diff"]
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert logged_steps(reference_run / "grad_diff") == list(range(1, STEPS + 1))


# --- every script `dist-unlearn submit` renders is valid bash ----------------------------------

SUBMIT_LAYOUTS = {
    "ray-cpu": ["--launcher", "ray"],
    "ray-gpu": [
        "--launcher",
        "ray",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu",
        "--sbatch-arg=--mem=64G",
    ],
    "torchrun-cpu": ["--launcher", "torchrun", "--nodes", "2"],
    "torchrun-gpu": ["--launcher", "torchrun", "--nodes", "2", "--gpus-per-node", "4", "--time", "04:00:00"],
}


@pytest.mark.parametrize("layout", sorted(SUBMIT_LAYOUTS))
def test_every_rendered_sbatch_script_passes_bash_n(layout, tmp_path, capsys):
    """Both templates, CPU and GPU layouts, paths and overrides that need quoting: ``bash -n`` accepts them."""
    import shutil
    import subprocess

    from dist_unlearn.cli import main

    config = tmp_path / "my exp" / "run's.yaml"  # a space and a quote in the config path
    config.parent.mkdir()
    shutil.copy(REPO / "configs" / "quickstart" / "unlearn.yaml", config)
    out_dir = tmp_path / "out dir"
    argv = ["submit", str(config), *SUBMIT_LAYOUTS[layout], "--dry-run", f"output.dir={out_dir}"]
    assert main([*argv, "method.names=[grad_diff, npo_gd]"]) == 0, capsys.readouterr().err
    script = capsys.readouterr().out
    assert script.startswith("#!/bin/bash\n") and "{{" not in script
    assert f"STOP_FILE='{out_dir}/STOP'" in script.splitlines()
    assert "'method.names=[grad_diff, npo_gd]'" in script
    path = tmp_path / f"{layout}.sbatch"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # the check is live: the same script without its last `fi` is refused
    broken = tmp_path / "broken.sbatch"
    broken.write_text(script[: script.rindex("\nfi\n")] + script[script.rindex("\nfi\n") + 3 :])
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0


def test_an_unset_ray_address_starts_a_cluster_and_never_joins_a_stray_one():
    """Ray's own default (``address=None``) joins the cluster the last ``ray start`` on the machine left;
    the CLI asks for a new local one unless told otherwise."""
    from dist_unlearn.ray.trainer import cluster_address

    assert cluster_address(None, {}) == "local"
    assert cluster_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"  # Ray job entrypoints
    assert cluster_address("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "auto"
    assert cluster_address("", {"RAY_ADDRESS": ""}) == "local"


def test_a_job_counts_as_finished_only_in_the_fit_that_finished_it(tmp_path):
    """What a restarted Ray worker group skips: the marker of this fit, never a file's time (a ``metrics.json``
    dated in the future, as a node with a fast clock writes it, does not make a job finished)."""
    import os
    import time

    from dist_unlearn.io import write_text_atomic
    from dist_unlearn.ray.trainer import FIT_FINISHED_FILE, finished_in_fit

    (tmp_path / "metrics.json").write_text("{}")
    future = time.time() + 3600
    os.utime(tmp_path / "metrics.json", (future, future))
    assert not finished_in_fit(tmp_path, "fit-b")
    write_text_atomic(tmp_path / FIT_FINISHED_FILE, "fit-a")  # finished in an earlier fit of this directory
    assert not finished_in_fit(tmp_path, "fit-b")
    assert finished_in_fit(tmp_path, "fit-a")


def _lives(proc) -> bool:  # noqa: ANN001 (a psutil.Process)
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_stopping_a_ray_cluster_by_its_temp_dir_leaves_no_process_behind(tmp_path):
    """What the suite does with the Ray cluster it starts with ``ray start`` (conftest.ray_address), and the
    CLI with what is left of its own local cluster: every process naming the cluster's temp dir ends, and
    so do those its raylet started that renamed themselves (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``), which outlived a raylet ended alone."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    from dist_unlearn.ray.trainer import processes_naming, stop_processes_naming

    temp_dir = tempfile.mkdtemp(prefix="du-rs-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", "--head", "--port=0", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"]
    cmd.append(f"--temp-dir={temp_dir}")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    try:
        subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=180)
        deadline = time.monotonic() + 60
        while True:  # until the raylet has started its agents
            procs = processes_naming(temp_dir)
            renamed = [p for p in procs if _lives(p) and " ".join(p.cmdline()).startswith("ray::")]
            if len(renamed) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(renamed) >= 2, [" ".join(p.cmdline())[:80] for p in procs]
        names = {p.pid: " ".join(p.cmdline())[:80] for p in procs}
        stop_processes_naming(temp_dir)
        deadline = time.monotonic() + 10  # a KILL takes effect a moment after it is sent
        while (left := [names[p.pid] for p in procs if _lives(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, left
    finally:
        stop_processes_naming(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
