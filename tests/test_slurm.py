"""``dist-unlearn submit`` on a real Slurm cluster (Debian's slurm-wlm and munge, started by
:mod:`slurm_cluster` in a temporary directory; two nodes as network namespaces from
:mod:`netns_cluster`), running the small embedded unlearning job through both sbatch templates
(``torchrun`` across 2 nodes; ``ray`` with the README's quantized nf4 + LoRA command), each interrupted
twice on the way:

1. USR1 to the batch shell mid-run (what ``--signal=B:USR1@120`` delivers before the time limit) ->
   checkpoint at the next step -> ``scontrol requeue`` -> the requeued job resumes from that checkpoint;
2. then a node failure (the job's processes on node 2 killed): a torchrun job ends at once and
   submitting it again resumes; the Ray template sees its Ray node step end and requeues the job itself.

Both end with the weights of the uninterrupted run of the same config and global batch
(:mod:`reference_run`, ``conftest.nf4_torchrun_run``). A torchrun job from nothing (empty output
directory, models not prepared, no test-only environment) prepares the models once and runs.

Requeued jobs are held by Slurm for about two minutes (``BeginTime``); the tests release them with
``scontrol update JobId=N StartTime=now`` once the nodes are clean again, so the suite does not sleep.
The rendering and error tests at the top need no Slurm. A missing Slurm, or no right to make network
namespaces, skips the tests that need them, except under CI (``DIST_UNLEARN_CI=1``), where it fails them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, NF4_EVERY, NF4_STEPS, TEST_ONLY_ENV, fresh_run_config, nf4_run_config, write_config
from netns_cluster import NetnsCluster, unavailable_reason
from reference_run import EVERY, STEPS, logged_steps, max_diff, recovery_config, reference_run, weights
from slurm_cluster import Node, SlurmCluster, missing_binaries

from dist_unlearn.cli import main

__all__ = ["reference_run"]  # a fixture


def _config(out: Path, target: str | None = None) -> Path:
    """The first method of the session's :mod:`reference_run` config (the one it compares with)."""
    return write_config(out / "run.yaml", recovery_config(out, target, method={"names": ["grad_diff"]}))


# --- rendering and errors (no Slurm needed) ---------------------------------------------------


def test_dry_run_renders_a_ray_cluster_for_gpu_nodes(tmp_path, capsys):
    config = _config(tmp_path / "out")
    argv = ["submit", str(config), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu"]
    argv += ["--time", "04:00:00", "--sbatch-arg=--mem=64G", "--dry-run", "train.forget_batch_size=8"]
    assert main([*argv, "train.retain_batch_size=16"]) == 0
    script = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
        "#SBATCH --mem=64G",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        f"#SBATCH --output={tmp_path / 'out' / 'slurm-%j.log'}",
        "BASE=$(( 40000 + (SLURM_JOB_ID % 200) * 100 ))",
    ):
        assert line in script.splitlines(), line
    assert '"$BIN/ray" start --head' in script and '"$BIN/ray" start --address="$ADDRESS"' in script
    assert '--temp-dir="$RAY_TMP"' in script and "RAY_TMP=/tmp/ray-$SLURM_JOB_ID" in script
    assert '--num-gpus="$GPUS"' in script and "GPUS=${SLURM_GPUS_ON_NODE:-0}" in script
    run = next(line for line in script.splitlines() if 'dist-unlearn" run' in line)
    assert run.endswith(
        "train.forget_batch_size=8 train.retain_batch_size=16 ray.num_workers=8 ray.use_gpu=true "
        'ray.address="$ADDRESS" &'
    )
    assert "{{" not in script and "ray stop" not in script.replace("never `ray stop`", "")


def test_dry_run_renders_torchrun_with_rendezvous_on_the_first_node(tmp_path, capsys):
    config = _config(tmp_path / "out")
    argv = ["submit", str(config), "--launcher", "torchrun", "--nodes", "2", "--dry-run", "ray.num_workers=4"]
    assert main(argv) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in script.splitlines() and "#SBATCH --cpus-per-task=2" in script.splitlines()
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "--nnodes=2 --nproc-per-node=2" in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$PORT" --rdzv-id="$SLURM_JOB_ID"' in script
    assert "run " + str(config) + " ray.num_workers=4 ray.enabled=false" in script
    assert "#SBATCH --gpus-per-node" not in script


