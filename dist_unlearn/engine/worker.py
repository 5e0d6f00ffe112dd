"""Pieces every worker train function shares: process set-up, the DeepSpeed engine, resuming,
periodic checkpoints reported to the launcher, and the run summary. Both the unlearning and the
contrastive loops use them, so checkpoint and resume behave identically in both jobs."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_unlearn.config import RunConfig
from dist_unlearn.distributed.env import get_rank, get_world_size, init_distributed, is_main_process
from dist_unlearn.distributed.seeding import derive_seed, seed_everything
from dist_unlearn.engine.chatter import attach_log_file, log_path
from dist_unlearn.engine.checkpoint import load_checkpoint, save_checkpoint
from dist_unlearn.engine.ds_config import build_deepspeed_config
from dist_unlearn.engine.job import Reporter
from dist_unlearn.engine.preemption import Preempted, agree_to_stop, stop_requested
from dist_unlearn.io import write_json_atomic


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device


def start_worker(cfg: RunConfig) -> WorkerContext:
    """Join (or create) the process group, size torch's thread pool, seed every RNG identically."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    attach_log_file(log_path(cfg.output.dir, f"rank{os.environ.get('RANK', '0')}"))
    init_distributed()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
        if cfg.ray.cpus_per_worker > 0:
            torch.set_num_threads(cfg.ray.cpus_per_worker)
    seed_everything(derive_seed(cfg.train.seed, "model"))
    return WorkerContext(get_rank(), get_world_size(), device)


def initialize_engine(cfg: RunConfig, model: torch.nn.Module, micro_batch_size: int, lr: float) -> Any:
    """``deepspeed.initialize`` with the run's DeepSpeed config, optimising the trainable parameters only."""
    import deepspeed

    ds_config = build_deepspeed_config(
        zero_stage=cfg.deepspeed.zero_stage,
        micro_batch_size=micro_batch_size,
        world_size=get_world_size(),
        lr=lr,
        weight_decay=cfg.train.weight_decay,
        warmup_steps=cfg.train.warmup_steps,
        grad_clip=cfg.train.grad_clip,
        dtype=cfg.model.dtype,
        user_config=cfg.deepspeed.config,
        offload_optimizer=cfg.deepspeed.offload_optimizer,
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        dist_init_required=False,
    )
    return engine


def resume(engine: Any, reporter: Reporter, name: str) -> tuple[int, Any]:
    """Load the reporter's latest checkpoint if any; returns (completed steps, stored ``eval_before``)."""
    step, state = resume_state(engine, reporter, name)
    return step, state.get("eval_before")


def resume_state(engine: Any, reporter: Reporter, name: str) -> tuple[int, dict[str, Any]]:
    """:func:`resume` returning the checkpoint's whole client state (``{}`` when starting fresh)."""
    resume_dir = reporter.latest_checkpoint()
    if resume_dir is None:
        return 0, {}
    state = load_checkpoint(engine, resume_dir)
    step = int(state["step"])
    if is_main_process():
        print(f"[{name}] resumed from {resume_dir} at step {step}", flush=True)
    return step, state


class Checkpointer:
    """Saves every ``checkpoint.every_steps`` and at the last step, reporting each to the launcher.

    The last checkpoint is reported by :meth:`finish` after the final evaluation and export, so a
    launcher that restarts on failure never sees a "finished" run without its outputs.

    It also honours stop requests (:mod:`dist_unlearn.engine.preemption`: a signal, or the file
    ``OUTPUT_DIR/STOP``): when any rank has one at a step boundary, all ranks save a checkpoint,
    report it with ``preempted: 1`` and raise :class:`~dist_unlearn.engine.preemption.Preempted`.
    """

    def __init__(
        self,
        engine: Any,
        reporter: Reporter,
        run_dir: Path,
        cfg: RunConfig,
        total_steps: int,
        eval_before: Any,
        extra_state: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``extra_state()``: more client state saved with every checkpoint (read back by :func:`resume_state`)."""
        self.engine, self.reporter = engine, reporter
        self.extra_state = extra_state
        self.root = Path(run_dir) / "checkpoints"
        self.every, self.keep, self.total = cfg.checkpoint.every_steps, cfg.checkpoint.keep, total_steps
        self.eval_before = eval_before
        self.last: Path | None = None
        self.output_dir, self.name = Path(cfg.output.dir), Path(run_dir).name

    def after_step(self, completed: int, values: dict[str, float]) -> None:
        """Call after each optimizer step with the number of completed steps (collective: every rank
        votes on stop requests; saving is collective too)."""
        is_last = completed == self.total
        stop = not is_last and agree_to_stop(stop_requested(self.output_dir))
        if not ((self.every and completed % self.every == 0) or is_last or stop):
            return
        state = {"step": completed, "eval_before": self.eval_before}
        if self.extra_state is not None:
            state.update(self.extra_state())
        self.last = save_checkpoint(self.engine, self.root, completed, state, keep=self.keep)
        if stop:
            metrics = {**values, "step": completed, "preempted": 1}
            self.reporter.report(metrics, self.last if is_main_process() else None)
            raise Preempted(completed, self.last, self.name)
        if not is_last:
            self.reporter.report({"step": completed, **values}, self.last if is_main_process() else None)

    def finish(self, run_dir: Path, summary: dict[str, Any]) -> None:
        """Write ``metrics.json`` (rank 0) and report the final checkpoint (when this run trained)."""
        if is_main_process():
            write_json_atomic(Path(run_dir) / "metrics.json", summary)
        if self.last is not None:
            self.reporter.report({"step": self.total, "done": 1}, self.last if is_main_process() else None)


class _NoProgress:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, initial: int, desc: str) -> Any:
    """A tqdm bar on rank 0 (refreshing at most every 5 s), a silent stand-in elsewhere."""
    if not is_main_process():
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, mininterval=5.0)
