"""Stop requests honoured at step boundaries: preemption, Slurm time limits, a graceful stop.

A run is asked to stop in one of two ways:

- a signal (``SIGUSR1`` or ``SIGTERM``) to a process that called :func:`install_signal_handlers`: the
  ``dist-unlearn run`` driver, or each rank of a ``torchrun`` launch;
- the file ``OUTPUT_DIR/STOP`` (:func:`stop_file`): what the sbatch templates create when Slurm sends
  the job's batch shell its warning signal (``--signal=B:USR1@SECONDS``), and the only channel that
  reaches Ray workers on other nodes. ``touch OUTPUT_DIR/STOP`` stops a run by hand.

At the next step boundary every rank votes (an all-reduce of the local flag, so ranks agree even
when only one saw the signal), the workers save a checkpoint and raise :class:`Preempted`; the CLI
exits with :data:`REQUEUE_EXIT_CODE`. Running the same command again resumes from that checkpoint.

This module imports neither Ray nor DeepSpeed.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75
"""Exit code of a run that stopped on request after saving a checkpoint (``EX_TEMPFAIL``)."""
STOP_FILE_NAME = "STOP"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_requested = threading.Event()


class Preempted(Exception):
    """A run stopped on request after saving a checkpoint; rerunning resumes from it.

    ``step`` is the number of completed steps in ``checkpoint``; ``job`` the method (or
    ``contrastive``) that was running.
    """

    def __init__(self, step: int, checkpoint: str | Path | None, job: str = "") -> None:
        self.step, self.checkpoint, self.job = int(step), checkpoint, job
        where = f" of {job}" if job else ""
        saved = f"checkpoint: {checkpoint}" if checkpoint else "nothing saved: it starts again"
        super().__init__(f"stopped on request after step {step}{where}; {saved}")

    def __reduce__(self) -> tuple:  # picklable (sent from rank 0 to the others), whatever ``args`` holds
        return (type(self), (self.step, self.checkpoint, self.job))


def stop_file(output_dir: str | Path) -> Path:
    """The file whose existence asks the run writing to ``output_dir`` to stop."""
    return Path(output_dir) / STOP_FILE_NAME


def request_stop(output_dir: str | Path | None = None) -> None:
    """Ask this process (and, with ``output_dir``, every worker of the run) to stop at the next step."""
    _requested.set()
    if output_dir is not None:
        path = stop_file(output_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def clear_stop_request(output_dir: str | Path) -> None:
    """Forget earlier stop requests: called when a run stopped on request (the request was honoured) and when
    a run finished (a request that came during its last step is void); never at start, where a ``STOP``
    file may be a scheduler's warning that arrived while the run was starting."""
    _requested.clear()
    stop_file(output_dir).unlink(missing_ok=True)


def stop_requested(output_dir: str | Path | None = None) -> bool:
    """True when this process received a stop signal or ``OUTPUT_DIR/STOP`` exists (local view)."""
    return _requested.is_set() or (output_dir is not None and stop_file(output_dir).exists())


def install_signal_handlers(output_dir: str | Path, signals: tuple[int, ...] = STOP_SIGNALS) -> bool:
    """Turn the first ``SIGUSR1``/``SIGTERM`` into a stop request; a repeated signal acts as usual.

    Only possible in the main thread (Ray Train runs its workers in other threads: they see the
    request through the ``STOP`` file). Returns False when not installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum: int, frame: FrameType | None) -> None:
        if _requested.is_set():  # second signal: behave as if we never caught it
            restore = previous[signum]
            signal.signal(signum, restore if restore is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        name = signal.Signals(signum).name
        print(f"dist-unlearn: {name} received; stopping after the current step with a checkpoint", flush=True)
        request_stop(output_dir)

    for sig in signals:
        signal.signal(sig, handler)
    global _installed
    _installed = (output_dir, signals)
    return True


_installed: tuple[str | Path, tuple[int, ...]] | None = None


def reinstall_signal_handlers() -> bool:
    """Install the stop handlers again if this process had installed them: starting Ray in a driver
    replaces the SIGTERM handler with Ray's own, which aborts the process. Returns True when done."""
    return _installed is not None and install_signal_handlers(*_installed)


def agree_to_stop(local: bool) -> bool:
    """True on every rank when any rank asks to stop (collective when a process group exists)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
