"""The one driver: runs a :class:`~dist_unlearn.engine.job.Job` of any kind on this rank, under Ray Train,
``torchrun`` / the ``deepspeed`` launcher, or in one plain process. It never imports Ray; the launcher passes a
:class:`~dist_unlearn.engine.job.Reporter` that knows where checkpoints go.

The job's kind picks its task (:data:`dist_unlearn.tasks.TASKS`); the driver owns the rest, the same for every
kind (the order of the task's calls is in :mod:`dist_unlearn.tasks.base`):

* set-up: the process group, seeds, thread pool (:func:`~dist_unlearn.engine.worker.start_worker`);
* resume: the newest checkpoint of ``task.engine`` (its client state back to ``task.begin``), or the step the
  task restored from its own ``progress_dir``;
* the step loop: ``step_seconds`` (and ``examples_per_second``) added to the task's numbers, rows in
  ``metrics.jsonl`` / TensorBoard every ``task.log_every`` steps, a progress bar per phase;
* checkpoints every ``checkpoint.every_steps`` and at the end, each reported to the launcher;
* stop requests (``OUTPUT/STOP``, SIGUSR1/SIGTERM), voted on by every rank after each step except a phase's
  last: a checkpoint (or, for a task with a ``progress_dir``, the start of the phase in progress) is reported
  with ``preempted: 1`` and :class:`~dist_unlearn.engine.preemption.Preempted` raised (the CLI exits 75);
* the end: ``task.evaluate``, the export to ``RUN/model``, ``task.summary`` written to ``RUN/metrics.json``,
  and the final report.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from dist_unlearn.config import config_from_dict
from dist_unlearn.distributed.env import barrier, is_main_process
from dist_unlearn.engine.ds_config import torch_dtype
from dist_unlearn.engine.export import export_hf_model
from dist_unlearn.engine.job import Job, LocalReporter, Reporter
from dist_unlearn.engine.metrics_log import MetricsLog
from dist_unlearn.engine.preemption import Preempted, agree_to_stop, stop_requested
from dist_unlearn.engine.worker import Checkpointer, initialize_engine, progress_bar, resume_state, start_worker
from dist_unlearn.io import write_json_atomic
from dist_unlearn.tasks import TASKS, Run, Task


def run_job(job: Job | dict[str, Any], reporter: Reporter | None = None) -> dict[str, Any]:
    """Run ``job`` on this rank (collective over the process group); returns its summary (all ranks).

    Writes, from rank 0, ``metrics.jsonl``, TensorBoard events, checkpoints under ``checkpoints/`` (or the
    task's own ``progress_dir``), the trained model under ``model/`` and ``metrics.json``, plus the task's files.
    """
    if isinstance(job, dict):
        job = Job(**job)
    try:
        task_class = TASKS[job.kind]
    except KeyError:
        raise ValueError(f"unknown job kind {job.kind!r}; one of {', '.join(TASKS)}") from None
    cfg = config_from_dict(job.config)
    run_dir = Path(job.run_dir)
    reporter = reporter or LocalReporter(run_dir)
    ctx = start_worker(cfg)
    save_dtype = torch_dtype(cfg.output.save_dtype)

    def export(engine: Any, tokenizer: Any, directory: Path, extra_files: Any = None) -> Path:
        return export_hf_model(engine, tokenizer, directory, save_dtype, extra_files=extra_files)

    run = Run(
        cfg=cfg,
        name=job.name,
        model_dir=job.model_dir,
        run_dir=run_dir,
        rank=ctx.rank,
        world_size=ctx.world_size,
        device=ctx.device,
        save_dtype=save_dtype,
        initialize_engine=partial(initialize_engine, cfg),
        export=export,
        report=lambda metrics: reporter.report(metrics, None),
    )
    task = task_class(run)
    checkpointer = None
    if task.progress_dir is None:  # the driver checkpoints the task's engine
        start, state = resume_state(task.engine, reporter, job.name)
    else:  # the task saved its own progress at phase ends
        start, state = task.start_step, {}
    task.begin(start, state)
    log = MetricsLog(run_dir, tensorboard=cfg.output.tensorboard, resume_from_step=start)
    if task.progress_dir is None:
        checkpointer = Checkpointer(task.engine, reporter, run_dir, cfg, task.total_steps, task.checkpoint_state)
    _train(task, run, start, log, checkpointer, reporter)
    log.close()

    after = task.evaluate()
    task.export(run_dir / "model")
    summary = task.summary(after)
    if is_main_process():
        write_json_atomic(run_dir / "metrics.json", summary)
    if checkpointer is not None:
        checkpointer.finish()
    else:
        phases = task.total_steps // _phase_steps(task)
        reporter.report({"done": 1, f"{task.phase_name}s": phases}, None)
        barrier()
    return summary


def _phase_steps(task: Task) -> int:
    return task.phase_steps or task.total_steps or 1


def _train(
    task: Task, run: Run, start: int, log: MetricsLog, checkpointer: Checkpointer | None, reporter: Reporter
) -> None:
    """Steps ``start .. task.total_steps - 1``: log, progress, checkpoints, stop requests (see the module doc)."""
    per = _phase_steps(task)
    progress = None
    for step in range(start, task.total_steps):
        phase, offset = divmod(step, per)
        if progress is None:
            task.start_phase(phase)
            progress = progress_bar(per, offset, task.progress_label(phase))
        started = time.perf_counter()
        values = task.step(step)
        values["step_seconds"] = time.perf_counter() - started
        if task.examples_per_step is not None:
            values["examples_per_second"] = task.examples_per_step / values["step_seconds"]
        completed = step + 1
        if completed % task.log_every == 0 or completed == task.total_steps:
            log.log(completed, values)
        progress.update(1)
        if "loss" in values:
            progress.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        phase_end = completed % per == 0
        stop = not phase_end and agree_to_stop(stop_requested(run.cfg.output.dir))
        if checkpointer is not None:
            checkpointer.after_step(completed, values, stop)  # saves (and raises Preempted) on a stop
        elif stop:  # the phase in progress is dropped; a rerun redoes it from its start
            progress.close()
            done = phase * per
            reporter.report({"step": done, task.phase_name: phase, "preempted": 1}, None)
            raise Preempted(done, task.progress_dir, run.name)
        task.after_step(completed)
        if phase_end:
            progress.close()
            progress = None
            task.end_phase(phase)
