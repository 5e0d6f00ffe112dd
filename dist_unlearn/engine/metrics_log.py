"""Step metrics, written by rank 0 to ``metrics.jsonl`` and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from dist_unlearn.distributed.env import is_main_process
from dist_unlearn.io import write_text_atomic


class MetricsLog:
    """Append-only JSONL log plus optional TensorBoard, active on rank 0 only.

    Rows are keyed by the number of completed steps. ``resume_from_step`` (the completed steps of the
    checkpoint resumed from) drops rows beyond it left by an interrupted run, so the log of a resumed
    run reads like that of an uninterrupted one.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_from_step: int = 0) -> None:
        self.active = is_main_process()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= resume_from_step
            ]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_from_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of ``run_dir/metrics.jsonl`` (empty if absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
