"""Launch the train function on Ray Train workers: one ``TorchTrainer`` (one worker group) runs every
method of a config in turn, so the start-up (worker processes, imports, process group) is paid once.

Ray creates the process group (gloo on CPU, NCCL on GPU) and sets ``RANK``/``WORLD_SIZE``; the worker
function is :func:`dist_unlearn.engine.driver.run_job`, the same one ``torchrun`` uses.
Checkpoints are reported to Ray by rank 0 (all ranks write their shards into one directory, so
``output.dir`` must be on a filesystem every node sees); a restarted worker group resumes from
Ray's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dist_unlearn.config import ConfigError
from dist_unlearn.config import RunConfig as DistUnlearnConfig
from dist_unlearn.engine.chatter import VERBOSE_ENV, is_verbose, quiet_console
from dist_unlearn.engine.checkpoint import latest_checkpoint
from dist_unlearn.engine.driver import run_job
from dist_unlearn.engine.job import Job
from dist_unlearn.engine.preemption import Preempted, reinstall_signal_handlers
from dist_unlearn.engine.prepare import ModelAssets
from dist_unlearn.engine.runner import plan_jobs, prepare_run_dirs, read_summaries
from dist_unlearn.io import write_text_atomic

JOB_MARKER = "dist_unlearn_job"
"""File in each reported checkpoint naming the job (method) it belongs to: one Ray run holds every
method's checkpoints, so a restarted worker group must only resume from its own method's."""


class RayReporter:
    """Resume from Ray's latest checkpoint when it is this job's (else the run directory's newest);
    report checkpoints to Ray, marked with the job name."""

    def __init__(self, run_dir: str | Path, job_name: str) -> None:
        self.local_root = Path(run_dir) / "checkpoints"
        self.job_name = job_name

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            marker = Path(checkpoint.path) / JOB_MARKER
            if marker.is_file() and marker.read_text() == self.job_name:
                return Path(checkpoint.path)
        return latest_checkpoint(self.local_root)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = None
        if checkpoint_dir is not None:
            (Path(checkpoint_dir) / JOB_MARKER).write_text(self.job_name)
            checkpoint = Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report({**metrics, "job": self.job_name}, checkpoint=checkpoint)


FIT_FINISHED_FILE = ".finished_in_fit"
"""In a job's run directory: the id of the fit (one ``TorchTrainer.fit``) in which the job last finished."""


def finished_in_fit(run_dir: str | Path, fit_id: str) -> bool:
    """True when the job of ``run_dir`` already finished within the fit ``fit_id`` (see :func:`_train_fn`)."""
    marker = Path(run_dir) / FIT_FINISHED_FILE
    return marker.is_file() and marker.read_text() == fit_id


def _train_fn(config: dict[str, Any]) -> None:
    """Run the jobs in order on this worker group. After a worker failure Ray calls it again within the same
    fit: the jobs this fit already finished are skipped, the interrupted one resumes from its checkpoint.

    A job counts as finished in this fit when its run directory's :data:`FIT_FINISHED_FILE` holds this fit's
    id (a fresh random id per fit, written by rank 0 once the job returned). No file time is compared, so
    clocks that differ between nodes, or outputs of an earlier run of the same directory, cannot make a job
    count as finished."""
    prepare_worker_process(config["env"])
    for job in config["jobs"]:
        if finished_in_fit(job["run_dir"], config["fit_id"]):
            continue
        try:
            run_job(Job(**job), RayReporter(job["run_dir"], job["name"]))
        except Preempted:
            return  # checkpoint saved and reported with ``preempted: 1``; ending normally is no failure to retry
        if ray.train.get_context().get_world_rank() == 0:
            write_text_atomic(Path(job["run_dir"]) / FIT_FINISHED_FILE, config["fit_id"])


def _wants_gpu(cfg: DistUnlearnConfig) -> bool:
    if cfg.ray.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.ray.use_gpu == "true"


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Ray Train's controller


# Ray Train callbacks that only serve a cluster which outlives this process; left out on the one-machine
# cluster :func:`connect` starts (it ends with the process): the placement-group cleaner, whose actor polls
# Ray's state API (unavailable without the dashboard; with a second Ray instance on the machine its poll
# dies with a traceback on the console) to free the workers' resources should the driver die.
_SHARED_CLUSTER_CALLBACKS = ("PlacementGroupCleanerCallback",)
_started_local_cluster = False  # set by connect() when it starts the cluster itself


class _Trainer(TorchTrainer):
    """``TorchTrainer`` without the actors this project has no use for: Ray Data's dataset manager when no Ray
    Datasets are given (the jobs read their own data), and on a cluster :func:`connect` started itself the
    callbacks of ``_SHARED_CLUSTER_CALLBACKS``. Ray Train otherwise starts each of those actors, one more
    process importing Ray Train (and Ray Data), for every worker group. Should Ray rename the hook
    overridden here, the override is simply never called."""

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        dropped = set() if self.datasets else {"DatasetsCallback"}
        if _started_local_cluster:
            dropped.update(_SHARED_CLUSTER_CALLBACKS)
        return [cb for cb in callbacks if type(cb).__name__ not in dropped]


_QUIET_WARNINGS = (FutureWarning, UserWarning)  # the libraries' deprecation chatter, off in the workers


def worker_env(cfg: DistUnlearnConfig) -> dict[str, str]:
    """Environment for the workers: thread count, quiet warnings, ``--verbose``."""
    return {
        "OMP_NUM_THREADS": str(max(1, cfg.ray.cpus_per_worker)),
        "PYTHONWARNINGS": ",".join(f"ignore::{category.__name__}" for category in _QUIET_WARNINGS),
        "TOKENIZERS_PARALLELISM": "false",
        **({VERBOSE_ENV: "1"} if is_verbose() else {}),
    }


def prepare_worker_process(env: Mapping[str, str]) -> None:
    """First thing in every worker function: the environment of :func:`worker_env` (its thread count applied
    to torch, its warnings filtered) and the quiet console (:func:`~dist_unlearn.engine.chatter.quiet_console`).

    Done here, not through a Ray runtime environment: Ray starts every worker of a job that has a runtime
    environment through an extra set-up process, and cannot give such a job the worker processes it started
    ahead of time (they have none), so each worker would cost two more Python starts with Ray's imports."""
    os.environ.update(env)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for category in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
    quiet_console()


def ray_log_level() -> str:
    """Ray's and Ray Train's console level: everything with ``--verbose``, else errors only (Ray Train's
    INFO/WARNING records still reach its log files in the Ray session directory)."""
    return "INFO" if is_verbose() else "ERROR"


def cluster_address(configured: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """What ``ray.init(address=...)`` gets: ``ray.address`` when set, else ``RAY_ADDRESS`` (set by Ray's job
    submission for its entrypoints), else ``"local"``: start a new cluster. Never ``None``, with which
    Ray would silently join whatever cluster the last ``ray start`` on this machine left behind."""
    return configured or environ.get("RAY_ADDRESS") or "local"


def connect(cfg: DistUnlearnConfig) -> bool:
    """Join ``ray.address`` (or ``RAY_ADDRESS``) or start a local cluster sized for the workers; True if we
    started it."""
    if ray.is_initialized():
        return False
    address = cluster_address(cfg.ray.address)
    kwargs: dict[str, Any] = {
        "address": address,
        "log_to_driver": True,
        "logging_level": ray_log_level(),
    }
    if address == "local":
        kwargs["num_cpus"] = max(os.cpu_count() or 1, cfg.ray.num_workers * max(1, cfg.ray.cpus_per_worker))
        kwargs.update(num_gpus=torch.cuda.device_count(), include_dashboard=False)
        # Ray Train's preemption watcher polls for nodes the cluster is draining; this one-machine cluster
        # drains none. Off, a run starts one actor process fewer and its console error line about the
        # watcher's constructor arguments is gone. Stop requests (signals, OUTPUT/STOP) are unaffected.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    if address == "local":
        global _started_local_cluster
        ray.init(**kwargs)
        _started_local_cluster = True
    else:
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError) as exc:  # wrong address, cluster down, or missing auth token
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"ray.address: could not join the Ray cluster at {address} ({first_line}). Fix: check that the "
                "cluster is up and the address is its GCS HOST:PORT (or 'auto' on one of its nodes); a cluster "
                "with token authentication also needs RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN in the environment"
            ) from exc
    reinstall_signal_handlers()  # ray.init replaced SIGTERM's handler with one that aborts the driver
    return address == "local"


