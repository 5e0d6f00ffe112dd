"""The interface between the driver (:mod:`dist_unlearn.engine.driver`) and a job kind.

The driver owns everything that is the same for every job: process set-up, resuming, the step loop, the
metrics log and progress bars, checkpoints and stop requests, the export directory, ``metrics.json`` and
the reports to the launcher. A :class:`Task` owns what its job computes. Every method is collective:
every rank calls it. The driver runs, in order::

    task = Task(run)                   # set-up: model, data, engine; what must see the starting weights
    start, state = <resume>            # DeepSpeed checkpoint of task.engine (or task.start_step)
    task.begin(start, state)           # e.g. the evaluation before training (or the checkpoint's copy)
    for step in range(start, task.total_steps):
        task.start_phase(phase)        # before the first step of a phase that this run executes
        values = task.step(step)       # named numbers -> metrics.jsonl (+ step_seconds)
        <checkpoint, stop request>     # never at a phase's last step
        task.after_step(step + 1)      # e.g. periodic evaluation
        task.end_phase(phase)          # after a phase's last step
    after = task.evaluate(); task.export(RUN/model); summary = task.summary(after)

A phase is a run of ``phase_steps`` steps (the whole run, or one continual forget request). A task whose
``engine`` the driver checkpoints (``progress_dir`` is ``None``) resumes at any step; a task that saves its
own progress at each phase's end (``progress_dir``) resumes at a phase start: a stop drops the phase in
progress, and the task's set-up sets ``start_step`` from what it saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_unlearn.config import RunConfig


@dataclass(frozen=True)
class Run:
    """What the driver gives a task: the job, this rank, and the driver's services.

    ``initialize_engine(model, micro_batch_size, lr)``: a DeepSpeed engine with the run's DeepSpeed config
    over the trainable parameters. ``export(engine, tokenizer, directory, extra_files=None)``: the engine's
    weights as a HF model directory in ``output.save_dtype``, written atomically (collective).
    ``report(metrics)``: numbers to the launcher (a sweep's scheduler reads periodic evaluations).
    """

    cfg: RunConfig
    name: str
    model_dir: str
    run_dir: Path
    rank: int
    world_size: int
    device: torch.device
    save_dtype: torch.dtype
    initialize_engine: Callable[[torch.nn.Module, int, float], Any]
    export: Callable[..., Path]
    report: Callable[[dict[str, Any]], None]


class Task:
    """One job kind (see the module docstring for the order of calls). Subclasses set, in ``__init__``,
    ``label`` (progress bars, printed lines), ``total_steps`` and ``engine`` or ``progress_dir``."""

    per_method: bool = True
    """One job per ``method.names`` entry (the job's name is the method); False: one job named after the kind."""
    label: str = ""
    total_steps: int = 0
    phase_steps: int = 0
    """Steps per phase; 0: one phase, the whole run."""
    phase_name: str = "phase"
    """What a phase is called in reports (``{"request": 1}``) when the task saves its own progress."""
    log_every: int = 1
    """Write a ``metrics.jsonl`` row every this many steps (and at the last step)."""
    examples_per_step: int | None = None
    """When set, each row also gets ``examples_per_second = examples_per_step / step_seconds``."""
    engine: Any = None
    """The DeepSpeed engine the driver checkpoints and resumes (``progress_dir`` is ``None``)."""
    progress_dir: Path | None = None
    """Where the task saves its own progress at each phase's end, instead of checkpoints of ``engine``."""
    start_step: int = 0
    """Completed steps the task's set-up restored from ``progress_dir``."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def begin(self, start_step: int, state: dict[str, Any]) -> None:
        """After resuming to ``start_step``; ``state``: the checkpoint's client state (``{}`` when fresh)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Saved with every checkpoint (beside ``step``); :meth:`begin` gets it back on resume."""
        return {}

    def progress_label(self, phase: int) -> str:
        """The progress bar's description during ``phase``."""
        return self.label

    def start_phase(self, phase: int) -> None:
        """Before the first step of ``phase`` that this run executes (not timed)."""

    def step(self, step: int) -> dict[str, float]:
        """Run optimizer step ``step`` (0-based); returns its numbers, already averaged over ranks."""
        raise NotImplementedError

    def after_step(self, completed: int) -> None:
        """After step ``completed`` (1-based) was logged and checkpointed."""

    def end_phase(self, phase: int) -> None:
        """After the last step of ``phase``."""

    def evaluate(self) -> Any:
        """The final evaluation of the trained model (before the export)."""
        return None

    def export(self, directory: Path) -> None:
        """Write the trained model to ``directory`` (collective; atomically)."""

    def summary(self, after: Any) -> dict[str, Any]:
        """The run summary (``metrics.json``), after the export."""
        raise NotImplementedError
