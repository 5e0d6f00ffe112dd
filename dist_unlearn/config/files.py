"""The files and directories a config names: each must exist (and be of the right kind) before any work,
and is made absolute in the config, since the workers of a Ray cluster run elsewhere.

Relative paths are resolved against the config file's directory, falling back to the current directory for
a path that exists only there (e.g. one given as an override); ``output.dir`` against the current directory
(where the user runs the command). A value that does not look like a local path (``org/name``) is taken as
a hub name. Each function yields one line per problem, naming the field and the fix; ``ok(field)`` tells
whether a field converted (the others are not judged).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from dist_unlearn.config.schema import EMBEDDED_MODEL, FICTITIOUS_SOURCE, HUB_DATA_PREFIX, SOURCE_FORMATS, RunConfig

_DATA_SUFFIXES = (".json", ".jsonl")
_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_FORMAT_HINTS = {
    "tofu": ("TOFU subset files such as forget10_perturbed.json and retain90.json", "locuslab/TOFU"),
    "muse": ("MUSE subset files such as raw/forget.txt and raw/retain1.txt", "muse-bench/MUSE-News"),
}


def is_formatted(source: str) -> bool:
    """True for a benchmark in its own format: ``tofu:...`` / ``muse:...``."""
    return ":" in source and source.split(":", 1)[0] in SOURCE_FORMATS


def check_files(cfg: RunConfig, base_dir: Path, ok: Callable[..., bool]) -> Iterator[str]:
    """``output.dir``, ``data.source``, ``deepspeed.config``, ``eval.oracle_dir``, ``eval.oracle_stats``,
    ``data.chat_template`` and ``model.path``."""
    if ok("output.dir"):
        cfg.output.dir = str(Path(cfg.output.dir).expanduser().resolve())
        existing = next(p for p in (Path(cfg.output.dir), *Path(cfg.output.dir).parents) if p.exists())
        if not existing.is_dir():
            yield (
                f"output.dir: {existing} is a file, so {cfg.output.dir} cannot be a directory. "
                "Fix: choose another output.dir"
            )
    if ok("data.source") and cfg.data.source != FICTITIOUS_SOURCE:
        check = _formatted_source if is_formatted(cfg.data.source) else _data_file
        problem, cfg.data.source = check(cfg.data.source, base_dir)
        yield from [problem] if problem else []
    if ok("deepspeed.config") and isinstance(cfg.deepspeed.config, str):
        problem, cfg.deepspeed.config = _deepspeed_file(cfg.deepspeed.config, base_dir)
        yield from [problem] if problem else []
    if ok("eval.oracle_dir") and cfg.eval.oracle_dir:
        oracle = _resolve(cfg.eval.oracle_dir, base_dir)
        if (oracle / "config.json").is_file():
            cfg.eval.oracle_dir = str(oracle)
        else:
            yield (
                f"eval.oracle_dir: {oracle} has no config.json. Fix: point it at a saved model directory trained "
                "without the forget set (the retrained / retain model), or leave it empty"
            )
    if ok("eval.oracle_stats") and cfg.eval.oracle_stats:
        yield from _oracle_stats(cfg, base_dir)
    if ok("data.chat_template") and cfg.data.chat_template:
        template = _resolve(cfg.data.chat_template, base_dir)
        if template.is_file():  # else template text (read by the data layer before any work)
            cfg.data.chat_template = str(template)
    if ok("model.path") and cfg.model.path != EMBEDDED_MODEL:
        path, fix = _resolve(cfg.model.path, base_dir), "Fix: give a local model directory, a hub name such as "
        what = _missing_local_dir(cfg.model.path, path, base_dir)
        if what:
            yield f"model.path: {what}: {path}. {fix}org/model-name, or use model.path={EMBEDDED_MODEL}"
        elif path.is_dir():
            cfg.model.path = str(path)


def check_pairs_files(cfg: RunConfig, base_dir: Path, ok: Callable[..., bool]) -> Iterator[str]:
    """``contrastive.data`` (a file, or a directory with ``train.jsonl``) and ``contrastive.dev_data`` (a file)
    exist; their rows are read by the deep checks (:mod:`dist_unlearn.config.validate`)."""
    c = cfg.contrastive
    fix = (
        "Fix: give a JSON Lines file of query/positive rows, a directory holding train.jsonl, "
        f"a datasets dataset as {HUB_DATA_PREFIX}NAME, or contrastive.data={FICTITIOUS_SOURCE}"
    )
    if ok("contrastive.data") and c.data != FICTITIOUS_SOURCE and not c.data.startswith(HUB_DATA_PREFIX):
        path = _resolve(c.data, base_dir)
        if path.is_dir() and not any((path / name).is_file() for name in ("train.jsonl", "train.parquet")):
            yield f"contrastive.data: {path} is a directory without train.jsonl. {fix}"
        elif not path.exists():
            yield f"contrastive.data: file not found: {path}. {fix}"
        else:
            c.data = str(path)
    if ok("contrastive.dev_data") and c.dev_data:
        path = _resolve(c.dev_data, base_dir)
        if c.data == FICTITIOUS_SOURCE:
            yield (
                "contrastive.dev_data: only used with a user contrastive.data file (the fictitious data holds out "
                "people by data.holdout_fraction). Fix: set contrastive.data, or leave contrastive.dev_data empty"
            )
        elif not path.is_file():
            yield f"contrastive.dev_data: file not found: {path}. Fix: give a JSON Lines file, or leave it empty"
        else:
            c.dev_data = str(path)


def _data_file(value: str, base_dir: Path) -> tuple[str | None, str]:
    """A local .json/.jsonl file of questions and answers; returns (problem, resolved path)."""
    path = _resolve(value, base_dir)
    fix = f"Fix: give a path to a local .json/.jsonl file, or use data.source={FICTITIOUS_SOURCE}"
    if not path.exists():
        return f"data.source: file not found: {path}. {fix}", value
    if not path.is_file():
        return f"data.source: not a file: {path}. {fix}", value
    if path.suffix.lower() not in _DATA_SUFFIXES:
        return f"data.source: expected a .json or .jsonl file, got {path}. {fix}", value
    return None, str(path)


def _formatted_source(value: str, base_dir: Path) -> tuple[str | None, str]:
    """``tofu:LOCATION[@FORGET]`` / ``muse:LOCATION``: a local-looking ``LOCATION`` must be a directory;
    anything else is taken as a hub dataset name. The files inside are read by the deep checks."""
    kind, rest = value.split(":", 1)
    location, at, forget = rest.partition("@")
    files, hub = _FORMAT_HINTS[kind]
    fix = f"Fix: give a directory of {files} (.json/.jsonl/.parquet), or a hub dataset name such as {hub}"
    if not location:
        return f"data.source: {value} names no location. {fix}", value
    path = _resolve(location, base_dir)
    what = _missing_local_dir(location, path, base_dir)
    if what:
        return f"data.source: {what}: {path} (in {value}). {fix}", value
    return None, f"{kind}:{path}{at}{forget}" if path.is_dir() else value


def _deepspeed_file(value: str, base_dir: Path) -> tuple[str | None, str]:
    """A DeepSpeed JSON file holding an object; returns (problem, resolved path)."""
    path = _resolve(value, base_dir)
    fix = "Fix: give a path to a DeepSpeed JSON file, or set deepspeed.config=null to use the built-in defaults"
    if not path.is_file():
        return f"deepspeed.config: file not found: {path}. {fix}", value
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"deepspeed.config: could not read {path} as JSON ({exc}). {fix}", value
    if not isinstance(content, dict):
        got = f"a {type(content).__name__}" if isinstance(content, list) else f"{content!r} ({type(content).__name__})"
        return f"deepspeed.config: {path} must hold a JSON object of DeepSpeed settings, got {got}. {fix}", value
    return None, str(path)


def _oracle_stats(cfg: RunConfig, base_dir: Path) -> Iterator[str]:
    """``eval.oracle_stats``: an existing file, and not together with ``eval.oracle_dir``."""
    if cfg.eval.oracle_dir:
        yield (
            "eval.oracle_stats: set together with eval.oracle_dir, but the reference is one or the other. "
            "Fix: keep eval.oracle_stats (the saved statistics) or eval.oracle_dir (the model), not both"
        )
    stats = _resolve(cfg.eval.oracle_stats, base_dir)
    if stats.is_file():
        cfg.eval.oracle_stats = str(stats)
    else:
        yield (
            f"eval.oracle_stats: file not found: {stats}. Fix: give the oracle_stats.json that dist-unlearn eval "
            "wrote with the oracle (OUTPUT/oracle_stats.json), or use eval.oracle_dir"
        )


def _missing_local_dir(value: str, path: Path, base_dir: Path) -> str | None:
    """For a ``value`` that looks like a local path but is no directory: what is wrong; else None (a
    directory, or a hub name)."""
    if path.is_dir():
        return None
    first = Path(value).parts[0] if Path(value).parts else value
    looks_local = (
        value.startswith(_LOCAL_PREFIXES)
        or value in (".", "..")
        or (base_dir / first).exists()
        or (Path.cwd() / first).exists()
    )
    if not looks_local:
        return None
    return "not a directory" if path.exists() else "directory not found"


def _resolve(value: str, base_dir: Path) -> Path:
    """Absolute path for ``value``: relative to ``base_dir``, or to the cwd if it exists only there."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return Path(os.path.normpath(path))
    candidate = Path(os.path.normpath(base_dir / path))
    if not candidate.exists():
        from_cwd = Path(os.path.normpath(Path.cwd() / path))
        if from_cwd.exists():
            return from_cwd
    return candidate