def test_submit_refuses_bad_input_before_anything_is_submitted(tmp_path, capsys, monkeypatch):
    config = _config(tmp_path / "out")
    assert main(["submit", str(config), "train.stpes=3", "--dry-run"]) == 2
    assert "unknown key 'train.stpes'; did you mean 'train.steps'?" in capsys.readouterr().err
    assert main(["submit", str(config), "--launcher", "torchrun", "--nodes", "2", "ray.num_workers=1"]) == 2
    err = capsys.readouterr().err
    assert "ray.num_workers (1) must be a multiple of --nodes (2)" in err and "Fix: set ray.num_workers=2" in err
    assert main(["submit", str(config), "--nodes", "2", "--gpus-per-node", "3"]) == 2
    assert "(--nodes 2 --gpus-per-node 3 runs one worker per GPU: ray.num_workers=6)" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(BIN))  # this environment has no sbatch
    assert main(["submit", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sbatch not found on PATH" in err and "--dry-run" in err
    assert not (tmp_path / "out" / "slurm").exists()


# --- real Slurm ---------------------------------------------------------------------------------


def _skip_unless_ci(reason: str) -> None:
    """Skip for ``reason``; under CI (``DIST_UNLEARN_CI`` set and not 0/false, as ``.ci/run`` does)
    fail instead: CI must run these tests."""
    if os.environ.get("DIST_UNLEARN_CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI cannot run the Slurm tests: {reason}")
    pytest.skip(reason)


def _require_slurm() -> None:
    missing = missing_binaries()
    if missing:
        _skip_unless_ci(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        _skip_unless_ci("slurmd must run as root to start jobs; run the Slurm tests as root (CI does)")


@pytest.fixture(scope="module")
def netns_slurm(tmp_path_factory):
    """Two nodes, each a network namespace with its own address, hostname and slurmd."""
    _require_slurm()
    reason = unavailable_reason()
    if reason:
        _skip_unless_ci(f"no 2-node cluster on this machine: {reason}")
    cluster = NetnsCluster(tmp_path_factory.mktemp("netns_slurm"), nodes=2).start()
    yield cluster
    cluster.stop()


def test_netns_cluster_nodes_have_their_own_hostnames_and_addresses(netns_slurm):
    out = netns_slurm.run(["srun", "--nodes=2", "--label", "sh", "-c", "hostname; hostname --ip-address"]).stdout
    expected = {f"{i}: {line}" for i, node in enumerate(netns_slurm.nodes) for line in (node.name, node.addr)}
    assert set(out.split("\n")) - {""} == expected, out


def _submit(slurm: SlurmCluster, config: Path, launcher: str, monkeypatch, capsys) -> tuple[str, Path]:
    """``dist-unlearn submit`` on every node of ``slurm`` (in this process; sbatch passes this
    environment on to the job)."""
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    argv = ["submit", str(config), "--launcher", launcher, "--nodes", str(len(slurm.nodes))]
    assert main(argv) == 0, capsys.readouterr().err[-4000:]
    out = capsys.readouterr().out
    job = re.search(r"^submitted batch job (\d+) ", out, re.M)
    log = re.search(r"^log: (\S+)$", out, re.M)
    assert job and log, out
    return job.group(1), Path(log.group(1))


def _log(path: Path) -> str:
    return path.read_text().replace("\r", "\n") if path.exists() else ""


def _finish(slurm: SlurmCluster, job: str, log: Path, timeout: float = 600) -> dict[str, str]:
    try:
        info = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    except TimeoutError:
        slurm.run(["scancel", job], check=False)
        raise
    if info["JobState"] != "COMPLETED" or info["ExitCode"] != "0:0":
        fields = " ".join(f"{key}={info.get(key)}" for key in ("JobState", "Reason", "ExitCode", "Restarts"))
        pytest.fail(f"job {job}: {fields}\n--- job log ---\n{_log(log)[-6000:]}\n{slurm.logs()}")
    return info


def _is_training_worker(proc: psutil.Process) -> bool:
    """A torchrun rank (``RANK`` in its environment) or a Ray Train worker."""
    cmdline = proc.info["cmdline"] or []
    if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
        return True
    try:
        return "dist_unlearn.cli" in cmdline and "RANK" in proc.environ()
    except psutil.Error:
        return False


def _worker_nodes(slurm: NetnsCluster) -> set[str]:
    """The nodes on which training workers run now."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        node = slurm.node_of(proc.pid)
        if node and _is_training_worker(proc):
            found.add(node)
    return found


def _wait_for_first_checkpoint(slurm: NetnsCluster, job: str, log: Path, out: Path, every: int = EVERY) -> set[str]:
    """Wait until the run's first checkpoint (step ``every``) exists; returns the nodes on which workers
    were seen."""
    first = out / "grad_diff" / "checkpoints" / f"step_{every:06d}"
    deadline, nodes, looked = time.monotonic() + 600, set(), 0.0
    while not first.is_dir():
        info = slurm.job(job)
        assert info["JobState"] in ("RUNNING", "PENDING"), (info, _log(log)[-4000:])
        assert time.monotonic() < deadline, _log(log)[-4000:]
        if len(nodes) < len(slurm.nodes) and time.monotonic() - looked > 2:
            nodes |= _worker_nodes(slurm)
            looked = time.monotonic()
        time.sleep(0.1)
    return nodes


def _usr1_and_release(slurm: NetnsCluster, job: str, log: Path, restarts: int) -> int:
    """Send USR1 to the batch shell (what ``--signal=B:USR1@120`` delivers before the time limit), wait for
    the requeue, release the requeued job; returns the step after which the run stopped."""
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    info = slurm.wait_for(job, {"PENDING", "COMPLETED", "FAILED"}, 300)
    assert info["JobState"] == "PENDING" and info["Restarts"] == str(restarts), (info, _log(log)[-4000:])
    _release(slurm, job)
    stopped = re.findall(r"stopped on request after step (\d+) of grad_diff", _log(log))
    assert len(stopped) == 1, _log(log)[-6000:]
    return int(stopped[0])


def _release(slurm: NetnsCluster, job: str) -> None:
    slurm.wait_until_requeued_job_may_start(job)  # what the hold skipped below is for
    slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])  # skip Slurm's 2-minute requeue hold


def _wait_for_a_step_after(slurm: NetnsCluster, job: str, log: Path, run_dir: Path, step: int) -> int:
    """Wait until the (resumed) run has logged a step after ``step``; returns it."""
    deadline = time.monotonic() + 600
    while True:
        done = [s for s in logged_steps(run_dir) if s > step] if (run_dir / "metrics.jsonl").exists() else []
        if done:
            return done[0]
        info = slurm.job(job)
        assert info["JobState"] in ("RUNNING", "PENDING"), (info, _log(log)[-4000:])
        assert time.monotonic() < deadline, _log(log)[-4000:]
        time.sleep(0.1)


def _check_finished_run(out: Path, steps: int, reference: Path) -> float:
    """The run's checkpoints, log and summary are complete; returns max |w - w_reference|."""
    run_dir = out / "grad_diff"
    assert (run_dir / "checkpoints" / f"step_{steps:06d}").is_dir()
    assert logged_steps(run_dir) == list(range(1, steps + 1))
    assert not (out / "STOP").exists()
    summary = json.loads((out / "summary.json").read_text())["grad_diff"]
    assert summary["world_size"] == 2 and summary["after"]["forget"]["prob"] < summary["before"]["forget"]["prob"]
    return max_diff(weights(run_dir), weights(reference / "grad_diff"))


def _resumed_steps(text: str) -> list[int]:
    """The step each run of the job resumed at, in order: one per run (the template's "(restart N)" line
    opens each) that resumed; Ray may echo a worker's line twice within one run."""
    steps = []
    for run in re.split(r"^dist-unlearn: job \d+ \(restart \d+\)", text, flags=re.M):
        found = set(re.findall(r"\[grad_diff\] resumed from \S+ at step (\d+)", run))
        assert len(found) <= 1, run[-4000:]
        steps.extend(int(step) for step in found)
    return steps


def _kill_job_processes_on(slurm: NetnsCluster, node: Node) -> list[int]:
    """SIGKILL what a node crash takes with it: every process in ``node``'s namespace but its
    ``slurmd`` and step daemons (so Slurm sees the job's task die, not the node)."""
    keep = {proc.pid for proc in slurm.procs.values()}
    killed = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or [""]
        if proc.pid in keep or cmdline[0].startswith("slurmstepd") or slurm.node_of(proc.pid) != node.name:
            continue
        with contextlib.suppress(psutil.Error):
            proc.kill()
            killed.append(proc.pid)
    return killed


@pytest.mark.slow
def test_torchrun_job_survives_a_usr1_requeue_and_a_node_failure(
    netns_slurm, small_target, reference_run, tmp_path, monkeypatch, capsys
):
    """The reference config across 2 nodes: USR1 after the first checkpoint -> checkpoint, requeue, resume;
    then node 2's processes killed -> the job FAILS at once (no hang in a collective); the same submit
    resumes from the last checkpoint and ends with the uninterrupted run's weights."""
    slurm, out = netns_slurm, tmp_path / "out"
    config = _config(out, small_target)
    job, log = _submit(slurm, config, "torchrun", monkeypatch, capsys)
    nodes = _wait_for_first_checkpoint(slurm, job, log, out)
    assert nodes == {node.name for node in slurm.nodes}, nodes  # a worker on every node
    stopped = _usr1_and_release(slurm, job, log, restarts=1)
    assert EVERY <= stopped < STEPS, stopped
    _wait_for_a_step_after(slurm, job, log, out / "grad_diff", stopped)
    text = _log(log)
    assert _resumed_steps(text) == [stopped], text[-6000:]
    assert all(f"dist-unlearn: node {node.name} ({node.addr}): torchrun" in text for node in slurm.nodes), text[-4000:]
    assert "dist-unlearn: USR1 at" in text and f"dist-unlearn: requeueing job {job}" in text and "(restart 1)" in text

    assert _kill_job_processes_on(slurm, slurm.nodes[1])
    info = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 120)  # no hang in a collective
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", (info, _log(log)[-4000:])
    slurm.wait_until_requeued_job_may_start(job)  # the nodes are clean again
    again, log = _submit(slurm, config, "torchrun", monkeypatch, capsys)
    _finish(slurm, again, log)
    resumed = _resumed_steps(_log(log))
    assert len(resumed) == 1 and stopped <= resumed[0] < STEPS, _log(log)[-4000:]
    diff = _check_finished_run(out, STEPS, reference_run)
    print(f"job {job}: USR1 after step {stopped}, node 2 killed; job {again} resumed at {resumed[0]}, |dw| {diff:.3g}")
    assert diff < 1e-6


@pytest.mark.slow
def test_ray_job_survives_a_usr1_requeue_and_a_node_failure(
    netns_slurm, small_target, nf4_torchrun_run, tmp_path, monkeypatch, capsys
):
    """The README's quantized command (nf4 base, LoRA r=8, ZeRO-3) on the Ray template across 2 nodes: USR1
    after the first checkpoint -> checkpoint, requeue, resume; then node 2's processes killed: Ray cannot
    place the 2 workers on the one node left, so the batch script sees its Ray node step end, ends the run
    and requeues the job, which resumes again and ends with the uninterrupted 2-rank run's weights."""
    slurm, out = netns_slurm, tmp_path / "out"
    config = write_config(out / "run.yaml", nf4_run_config(out, small_target))
    job, log = _submit(slurm, config, "ray", monkeypatch, capsys)
    nodes = _wait_for_first_checkpoint(slurm, job, log, out, NF4_EVERY)
    assert nodes == {node.name for node in slurm.nodes}, nodes  # a worker on every node
    stopped = _usr1_and_release(slurm, job, log, restarts=1)
    assert NF4_EVERY <= stopped < NF4_STEPS - 1, stopped
    _wait_for_a_step_after(slurm, job, log, out / "grad_diff", stopped)

    assert _kill_job_processes_on(slurm, slurm.nodes[1])
    info = slurm.wait_for(job, {"PENDING", "COMPLETED", "FAILED", "CANCELLED"}, 180)  # no wait for ever
    assert info["JobState"] == "PENDING" and info["Restarts"] == "2", (info, _log(log)[-4000:])
    _release(slurm, job)
    info = _finish(slurm, job, log)
    assert info["Restarts"] == "2"
    text = _log(log)
    where = f"{len(slurm.nodes)} node(s) ({', '.join(sorted(node.addr for node in slurm.nodes))})"
    assert where in text, (where, text[-4000:])
    assert "dist-unlearn: USR1 at" in text and f"dist-unlearn: requeueing job {job}" in text
    assert "dist-unlearn: a Ray node of this job stopped" in text and "(restart 2)" in text, text[-4000:]
    assert "dist-unlearn: run exited with 0" in text
    resumed = _resumed_steps(text)
    assert len(resumed) == 2 and resumed[0] == stopped and stopped <= resumed[1] < NF4_STEPS, text[-6000:]
    assert (out / "grad_diff" / "model" / "adapter" / "adapter_config.json").is_file()
    diff = _check_finished_run(out, NF4_STEPS, nf4_torchrun_run)
    print(f"ray job {job}: USR1 after step {stopped}, node 2 killed, resumed at {resumed}, max |dw| = {diff:.3g}")
    assert diff < 1e-6
    # the job's own Ray processes and temp dir are gone
    assert "dist-unlearn: ray cluster stopped" in text
    assert not Path(f"/tmp/ray-{job}").exists()
    tag = f"/tmp/ray-{job}/"
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if tag in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_torchrun_job_from_nothing_prepares_the_models_once(netns_slurm, tmp_path, monkeypatch, capsys):
    """``submit --launcher torchrun`` as a user's first job: an empty output directory, the embedded models
    not prepared, none of the suite's environment settings. The first rank prepares the target and oracle
    while the ranks on both nodes wait for it (see test_first_run for the one-machine launches)."""
    for name in TEST_ONLY_ENV:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "fresh"
    config = write_config(tmp_path / "run.yaml", fresh_run_config(out))
    assert not out.exists()
    job, log = _submit(netns_slurm, config, "torchrun", monkeypatch, capsys)
    _finish(netns_slurm, job, log)
    assert set(json.loads((out / "embedded" / "prepare.json").read_text())) >= {"target", "oracle", "fingerprint"}
    assert not (out / "embedded.tmp").exists()
    summary = json.loads((out / "summary.json").read_text())["grad_diff"]
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert "Traceback" not in _log(log)