def _session_dir() -> str | None:
    node = getattr(ray._private.worker, "_global_node", None)  # the node this driver started or joined
    return node.get_session_dir_path() if node is not None else None


def disconnect(started: bool) -> None:
    """Leave Ray; when this process started the local cluster (``started``), stop all of it.

    ``ray.shutdown()`` stops the GCS and the raylet it started, but their agents (dashboard agent,
    runtime-env agent) can outlive them as orphans. The processes of a Ray session name the session's
    own directory on their command line, or were started by one that does (the agents rename
    themselves), so what is left of *this* cluster is found from that directory before the shutdown
    and ended after it (TERM, then KILL after 5 s); nothing of another Ray cluster on the machine is
    touched.
    """
    global _started_local_cluster
    if not ray.is_initialized():
        return
    session = _session_dir() if started else None
    leftovers = processes_naming(session) if session else []  # before the raylet goes: its agents are found by it
    ray.shutdown()
    _started_local_cluster = False
    if session:
        stop_processes(list({p.pid: p for p in leftovers + processes_naming(session)}.values()))


def processes_naming(marker: str) -> list[Any]:
    """Every process (other than this one) whose command line contains ``marker``, and every process they
    started (``psutil.Process`` objects). Some of Ray's processes rename themselves (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``, started by the raylet) and outlive their raylet as orphans: they are found as
    its descendants, which is why this is collected while the session still runs."""
    import psutil

    mine = os.getpid()
    named = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] != mine and any(marker in part for part in proc.info["cmdline"] or ()):
            named.append(proc)
    found = {proc.pid: proc for proc in named}
    for proc in named:
        with contextlib.suppress(psutil.Error):
            found.update({child.pid: child for child in proc.children(recursive=True) if child.pid != mine})
    return list(found.values())


