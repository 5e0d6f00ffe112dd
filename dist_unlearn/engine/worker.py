"""What the driver (:mod:`dist_unlearn.engine.driver`) uses on every rank: process set-up, the DeepSpeed
engine, resuming from a checkpoint, periodic checkpoints reported to the launcher, and progress bars."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_unlearn.config import RunConfig
from dist_unlearn.distributed.env import (
    get_rank,
    get_world_size,
    init_distributed,
    initialize_deepspeed,
    is_main_process,
)
from dist_unlearn.distributed.seeding import derive_seed, seed_everything
from dist_unlearn.engine.chatter import attach_log_file, log_path
from dist_unlearn.engine.checkpoint import load_checkpoint, save_checkpoint
from dist_unlearn.engine.ds_config import build_deepspeed_config
from dist_unlearn.engine.job import Reporter
from dist_unlearn.engine.preemption import Preempted


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
    return initialize_deepspeed(model, ds_config, model_parameters=[p for p in model.parameters() if p.requires_grad])


def resume_state(engine: Any, reporter: Reporter, name: str) -> tuple[int, dict[str, Any]]:
    """Load the reporter's latest checkpoint if any; returns (completed steps, its client state: ``{}`` when
    starting fresh). Prints where it resumed from (rank 0)."""
    resume_dir = reporter.latest_checkpoint()
    if resume_dir is None:
        return 0, {}
    state = load_checkpoint(engine, resume_dir)
    step = int(state["step"])
    if is_main_process():
        print(f"[{name}] resumed from {resume_dir} at step {step}", flush=True)
    return step, state


class Checkpointer:
    """Saves every ``checkpoint.every_steps``, at the last step and to honour a stop request, reporting each
    checkpoint to the launcher.

    The last checkpoint is reported by :meth:`finish` after the final evaluation and export, so a
    launcher that restarts on failure never sees a "finished" run without its outputs. A stop request
    (:mod:`dist_unlearn.engine.preemption`: a signal, or the file ``OUTPUT_DIR/STOP``), agreed on by every
    rank, saves a checkpoint, reports it with ``preempted: 1`` and raises
    :class:`~dist_unlearn.engine.preemption.Preempted`.
    """

    def __init__(
        self,
        engine: Any,
        reporter: Reporter,
        run_dir: Path,
        cfg: RunConfig,
        total_steps: int,
        client_state: Callable[[], dict[str, Any]],
    ) -> None:
        """``client_state()``: saved with every checkpoint beside ``step`` (read back by :func:`resume_state`)."""
        self.engine, self.reporter, self.client_state = engine, reporter, client_state
        self.root = Path(run_dir) / "checkpoints"
        self.every, self.keep, self.total = cfg.checkpoint.every_steps, cfg.checkpoint.keep, total_steps
        self.last: Path | None = None
        self.name = Path(run_dir).name

    def after_step(self, completed: int, values: dict[str, float], stop: bool) -> None:
        """Call after each optimizer step with the number of completed steps and whether every rank agreed
        to stop (collective: saving is)."""
        is_last = completed == self.total
        if not ((self.every and completed % self.every == 0) or is_last or stop):
            return
        state = {"step": completed, **self.client_state()}
        self.last = save_checkpoint(self.engine, self.root, completed, state, keep=self.keep)
        if stop:
            metrics = {**values, "step": completed, "preempted": 1}
            self.reporter.report(metrics, self.last if is_main_process() else None)
            raise Preempted(completed, self.last, self.name)
        if not is_last:
            self.reporter.report({"step": completed, **values}, self.last if is_main_process() else None)

    def finish(self) -> None:
        """Report the final checkpoint (when this run trained)."""
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
