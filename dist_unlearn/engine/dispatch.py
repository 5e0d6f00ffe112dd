"""Run a :class:`~dist_unlearn.engine.job.Job` on this rank: look up its kind's train function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dist_unlearn.engine.continual_loop import run_continual
from dist_unlearn.engine.contrastive_loop import run_contrastive
from dist_unlearn.engine.job import Job, Reporter
from dist_unlearn.engine.unlearn_loop import run_unlearning

TRAIN_FUNCTIONS: dict[str, Callable[[Job, Reporter | None], dict[str, Any]]] = {
    "unlearn": run_unlearning,
    "contrastive": run_contrastive,
    "continual": run_continual,
}
"""Job kind → the function every rank runs (collective over the process group)."""


def run_job(job: Job | dict[str, Any], reporter: Reporter | None = None) -> dict[str, Any]:
    """Run ``job`` on this rank (collective over the process group); returns its summary."""
    if isinstance(job, dict):
        job = Job(**job)
    try:
        train = TRAIN_FUNCTIONS[job.kind]
    except KeyError:
        raise ValueError(f"unknown job kind {job.kind!r}; one of {', '.join(TRAIN_FUNCTIONS)}") from None
    return train(job, reporter)
