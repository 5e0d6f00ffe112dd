"""Launch the unlearning train function on Ray Train workers (one ``TorchTrainer`` run per method).

Ray creates the process group (gloo on CPU, NCCL on GPU) and sets ``RANK``/``WORLD_SIZE``; the worker
function is :func:`dist_unlearn.engine.job.run_job`, the same one ``torchrun`` uses.
Checkpoints are reported to Ray by rank 0 (all ranks write their shards into one directory, so
``output.dir`` must be on a filesystem every node sees); a restarted worker group resumes from
Ray's latest checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dist_unlearn.config import RunConfig as DistUnlearnConfig
from dist_unlearn.engine.checkpoint import latest_checkpoint
from dist_unlearn.engine.job import Job, run_job
from dist_unlearn.engine.preemption import Preempted
from dist_unlearn.engine.prepare import ModelAssets
from dist_unlearn.engine.runner import plan_jobs, prepare_run_dirs, read_summaries


class RayReporter:
    """Resume from Ray's latest checkpoint (else the run directory's); report checkpoints to Ray."""

    def __init__(self, run_dir: str | Path) -> None:
        self.local_root = Path(run_dir) / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return Path(checkpoint.path)
        return latest_checkpoint(self.local_root)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _train_fn(job: dict[str, Any]) -> None:
    try:
        run_job(Job(**job), RayReporter(job["run_dir"]))
    except Preempted:
        return  # checkpoint saved and reported with ``preempted: 1``; ending normally is no failure to retry


def _wants_gpu(cfg: DistUnlearnConfig) -> bool:
    if cfg.ray.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.ray.use_gpu == "true"


def worker_env(cfg: DistUnlearnConfig) -> dict[str, str]:
    """Environment for the workers: thread count, quiet warnings."""
    return {
        "OMP_NUM_THREADS": str(max(1, cfg.ray.cpus_per_worker)),
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning",
        "TOKENIZERS_PARALLELISM": "false",
    }


def connect(cfg: DistUnlearnConfig) -> bool:
    """Join ``ray.address`` or start a local cluster sized for the workers; True if we started it."""
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": worker_env(cfg)}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env=runtime_env, log_to_driver=True)
        return False
    cpus = max(os.cpu_count() or 1, cfg.ray.num_workers * max(1, cfg.ray.cpus_per_worker))
    gpus = torch.cuda.device_count()
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    return True


def run_job_on_ray(cfg: DistUnlearnConfig, job: Job) -> None:
    """One ``TorchTrainer.fit`` for one job (a method, or the contrastive run).

    Resumes when a run of the same name exists in storage. Raises :class:`Preempted` when the workers
    stopped on request (their last report carries ``preempted: 1``).
    """
    use_gpu = _wants_gpu(cfg)
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config=job.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=str(Path(job.run_dir).parent / "ray_results"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
        ),
    )
    result = trainer.fit()
    metrics = result.metrics or {}
    if metrics.get("preempted"):
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        raise Preempted(int(metrics.get("step", 0)), checkpoint, job.name)


def run_with_ray(cfg: DistUnlearnConfig, assets: ModelAssets, restart: bool = False) -> dict[str, dict[str, Any]]:
    """Run every method of ``cfg`` on Ray workers; returns the summaries by method."""
    jobs = plan_jobs(cfg, assets)
    prepare_run_dirs(jobs, cfg.ray.num_workers, restart)
    started = connect(cfg)
    try:
        for job in jobs:
            run_job_on_ray(cfg, job)
        return read_summaries(jobs)
    finally:
        if started:
            ray.shutdown()
