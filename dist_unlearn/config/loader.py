"""Load, override, convert and validate a :class:`~dist_unlearn.config.schema.RunConfig`.

The flow is: read one YAML mapping, apply ``dotted.key=value`` overrides to the raw mapping, convert
each section into its dataclass (type checks, choices, ranges), then run the checks that need several
fields or the file system. Every problem becomes one line naming the dotted field and how to fix it;
all lines are raised together as a single :class:`ConfigError` before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import json
import math
import operator
import os
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from dist_unlearn.config.fields import Expect
from dist_unlearn.config.schema import EMBEDDED_MODEL, FICTITIOUS_SOURCE, RunConfig

_INVALID = object()
_DATA_SUFFIXES = (".json", ".jsonl")
_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


class ConfigError(ValueError):
    """An invalid configuration; the message has one line per problem.

    ``problems`` holds those lines without the ``invalid config`` header.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    known_methods: Collection[str] | None = None,
) -> RunConfig:
    """Read the YAML file at ``path``, apply ``overrides`` and return the validated config.

    Relative paths inside the config are resolved against the YAML file's directory (falling back
    to the current directory for a path that exists only there, e.g. one given as an override).
    ``known_methods``, when given, is the registry that ``method.names`` is checked against.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config path is not a file: {path}. Fix: pass the path of a YAML file")
    header = f"invalid config ({path}):"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problem = f"could not read the file as YAML: {exc}".rstrip()
        raise ConfigError(f"{header}\n{problem}", [problem]) from exc
    if data is None:
        problem = (
            f"{path} holds no settings. Fix: write the settings to use (`dist-unlearn init` writes "
            "examples), or write {} to run on every default"
        )
        raise ConfigError(f"{header}\n{problem}", [problem])
    if not isinstance(data, Mapping):
        problem = (
            f"expected a mapping of sections at the top level, got {_describe(data)}. "
            f"Fix: write sections such as 'train:' with their settings indented below"
        )
        raise ConfigError(f"{header}\n{problem}", [problem])
    data = apply_overrides(dict(data), overrides)
    return _build(data, path.parent.absolute(), known_methods, header)


def config_from_dict(
    data: Mapping[str, Any],
    base_dir: Path | None = None,
    known_methods: Collection[str] | None = None,
) -> RunConfig:
    """Validate a raw mapping (as read from YAML) and return the config.

    Relative paths are resolved against ``base_dir`` (default: the current directory).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problem = f"expected a mapping of sections at the top level, got {_describe(data)}"
        raise ConfigError(f"invalid config:\n{problem}", [problem])
    base = Path(base_dir).expanduser().absolute() if base_dir is not None else Path.cwd()
    return _build(data, base, known_methods, "invalid config:")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Return ``cfg`` as plain nested dicts and lists, suitable for JSON or YAML."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override applied.

    The value is parsed with ``yaml.safe_load`` (``3`` -> int, ``true`` -> bool, ``[a,b]`` -> list,
    ``null`` -> None); missing intermediate mappings are created. Malformed overrides raise one
    :class:`ConfigError` listing all of them.
    """
    result: dict[str, Any] = copy.deepcopy(dict(data))
    problems: list[str] = []
    for item in overrides:
        problem = _apply_one(result, item)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError("invalid command-line override:\n" + "\n".join(problems), problems)
    return result


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------


def _apply_one(result: dict[str, Any], item: str) -> str | None:
    """Apply one override in place; return a problem line, or None on success."""
    key, sep, raw = str(item).partition("=")
    parts = [part.strip() for part in key.strip().split(".")]
    if not sep or not all(parts):
        return (
            f"malformed override {item!r}: expected the form section.key=value, "
            f"e.g. train.steps=30 or method.names=ga,npo"
        )
    dotted = ".".join(parts)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
        return f"{dotted}: could not parse the value of override {item!r} ({first}). Fix: quote the value"
    if isinstance(value, (datetime.date, datetime.datetime)):
        value = raw.strip()  # keep date-like strings as typed, e.g. output.dir=2024-01-01
    node = result
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and _shorthand(parts[: depth + 1]):  # method.robust=sam, then method.robust.rho
            child = node[part] = {_shorthand(parts[: depth + 1]): child}
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            return (
                f"{where}: override {item!r} sets a key inside {where}, but {where} is "
                f"{_describe(child)}, not a mapping. Fix: drop the earlier setting of {where}"
            )
        node = child
    node[parts[-1]] = value
    return None


def _shorthand(parts: Sequence[str]) -> str | None:
    """The field that a plain string sets for the nested section at ``parts`` (its ``shorthand``), if any."""
    cls: Any = RunConfig
    for part in parts:
        hint = _hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if hint is None or not dataclasses.is_dataclass(hint):
            return None
        cls = hint
    return getattr(cls, "shorthand", None)


# ---------------------------------------------------------------------------------------------
# conversion into dataclasses
# ---------------------------------------------------------------------------------------------


def _build(
    data: Mapping[str, Any],
    base_dir: Path,
    known_methods: Collection[str] | None,
    header: str,
) -> RunConfig:
    """Convert, check and resolve; raise one ConfigError with every problem found."""
    problems: list[str] = []
    bad: set[str] = set()
    sections: dict[str, Any] = {}
    _report_unknown(data, RunConfig, "", problems)
    section_types = _hints(RunConfig)
    for fld in dataclasses.fields(RunConfig):
        section_cls = section_types[fld.name]
        raw = data.get(fld.name)
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            first = dataclasses.fields(section_cls)[0]
            example = f"{fld.name}.{first.name}={_format(_example(first))}"
            got = f"a {type(raw).__name__}" if isinstance(raw, list) else repr(raw)
            problems.append(
                f"{fld.name}: expected a mapping of settings, got {got}. "
                f"Fix: indent its settings below '{fld.name}:' or set them one by one, e.g. {example}"
            )
            bad.add(fld.name)
            raw = {}
        sections[fld.name] = _convert_section(section_cls, raw, fld.name, problems, bad)
    cfg = RunConfig(**sections)
    _check_cross_fields(cfg, problems, bad)
    _check_methods(cfg, known_methods, problems, bad)
    _check_paths(cfg, base_dir, problems, bad)
    if problems:
        raise ConfigError(header + "\n" + "\n".join(problems), problems)
    return cfg


def _convert_section(cls: type, raw: Mapping[str, Any], prefix: str, problems: list[str], bad: set[str]) -> Any:
    """Build one section dataclass from ``raw``; fields with problems keep their defaults."""
    _report_unknown(raw, cls, prefix, problems)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for fld in dataclasses.fields(cls):
        if fld.name not in raw:
            continue
        dotted = f"{prefix}.{fld.name}"
        if dataclasses.is_dataclass(hints[fld.name]):
            value = _convert_subsection(hints[fld.name], raw[fld.name], dotted, problems, bad)
        else:
            value = _convert_field(raw[fld.name], fld, hints[fld.name], dotted, problems)
        if value is _INVALID:
            bad.add(dotted)
        else:
            kwargs[fld.name] = value
    return cls(**kwargs)


def _convert_subsection(cls: type, raw: Any, dotted: str, problems: list[str], bad: set[str]) -> Any:
    """A nested section such as ``model.lora``: a mapping converted like a top-level section."""
    if raw is None:
        raw = {}
    shorthand = getattr(cls, "shorthand", None)
    if shorthand and isinstance(raw, str):  # e.g. method.robust=sam -> method.robust.name=sam
        raw = {shorthand: raw}
    if not isinstance(raw, Mapping):
        first = dataclasses.fields(cls)[0]
        problems.append(
            f"{dotted}: expected a mapping of settings, got {_describe(raw)}. Fix: set them one by one, "
            f"e.g. {dotted}.{first.name}={_format(_example(first))}"
        )
        bad.add(dotted)
        return _INVALID
    return _convert_section(cls, raw, dotted, problems, bad)


# keys that moved to another section: old dotted key -> new dotted key
_MOVED_KEYS = {"ray.max_failures": "failure.max_failures"}


def _report_unknown(raw: Mapping[str, Any], cls: type, prefix: str, problems: list[str]) -> None:
    """Add one problem per key of ``raw`` that is not a field of ``cls``, with a suggestion."""
    valid = [fld.name for fld in dataclasses.fields(cls)]
    for key in raw:
        if key in valid:
            continue
        name = str(key)
        dotted = f"{prefix}.{name}" if prefix else name
        if dotted in _MOVED_KEYS:
            problems.append(f"{dotted} has moved to {_MOVED_KEYS[dotted]}. Fix: write {_MOVED_KEYS[dotted]} instead")
            continue
        close = difflib.get_close_matches(name, valid, n=1)
        hint = "."
        if close:
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
        problems.append(f"unknown key '{dotted}'{hint} Valid keys: {', '.join(valid)}")


def _convert_field(value: Any, fld: dataclasses.Field, hint: Any, dotted: str, problems: list[str]) -> Any:
    """Convert one value with pydantic, then check its choices and range; return _INVALID on a problem."""
    try:
        converted = _adapter(hint).validate_python(value)
    except ValidationError as exc:
        expect = next(meta for meta in typing.get_args(hint) if isinstance(meta, Expect))
        problems.append(
            f"{dotted}: expected {expect.expected}, {_got(exc, value)}. "
            f"Fix: set {dotted} to {expect.fix}, e.g. {dotted}={_format(_example(fld))}"
        )
        return _INVALID
    problem = _check_choice(converted, fld, dotted) or _check_range(converted, fld, dotted)
    if problem:
        problems.append(problem)
        return _INVALID
    return converted


@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    """The pydantic validator of a field type of :mod:`dist_unlearn.config.fields`."""
    return TypeAdapter(hint)


def _got(exc: ValidationError, value: Any) -> str:
    """The "got ..." part of a type error: the value, or the part of it that is wrong."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "finite_number":
        return f"got {first['input']} (not a finite number)"
    if any(error["loc"] and error["loc"][-1] == "[key]" for error in errors):
        return "got a mapping with a non-string key"
    if len(errors) == 1 and len(first["loc"]) == 1:  # one item of a list, or one method's parameters
        where = first["loc"][0]
        if isinstance(where, int):
            return f"got {_describe(first['input'])} at position {where}"
        return f"got {_describe(first['input'])} for method '{where}' instead of a mapping"
    return f"got {_describe(value)}"