def stop_processes(procs: list[Any], grace_s: float = 5.0) -> list[int]:
    """End ``procs`` (``psutil.Process`` objects; TERM, then KILL after ``grace_s``); returns their pids.
    A process that already ended, or whose pid now belongs to another process, is left alone (psutil
    checks the start time)."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [proc.pid for proc in procs]


def stop_processes_naming(marker: str, grace_s: float = 5.0) -> list[int]:
    """End every process of :func:`processes_naming` ``(marker)``; returns their pids."""
    return stop_processes(processes_naming(marker), grace_s)


def ray_run_name(jobs: list[Job]) -> str:
    """Name of the Ray run (its folder under ``OUTPUT/ray_results``) for these jobs: the job name for one
    job, else ``methods-`` and a short hash of the names (the same methods resume the same Ray run)."""
    if len(jobs) == 1:
        return jobs[0].name
    digest = hashlib.sha256(",".join(job.name for job in jobs).encode()).hexdigest()[:10]
    return f"methods-{digest}"


def run_jobs_on_ray(cfg: DistUnlearnConfig, jobs: list[Job], callbacks: list[Any] | None = None) -> None:
    """One ``TorchTrainer.fit`` running ``jobs`` in turn on one worker group.

    Resumes when a Ray run of the same name exists in storage. Raises :class:`Preempted` when the workers
    stopped on request (their last report carries ``preempted: 1``). ``callbacks``: Ray Train callbacks
    (a sweep's trial passes the one that forwards periodic evaluations to Ray Tune).
    """
    use_gpu = _wants_gpu(cfg)
    trainer = _Trainer(
        _train_fn,
        train_loop_config={"jobs": [job.to_dict() for job in jobs], "fit_id": uuid.uuid4().hex, "env": worker_env(cfg)},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=ray_run_name(jobs),
            storage_path=str(Path(jobs[0].run_dir).parent / "ray_results"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            logging_config=LoggingConfig(log_level=ray_log_level()),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    metrics = result.metrics or {}
    if metrics.get("preempted"):
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        raise Preempted(int(metrics.get("step", 0)), checkpoint, str(metrics.get("job", jobs[-1].name)))


def run_with_ray(cfg: DistUnlearnConfig, assets: ModelAssets, restart: bool = False) -> dict[str, dict[str, Any]]:
    """Run every method of ``cfg`` on Ray workers; returns the summaries by method."""
    jobs = plan_jobs(cfg, assets)
    prepare_run_dirs(jobs, cfg.ray.num_workers, restart)
    if restart:
        shutil.rmtree(Path(jobs[0].run_dir).parent / "ray_results" / ray_run_name(jobs), ignore_errors=True)
    started = connect(cfg)
    try:
        run_jobs_on_ray(cfg, jobs)
        return read_summaries(jobs)
    finally:
        disconnect(started)
