"""``dist-unlearn eval`` on Ray Train workers: one ``TorchTrainer`` run whose workers each score their
slice of every split (:func:`dist_unlearn.engine.eval_job.run_eval_job`); rank 0 writes the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.train import LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dist_unlearn.config import RunConfig as DistUnlearnConfig
from dist_unlearn.engine.eval_job import eval_job, run_eval_job
from dist_unlearn.ray.trainer import _wants_gpu, connect, disconnect, prepare_worker_process, ray_log_level, worker_env


def _eval_fn(config: dict[str, Any]) -> None:
    prepare_worker_process(config["env"])
    run_eval_job(config["job"])


def run_eval_with_ray(cfg: DistUnlearnConfig, targets: dict[str, str], oracle_dir: str | None) -> None:
    """Evaluate ``targets`` on ``ray.num_workers`` workers; results land in ``OUTPUT/<name>/eval.json``."""
    started = connect(cfg)
    try:
        evaluate_on_ray(cfg, targets, oracle_dir)
    finally:
        disconnect(started)


def evaluate_on_ray(cfg: DistUnlearnConfig, targets: dict[str, str], oracle_dir: str | None) -> None:
    """:func:`run_eval_with_ray` in a process already connected to Ray (``dist-unlearn sweep``'s driver)."""
    use_gpu = _wants_gpu(cfg)
    TorchTrainer(
        _eval_fn,
        train_loop_config={"job": eval_job(cfg, targets, oracle_dir), "env": worker_env(cfg)},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name="eval",
            storage_path=str(Path(cfg.output.dir).resolve() / "ray_results"),
            logging_config=LoggingConfig(log_level=ray_log_level()),
        ),
    ).fit()