def _check_choice(value: Any, fld: dataclasses.Field, dotted: str) -> str | None:
    """Return a problem line when ``value`` (or an item of a list) is not one of the field's ``choices``."""
    choices = fld.metadata.get("choices")
    wrong = [item for item in (value if isinstance(value, list) else [value]) if item not in (choices or [item])]
    if not wrong:
        return None
    if all(isinstance(c, int) for c in choices):
        allowed = ", ".join(str(c) for c in choices[:-1]) + f" or {choices[-1]}"
        return f"{dotted}: must be {allowed}, got {value}. Fix: e.g. {dotted}={_format(_example(fld))}"
    close = difflib.get_close_matches(str(wrong[0]), [str(c) for c in choices], n=1)
    fix = f"did you mean {dotted}={close[0]}?" if close else f"e.g. {dotted}={_format(_example(fld))}"
    if isinstance(value, list):
        fix = f"choose from {', '.join(choices)}" + (f" (did you mean '{close[0]}'?)" if close else "")
    return f"{dotted}: {wrong[0]!r} is not one of {', '.join(choices)}. Fix: {fix}"


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "lt": ("<", operator.lt), "le": ("<=", operator.le)}


def _check_range(value: Any, fld: dataclasses.Field, dotted: str) -> str | None:
    """Return a problem line when a number is outside the bounds in the field's metadata."""
    bounds = [(sign, test, fld.metadata[key]) for key, (sign, test) in _BOUNDS.items() if key in fld.metadata]
    if all(test(value, bound) for _, test, bound in bounds):
        return None
    allowed = " and ".join(f"{sign} {bound}" for sign, _, bound in bounds)
    return f"{dotted}: must be {allowed}, got {value}. Fix: e.g. {dotted}={_format(_example(fld))}"


