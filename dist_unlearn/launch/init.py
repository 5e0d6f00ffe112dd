"""``dist-unlearn init [DIR]``: write the example configs that ship with the package into ``DIR``.

The configs are package data (``dist_unlearn/launch/configs/``; the ``configs/`` directory of a checkout
links there), so a user of an installed wheel gets the same files a checkout has. ``DIR`` defaults to
``configs``, which makes the commands of the README work as written after ``dist-unlearn init``::

    dist-unlearn init
    dist-unlearn run configs/quickstart/unlearn.yaml

Existing files are never overwritten unless ``--force`` is given; each file is written to a temporary
name and renamed, so an interrupted ``init`` leaves no half-written config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_unlearn.io import write_bytes_atomic
from dist_unlearn.launch.submit import TEMPLATE_DIR

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_DIR = "configs"


class InitError(Exception):
    """A problem found before anything is written; the message names the fix."""


def shipped_configs() -> list[Path]:
    """The example configs that ship with the package, relative to :data:`CONFIG_DIR` (sorted)."""
    return sorted(path.relative_to(CONFIG_DIR) for path in CONFIG_DIR.rglob("*.yaml"))


def write_examples(dest: str | Path, force: bool = False) -> list[Path]:
    """Copy every shipped config to ``dest/<relative path>``; returns the written paths.

    Raises :class:`InitError` (and writes nothing) if any target exists and ``force`` is false, or if
    ``dest`` is a file.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise InitError(f"{dest} exists and is not a directory. Fix: pass another directory: dist-unlearn init DIR")
    files = shipped_configs()
    if not files:  # a broken installation, not a user error
        raise InitError(f"no example configs found in {CONFIG_DIR}. Fix: reinstall dist-unlearn")
    existing = [str(dest / rel) for rel in files if (dest / rel).exists()]
    if existing and not force:
        raise InitError(
            f"not overwriting {', '.join(existing)}. Fix: pass --force to overwrite, or write elsewhere: "
            f"dist-unlearn init DIR"
        )
    written = []
    for rel in files:
        written.append(write_bytes_atomic(dest / rel, (CONFIG_DIR / rel).read_bytes()))
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dist-unlearn init``."""
    parser.add_argument(
        "dir", nargs="?", default=DEFAULT_DIR, help=f"where to write the configs (default: {DEFAULT_DIR})"
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def run_init(args: argparse.Namespace) -> int:
    """``dist-unlearn init``: write the configs and print what was written and what to run next."""
    try:
        written = write_examples(args.dir, force=args.force)
    except InitError as exc:
        print(f"dist-unlearn init: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    quickstart = Path(args.dir) / "quickstart" / "unlearn.yaml"
    print(f"\nnext: dist-unlearn run {quickstart}")
    print(f"      dist-unlearn submit {quickstart} --dry-run")
    print(f"sbatch templates of submit (copy one and pass --template to change it): {TEMPLATE_DIR}")
    return 0
