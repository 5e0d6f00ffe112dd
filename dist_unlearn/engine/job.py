"""A job for the workers (plain data that crosses process boundaries) and the reporter interface the
launcher provides. :mod:`dist_unlearn.engine.driver` runs a job."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from dist_unlearn.engine.checkpoint import latest_checkpoint


@dataclass(frozen=True)
class Job:
    """What one worker group runs.

    config: ``config_to_dict`` of the run; kind: ``unlearn`` or ``contrastive``; name: the method
    (unlearning) or ``contrastive``; model_dir: the model to start from; run_dir: its output directory.
    """

    config: dict[str, Any]
    kind: str
    name: str
    model_dir: str
    run_dir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reporter(Protocol):
    """What the launcher provides: where to resume from, and how to announce checkpoints."""

    def latest_checkpoint(self) -> Path | None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


class LocalReporter:
    """Checkpoints stay in ``RUN_DIR/checkpoints``; resuming picks the newest complete one."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.root)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        return None