def _hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a schema dataclass, with their pydantic annotations."""
    return typing.get_type_hints(cls, include_extras=True)


# ---------------------------------------------------------------------------------------------
# checks across fields, against the method registry, and on the file system
# ---------------------------------------------------------------------------------------------


def _check_cross_fields(cfg: RunConfig, problems: list[str], bad: set[str]) -> None:
    """Checks that involve more than one field."""
    _check_quantization(cfg, problems, bad)
    _check_saliency_and_continual(cfg, problems, bad)
    data = cfg.data
    if not bad & {"data", "data.forget_fraction", "data.holdout_fraction"}:
        total = data.forget_fraction + data.holdout_fraction
        if total >= 1.0:
            problems.append(
                f"data.forget_fraction + data.holdout_fraction must be < 1 so that retain data is left, "
                f"got {data.forget_fraction} + {data.holdout_fraction} = {total:g}. "
                f"Fix: lower one of them, e.g. data.forget_fraction=0.1 data.holdout_fraction=0.1"
            )
    prep = cfg.prepare
    if not bad & {"prepare", "prepare.hidden_size", "prepare.num_heads"} and prep.hidden_size % prep.num_heads:
        problems.append(
            f"prepare.hidden_size ({prep.hidden_size}) must be divisible by prepare.num_heads "
            f"({prep.num_heads}). Fix: e.g. prepare.hidden_size={prep.num_heads * 32}"
        )
    _check_batches_divide(cfg, problems, bad)


def _global_batches(cfg: RunConfig) -> list[tuple[str, int, int]]:
    """The global batches the job kind splits evenly across workers: ``(field, size, smallest allowed)``."""
    if cfg.job.kind == "contrastive":
        return [("contrastive.global_batch_size", cfg.contrastive.global_batch_size, 1)]
    return [
        ("train.forget_batch_size", cfg.train.forget_batch_size, 1),
        ("train.retain_batch_size", cfg.train.retain_batch_size, 0),
    ]


def _check_batches_divide(cfg: RunConfig, problems: list[str], bad: set[str]) -> None:
    """Each global batch the job reads is split evenly across ``ray.num_workers`` (the settings of other
    job kinds are not checked: a contrastive job never reads ``train.forget_batch_size``)."""
    if bad & {"job", "job.kind", "ray", "ray.num_workers", "train", "contrastive"}:
        return
    batches = _global_batches(cfg)
    if bad & {name for name, _, _ in batches}:
        return
    workers = cfg.ray.num_workers
    shared = math.gcd(*(size for _, size, _ in batches))
    for name, batch, min_batch in batches:
        if batch % workers == 0:
            continue
        lower = batch // workers * workers
        sizes = [str(size) for size in (lower, lower + workers) if size >= min_batch]
        worker_options = _nearest_divisors(shared, workers)
        problems.append(
            f"{name} ({batch}) must be divisible by ray.num_workers ({workers}): it is the global "
            f"batch, split evenly across workers. Fix: set {name} to {' or '.join(sizes)}, "
            f"or set ray.num_workers to {' or '.join(str(w) for w in worker_options)}"
        )


def _check_quantization(cfg: RunConfig, problems: list[str], bad: set[str]) -> None:
    """Quantized base weights are frozen (LoRA needed); 8-bit weights are refused under ZeRO-3."""
    if bad & {"model", "model.quantization"} or cfg.model.quantization == "none":
        return
    quant = cfg.model.quantization
    if quant == "int8" and not bad & {"deepspeed", "deepspeed.zero_stage"} and cfg.deepspeed.zero_stage == 3:
        problems.append(
            "model.quantization=int8 with deepspeed.zero_stage=3: 8-bit base weights with ZeRO-3 are reported "
            "to train badly (ZeRO-3 cannot partition the int8 weights and their scales). "
            "Fix: use model.quantization=nf4 or deepspeed.zero_stage=2"
        )
    if not bad & {"model.lora", "model.lora.r"} and cfg.model.lora.r == 0:
        problems.append(
            f"model.quantization={quant} needs LoRA adapters: quantized base weights are frozen: set "
            f"model.lora.r, e.g. model.lora.r=8 (or use model.quantization=none)"
        )


def _check_saliency_and_continual(cfg: RunConfig, problems: list[str], bad: set[str]) -> None:
    """A saliency mask needs no weight decay (AdamW would still shrink the masked-out weights); continual
    requests train LoRA adapters (``model.lora.r > 0``) under ZeRO 0-2 (the orthogonality penalty reads
    whole adapter matrices, which ZeRO-3 partitions)."""
    saliency_fields = {"method", "method.saliency", "train", "train.weight_decay"}
    if not bad & saliency_fields and cfg.method.saliency < 1.0 and cfg.train.weight_decay > 0.0:
        problems.append(
            f"method.saliency={cfg.method.saliency:g} with train.weight_decay={cfg.train.weight_decay:g}: "
            "AdamW's decoupled weight decay would also change the weights outside the saliency mask. "
            "Fix: set train.weight_decay=0 (or method.saliency=1)"
        )
    _check_robust(cfg, problems, bad)
    if bad & {"job", "job.kind"} or cfg.job.kind != "continual":
        return
    if not bad & {"model.lora", "model.lora.r"} and cfg.model.lora.r == 0:
        problems.append(
            "job.kind=continual trains one LoRA adapter per forget request: set model.lora.r. Fix: e.g. model.lora.r=8"
        )
    if not bad & {"deepspeed", "deepspeed.zero_stage"} and cfg.deepspeed.zero_stage == 3:
        problems.append(
            "job.kind=continual with deepspeed.zero_stage=3: the adapter orthogonality penalty needs whole LoRA "
            "matrices, which ZeRO-3 partitions. Fix: deepspeed.zero_stage=2 (adapters are small)"
        )


def _check_robust(cfg: RunConfig, problems: list[str], bad: set[str]) -> None:
    """``method.robust=sure`` sets the saliency fraction itself and needs no weight decay; robustness is
    implemented for ``job.kind=unlearn`` only."""
    if bad & {"method", "method.robust", "method.robust.name"} or cfg.method.robust.name == "none":
        return
    name = cfg.method.robust.name
    if not bad & {"job", "job.kind"} and cfg.job.kind != "unlearn":
        problems.append(
            f"method.robust={name} with job.kind={cfg.job.kind}: robustness options apply to job.kind=unlearn "
            "only. Fix: method.robust=none (or job.kind=unlearn)"
        )
    if name != "sure":
        return
    if not bad & {"method.saliency"} and cfg.method.saliency < 1.0:
        problems.append(
            f"method.saliency={cfg.method.saliency:g} with method.robust=sure: SURE sets the saliency fraction "
            "itself (method.robust.fraction). Fix: method.saliency=1 and method.robust.fraction="
            f"{cfg.method.saliency:g}"
        )
    if not bad & {"train", "train.weight_decay"} and cfg.train.weight_decay > 0.0:
        problems.append(
            f"method.robust=sure with train.weight_decay={cfg.train.weight_decay:g}: AdamW's decoupled weight "
            "decay would also change the weights outside SURE's saliency mask. Fix: set train.weight_decay=0"
        )


def _nearest_divisors(number: int, target: int) -> list[int]:
    """The divisors of ``number`` closest to ``target`` from below and from above."""
    divisors: set[int] = set()
    for candidate in range(1, math.isqrt(number) + 1):
        if number % candidate == 0:
            divisors.update((candidate, number // candidate))
    below = [d for d in divisors if d < target]
    above = [d for d in divisors if d > target]
    return ([max(below)] if below else []) + ([min(above)] if above else [])


def _check_methods(cfg: RunConfig, known_methods: Collection[str] | None, problems: list[str], bad: set[str]) -> None:
    """``method.names`` must be non-empty, unique and registered; params only for listed methods."""
    method = cfg.method
    if bad & {"method", "method.names"}:
        return
    if not method.names:
        problems.append("method.names: must name at least one method. Fix: e.g. method.names=grad_diff")
        return
    known = sorted(known_methods) if known_methods is not None else None
    seen: set[str] = set()
    for name in method.names:
        if name in seen:
            problems.append(f"method.names: '{name}' is listed twice. Fix: list each method once")
        seen.add(name)
        if known is not None and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            problems.append(f"method.names: unknown method '{name}'{hint} Known methods: {', '.join(known)}")
    if "method.params" in bad or known is None:
        return  # without the registry (e.g. a worker re-reading a validated config) the names cannot be judged
    # parameters for a known method that is not run are kept (a config may carry settings for several
    # methods and the command line pick some) and checked like the others (engine/validate.py); a name
    # that is no method at all is a typo
    for name in method.params:
        if name in method.names or (known is not None and name in known):
            continue
        close = difflib.get_close_matches(name, known or method.names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        problems.append(
            f"method.params.{name}: parameters given for '{name}', which is neither in method.names "
            f"({', '.join(method.names)}) nor a known method.{hint} "
            f"Fix: correct the name or remove method.params.{name}"
        )


def _check_paths(cfg: RunConfig, base_dir: Path, problems: list[str], bad: set[str]) -> None:
    """Check the files named in the config and store them as absolute paths.

    ``output.dir`` is made absolute against the current directory (where the user runs the command),
    since workers of a Ray cluster run elsewhere.
    """
    if not bad & {"output", "output.dir"}:
        cfg.output.dir = str(Path(cfg.output.dir).expanduser().resolve())
        existing = next(p for p in (Path(cfg.output.dir), *Path(cfg.output.dir).parents) if p.exists())
        if not existing.is_dir():
            problems.append(
                f"output.dir: {existing} is a file, so {cfg.output.dir} cannot be a directory. "
                "Fix: choose another output.dir"
            )
    formatted = cfg.data.source.split(":", 1)[0] in ("tofu", "muse")  # dist_unlearn.data.formats
    if not bad & {"data", "data.source"} and cfg.data.source != FICTITIOUS_SOURCE and not formatted:
        path = _resolve(cfg.data.source, base_dir)
        fix = f"Fix: give a path to a local .json/.jsonl file, or use data.source={FICTITIOUS_SOURCE}"
        if not path.exists():
            problems.append(f"data.source: file not found: {path}. {fix}")
        elif not path.is_file():
            problems.append(f"data.source: not a file: {path}. {fix}")
        elif path.suffix.lower() not in _DATA_SUFFIXES:
            problems.append(f"data.source: expected a .json or .jsonl file, got {path}. {fix}")
        else:
            cfg.data.source = str(path)
    elif not bad & {"data", "data.source"} and formatted:
        problem, resolved = _check_formatted_source(cfg.data.source, base_dir)
        if problem:
            problems.append(problem)
        else:
            cfg.data.source = resolved
    if not bad & {"deepspeed", "deepspeed.config"} and isinstance(cfg.deepspeed.config, str):
        problem, resolved = _check_deepspeed_file(cfg.deepspeed.config, base_dir)
        if problem:
            problems.append(problem)
        else:
            cfg.deepspeed.config = resolved
    if not bad & {"eval", "eval.oracle_dir"} and cfg.eval.oracle_dir:
        oracle = _resolve(cfg.eval.oracle_dir, base_dir)
        if (oracle / "config.json").is_file():
            cfg.eval.oracle_dir = str(oracle)
        else:
            problems.append(
                f"eval.oracle_dir: {oracle} has no config.json. Fix: point it at a saved model directory trained "
                "without the forget set (the retrained / retain model), or leave it empty"
            )
    _check_oracle_stats(cfg, base_dir, problems, bad)
    if not bad & {"data", "data.chat_template"} and cfg.data.chat_template:
        template = _resolve(cfg.data.chat_template, base_dir)
        if template.is_file():  # else template text (checked by the data layer before any work)
            cfg.data.chat_template = str(template)
    if not bad & {"model", "model.path"} and cfg.model.path != EMBEDDED_MODEL:
        problem, resolved = _check_model_path(cfg.model.path, base_dir)
        if problem:
            problems.append(problem)
        else:
            cfg.model.path = resolved
    if cfg.job.kind == "contrastive" and not bad & {"contrastive", "job", "job.kind"}:
        _check_pairs_paths(cfg, base_dir, problems, bad)


def _check_pairs_paths(cfg: RunConfig, base_dir: Path, problems: list[str], bad: set[str]) -> None:
    """``contrastive.data`` (a file or a directory with ``train.jsonl``) and ``contrastive.dev_data`` (a file)
    must exist; both are made absolute. Their rows are checked by ``dist_unlearn.engine.validate``."""
    c = cfg.contrastive
    fix = (
        "Fix: give a JSON Lines file of query/positive rows, a directory holding train.jsonl, "
        f"or contrastive.data={FICTITIOUS_SOURCE}"
    )
    if "contrastive.data" not in bad and c.data != FICTITIOUS_SOURCE:
        path = _resolve(c.data, base_dir)
        if path.is_dir() and not any((path / name).is_file() for name in ("train.jsonl", "train.parquet")):
            problems.append(f"contrastive.data: {path} is a directory without train.jsonl. {fix}")
        elif not path.exists():
            problems.append(f"contrastive.data: file not found: {path}. {fix}")
        else:
            c.data = str(path)
    if "contrastive.dev_data" not in bad and c.dev_data:
        path = _resolve(c.dev_data, base_dir)
        if c.data == FICTITIOUS_SOURCE:
            problems.append(
                "contrastive.dev_data: only used with a user contrastive.data file (the fictitious data holds out "
                "people by data.holdout_fraction). Fix: set contrastive.data, or leave contrastive.dev_data empty"
            )
        elif not path.is_file():
            problems.append(
                f"contrastive.dev_data: file not found: {path}. Fix: give a JSON Lines file, or leave it empty"
            )
        else:
            c.dev_data = str(path)


def _check_oracle_stats(cfg: RunConfig, base_dir: Path, problems: list[str], bad: set[str]) -> None:
    """``eval.oracle_stats``: an existing file (made absolute), and not together with ``eval.oracle_dir``."""
    if bad & {"eval", "eval.oracle_stats"} or not cfg.eval.oracle_stats:
        return
    if cfg.eval.oracle_dir:
        problems.append(
            "eval.oracle_stats: set together with eval.oracle_dir, but the reference is one or the other. "
            "Fix: keep eval.oracle_stats (the saved statistics) or eval.oracle_dir (the model), not both"
        )
    stats = _resolve(cfg.eval.oracle_stats, base_dir)
    if stats.is_file():
        cfg.eval.oracle_stats = str(stats)
    else:
        problems.append(
            f"eval.oracle_stats: file not found: {stats}. Fix: give the oracle_stats.json that dist-unlearn eval "
            "wrote with the oracle (OUTPUT/oracle_stats.json), or use eval.oracle_dir"
        )


_FORMAT_HINTS = {
    "tofu": ("TOFU subset files such as forget10_perturbed.json and retain90.json", "locuslab/TOFU"),
    "muse": ("MUSE subset files such as raw/forget.txt and raw/retain1.txt", "muse-bench/MUSE-News"),
}


def _check_formatted_source(value: str, base_dir: Path) -> tuple[str | None, str]:
    """``tofu:LOCATION[@FORGET]`` / ``muse:LOCATION``: a local-looking ``LOCATION`` must be a directory
    (made absolute, since workers may run elsewhere); anything else is taken as a hub dataset name.
    The files inside are checked by :func:`dist_unlearn.engine.validate.validate_run`."""
    kind, rest = value.split(":", 1)
    location, at, forget = rest.partition("@")
    files, hub = _FORMAT_HINTS[kind]
    fix = f"Fix: give a directory of {files} (.json/.jsonl/.parquet), or a hub dataset name such as {hub}"
    if not location:
        return f"data.source: {value} names no location. {fix}", value
    path = _resolve(location, base_dir)
    if path.is_dir():
        return None, f"{kind}:{path}{at}{forget}"
    first = Path(location).parts[0] if Path(location).parts else location
    looks_local = (
        location.startswith(_LOCAL_PREFIXES)
        or location in (".", "..")
        or (base_dir / first).exists()
        or (Path.cwd() / first).exists()
    )
    if not looks_local:
        return None, value
    what = "not a directory" if path.exists() else "directory not found"
    return f"data.source: {what}: {path} (in {value}). {fix}", value


def _check_deepspeed_file(value: str, base_dir: Path) -> tuple[str | None, str]:
    """Validate a DeepSpeed JSON path; return (problem, resolved path)."""
    path = _resolve(value, base_dir)
    fix = "Fix: give a path to a DeepSpeed JSON file, or set deepspeed.config=null to use the built-in defaults"
    if not path.is_file():
        return f"deepspeed.config: file not found: {path}. {fix}", str(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"deepspeed.config: could not read {path} as JSON ({exc}). {fix}", str(path)
    if not isinstance(content, dict):
        return (
            f"deepspeed.config: {path} must hold a JSON object of DeepSpeed settings, got {_describe(content)}. {fix}",
            str(path),
        )
    return None, str(path)


def _check_model_path(value: str, base_dir: Path) -> tuple[str | None, str]:
    """A local-looking model path must be a directory; anything else is taken as a hub name."""
    path = _resolve(value, base_dir)
    if path.is_dir():
        return None, str(path)
    first = Path(value).parts[0] if Path(value).parts else value
    looks_local = (
        value.startswith(_LOCAL_PREFIXES)
        or value in (".", "..")
        or (base_dir / first).exists()
        or (Path.cwd() / first).exists()
    )
    if not looks_local:
        return None, value
    what = "not a directory" if path.exists() else "directory not found"
    return (
        f"model.path: {what}: {path}. Fix: give a local model directory, a hub name such as "
        f"org/model-name, or use model.path={EMBEDDED_MODEL}",
        value,
    )


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


# ---------------------------------------------------------------------------------------------
# formatting helpers
# ---------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """``'abc' (str)`` style description of a value for messages."""
    if isinstance(value, (Mapping, list)):
        return f"a {type(value).__name__}"
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"


def _example(fld: dataclasses.Field) -> Any:
    """The value used in 'e.g. key=value' hints: the field's ``example`` or its default."""
    if "example" in fld.metadata:
        return fld.metadata["example"]
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return "..."


def _format(value: Any) -> str:
    """Render a value the way it would be typed in a ``key=value`` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)
