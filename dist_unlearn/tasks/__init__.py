"""One task per job kind (``job.kind``), run by the driver (:mod:`dist_unlearn.engine.driver`).

A new job kind is one :class:`~dist_unlearn.tasks.base.Task` subclass registered in :data:`TASKS`, plus its
config section and checks. Tasks never import the runtime (``engine/``, ``ray/``, ``launch/``): the driver
hands them its services in :class:`~dist_unlearn.tasks.base.Run`.
"""

from __future__ import annotations

from dist_unlearn.tasks.base import Run, Task
from dist_unlearn.tasks.continual import ContinualTask
from dist_unlearn.tasks.contrastive import ContrastiveTask
from dist_unlearn.tasks.unlearn import UnlearnTask

TASKS: dict[str, type[Task]] = {
    "unlearn": UnlearnTask,
    "contrastive": ContrastiveTask,
    "continual": ContinualTask,
}
"""Job kind → its task."""

__all__ = ["TASKS", "ContinualTask", "ContrastiveTask", "Run", "Task", "UnlearnTask"]
