"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Everything is first written to a temporary sibling (``NAME.tmp``, same directory, so the rename stays
on one file system) and then moved into place with :func:`os.replace`. A crash or kill leaves at most
the temporary sibling, which the next write removes; readers never see a half-written result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def staging_path(path: str | os.PathLike[str]) -> Path:
    """The temporary sibling that :func:`atomic_path` writes before renaming: ``NAME`` → ``NAME.tmp``."""
    final = Path(path)
    return final.with_name(final.name + ".tmp")


def move_into_place(staging: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Replace ``path`` (file or directory; removed first if it is a directory) by ``staging``."""
    final = Path(path)
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield the temporary sibling of ``path`` (:func:`staging_path`, cleared first) for the caller to
    write, as a file or a directory it creates; on normal exit it replaces ``path``.

    On an exception the temporary sibling is removed and ``path`` is left as it was. Single-process:
    under several ranks only the one that writes may enter (use :func:`staging_path` and
    :func:`move_into_place` around collective writes).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(final)
    _remove(staging)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    move_into_place(staging, final)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically; returns ``path``."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
