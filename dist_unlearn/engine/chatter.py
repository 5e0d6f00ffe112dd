"""Quiet by default: what Ray, DeepSpeed, transformers and friends log goes to a file in the output
directory, and the console shows only the run's own progress bars, results and errors.

``dist-unlearn --verbose`` (or ``DIST_UNLEARN_VERBOSE=1``) leaves every library's logging as it is.
The setting travels to Ray workers and ``torchrun`` ranks through that environment variable, so the
driver and every worker agree.

Files: ``OUTPUT/logs/driver.log`` (the ``dist-unlearn`` process) and ``OUTPUT/logs/rank<R>.log``
(each worker). Ray's own processes keep their logs in the Ray session directory (``/tmp/ray/session_*``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from pathlib import Path

VERBOSE_ENV = "DIST_UNLEARN_VERBOSE"

LIBRARY_LOGGERS = (
    "ray",
    "DeepSpeed",  # deepspeed.utils.logger (also "Setting accelerator to CPU")
    "deepspeed",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "torch.distributed",
    "absl",  # rouge-score's "Using default tokenizer."
)
"""Logger names (and their children) whose records below ERROR go to the log file only."""

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Sink(logging.Handler):
    """Receives every library record: holds the last 10,000 until the log file is known (the output
    directory is only created once the config is valid), then writes each one to it."""

    def __init__(self) -> None:
        super().__init__()
        self.held: collections.deque[logging.LogRecord] = collections.deque(maxlen=10_000)
        self.target: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.target is None:
            self.held.append(record)
        else:
            self.target.handle(record)

    def set_target(self, target: logging.Handler) -> None:
        previous, self.target = self.target, target
        while self.held:
            target.handle(self.held.popleft())
        if previous is not None:
            previous.close()


_sink = _Sink()


def _is_library_record(record: logging.LogRecord) -> bool:
    name = record.name
    # Ray Train names some loggers by their file path
    return any(name == n or name.startswith(n + ".") for n in LIBRARY_LOGGERS) or "/ray/" in name


class _LibraryChatter(logging.Filter):
    """Writes each library record once to the sink; lets it reach the console only at ERROR and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_library_record(record):
            return True
        if not getattr(record, "_dist_unlearn_logged", False):
            record._dist_unlearn_logged = True
            _sink.handle(record)
        return record.levelno >= logging.ERROR


_FILTER = _LibraryChatter()


def set_verbose(verbose: bool) -> None:
    """Record the choice for this process and every process it starts."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def log_path(output_dir: str | Path, process: str) -> Path:
    """``OUTPUT/logs/<process>.log``, e.g. ``driver`` or ``rank0``."""
    return Path(output_dir) / "logs" / f"{process}.log"


def quiet_console() -> None:
    """Keep the libraries' records below ERROR off the console and send them to the log file.

    The filter sits on each library logger (records logged on it directly, whatever handlers the
    library adds later, e.g. DeepSpeed's own stdout handler) and on every handler that exists now,
    the root's and Python's last-resort handler included (records of child loggers reach the console
    only through those). Call it early, before the libraries log: the CLI does at start, Ray workers
    through their process set-up hook. Idempotent; nothing happens in verbose mode.
    """
    if is_verbose():
        return
    _quiet_transformers()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    loggers = [
        logging.getLogger(),
        *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    handlers = {h for logger in loggers for h in logger.handlers}
    for handler in [*handlers, logging.lastResort]:
        if handler is not None and handler is not _sink and _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def attach_log_file(log_file: Path) -> None:
    """From now on the library records of this process go to ``log_file`` (with those held so far).
    Nothing happens in verbose mode."""
    if is_verbose():
        return
    quiet_console()  # also covers handlers the libraries added since the last call
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(_FORMAT))
    _sink.set_target(to_file)


def _quiet_transformers() -> None:
    """transformers' own verbosity switch and its weight-loading / shard-writing progress bars."""
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
