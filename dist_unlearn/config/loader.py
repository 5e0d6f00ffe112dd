"""Load a :class:`~dist_unlearn.config.schema.RunConfig`: read YAML, apply ``dotted.key=value`` overrides,
convert each field with pydantic (its type from :mod:`dist_unlearn.config.fields`, then its choices and
range), fill the defaults ``data.source``'s benchmark format brings for the fields the config leaves unset
(:data:`~dist_unlearn.config.schema.SOURCE_DEFAULTS`), then validate the whole config for its job kind
(:mod:`dist_unlearn.config.validate`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import operator
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from dist_unlearn.config.fields import Expect
from dist_unlearn.config.schema import SOURCE_DEFAULTS, RunConfig
from dist_unlearn.config.validate import ConfigError, Registries, config_problems

_INVALID = object()
_MOVED_KEYS = {"ray.max_failures": "failure.max_failures"}  # old dotted key -> new dotted key
_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "lt": ("<", operator.lt), "le": ("<=", operator.le)}
_adapter = functools.cache(TypeAdapter)  # the pydantic validator of a field type
_hints = functools.cache(lambda cls: typing.get_type_hints(cls, include_extras=True))  # with pydantic annotations


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    known_methods: Collection[str] | None = None,
    registries: Registries | None = None,
) -> RunConfig:
    """Read the YAML file at ``path``, apply ``overrides`` and return the validated config; relative paths
    resolve against the file's directory. ``registries`` (or just ``known_methods``, what ``method.names`` is
    checked against) serve the checks that need the layers above; without them those checks are skipped."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config path is not a file: {path}. Fix: pass the path of a YAML file")
    header = f"invalid config ({path}):"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError.of(header, [f"could not read the file as YAML: {exc}".rstrip()]) from exc
    if data is None:
        fix = "write the settings to use (`dist-unlearn init` writes examples), or write {} to run on every default"
        raise ConfigError.of(header, [f"{path} holds no settings. Fix: {fix}"])
    if not isinstance(data, Mapping):
        fix = "Fix: write sections such as 'train:' with their settings indented below"
        raise ConfigError.of(header, [f"expected a mapping of sections at the top level, got {_describe(data)}. {fix}"])
    return _build(apply_overrides(dict(data), overrides), path.parent.absolute(), registries, known_methods, header)


def config_from_dict(
    data: Mapping[str, Any],
    base_dir: Path | None = None,
    known_methods: Collection[str] | None = None,
    registries: Registries | None = None,
) -> RunConfig:
    """Validate a raw mapping (as read from YAML) and return the config, as :func:`load_config` does;
    relative paths are resolved against ``base_dir`` (default: the current directory)."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError.of(
            "invalid config:", [f"expected a mapping of sections at the top level, got {_describe(data)}"]
        )
    base = Path(base_dir).expanduser().absolute() if base_dir is not None else Path.cwd()
    return _build(data or {}, base, registries, known_methods, "invalid config:")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Return ``cfg`` as plain nested dicts and lists, suitable for JSON or YAML."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``dotted.key=value`` override applied (the value read as YAML: ``3``,
    ``true``, ``[a,b]``, ``null``), creating missing mappings; malformed overrides raise one ConfigError."""
    result: dict[str, Any] = copy.deepcopy(dict(data))
    problems = [problem for item in overrides if (problem := _apply_one(result, item))]
    if problems:
        raise ConfigError.of("invalid command-line override:", problems)
    return result


def _apply_one(result: dict[str, Any], item: str) -> str | None:
    """Apply one override in place; return a problem line, or None on success."""
    key, sep, raw = str(item).partition("=")
    parts = [part.strip() for part in key.strip().split(".")]
    if not sep or not all(parts):
        return (
            f"malformed override {item!r}: expected the form section.key=value, "
            "e.g. train.steps=30 or method.names=ga,npo"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
        return f"{'.'.join(parts)}: could not parse the value of override {item!r} ({first}). Fix: quote the value"
    if isinstance(value, (datetime.date, datetime.datetime)):
        value = raw.strip()  # keep date-like strings as typed, e.g. output.dir=2024-01-01
    node = result
    for depth, part in enumerate(parts[:-1]):
        child, where = node.get(part), ".".join(parts[: depth + 1])
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and _shorthand(parts[: depth + 1]):  # method.robust=sam, then method.robust.rho
            child = node[part] = {_shorthand(parts[: depth + 1]): child}
        elif not isinstance(child, dict):
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
        cls = _hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
    return getattr(cls, "shorthand", None)


def _build(
    data: Mapping[str, Any],
    base_dir: Path,
    registries: Registries | None,
    known_methods: Collection[str] | None,
    header: str,
) -> RunConfig:
    """Convert, check and resolve; raise one ConfigError with every problem found. The deep checks run
    only with ``registries`` (a worker re-reading a validated config passes none)."""
    problems: list[str] = []
    bad: set[str] = set()
    cfg = _convert_section(RunConfig, copy.deepcopy(dict(data)), "", problems, bad)
    _apply_source_defaults(cfg, data, bad)
    deep = registries is not None and not problems
    problems += config_problems(cfg, registries or Registries(methods=known_methods), base_dir, bad, deep)
    if problems:
        raise ConfigError.of(header, problems)
    return cfg


def _apply_source_defaults(cfg: RunConfig, data: Mapping[str, Any], bad: set[str]) -> None:
    """Set the :data:`~dist_unlearn.config.schema.SOURCE_DEFAULTS` of ``data.source``'s format (``tofu:...``)
    on each field the raw mapping ``data`` does not set; a field the user sets keeps its value."""
    if "data" in bad or "data.source" in bad or ":" not in cfg.data.source:
        return
    for dotted, value in SOURCE_DEFAULTS.get(cfg.data.source.split(":", 1)[0], {}).items():
        section, name = dotted.split(".")
        given = data.get(section)
        if not (isinstance(given, Mapping) and name in given):
            setattr(getattr(cfg, section), name, value)


def _convert_section(cls: type, raw: Any, dotted: str, problems: list[str], bad: set[str]) -> Any:
    """Build a section such as ``train`` or ``model.lora`` from a mapping (``null`` = every default);
    fields with problems keep their defaults, and a section that is no mapping is reported whole."""
    if raw is None or (getattr(cls, "shorthand", None) and isinstance(raw, str)):
        raw = {cls.shorthand: raw} if raw else {}  # e.g. method.robust=sam -> method.robust.name=sam
    if not isinstance(raw, Mapping):
        first = dataclasses.fields(cls)[0]
        indent = "" if "." in dotted else f"indent its settings below '{dotted}:' or "
        problems.append(
            f"{dotted}: expected a mapping of settings, got {_describe(raw)}. Fix: {indent}set them one by one, "
            f"e.g. {dotted}.{first.name}={_format(_example(first))}"
        )
        bad.add(dotted)
        return _INVALID
    valid = [fld.name for fld in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key in (key for key in raw if key not in valid):  # unknown keys, with a suggestion
        name = f"{dotted}.{key}" if dotted else str(key)
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f"; did you mean '{dotted + '.' if dotted else ''}{close[0]}'?" if close else "."
        moved = _MOVED_KEYS.get(name)
        problems.append(
            f"{name} has moved to {moved}. Fix: write {moved} instead"
            if moved
            else f"unknown key '{name}'{hint} Valid keys: {', '.join(valid)}"
        )
    for fld in (fld for fld in dataclasses.fields(cls) if fld.name in raw):
        name, hint = f"{dotted}.{fld.name}" if dotted else fld.name, _hints(cls)[fld.name]
        if dataclasses.is_dataclass(hint):
            value = _convert_section(hint, raw[fld.name], name, problems, bad)
        else:
            value = _convert_field(raw[fld.name], fld, hint, name, problems)
        if value is _INVALID:
            bad.add(name)
        else:
            kwargs[fld.name] = value
    return cls(**kwargs)


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


def _check_range(value: Any, fld: dataclasses.Field, dotted: str) -> str | None:
    """Return a problem line when a number is outside the bounds in the field's metadata."""
    bounds = [(sign, test, fld.metadata[key]) for key, (sign, test) in _BOUNDS.items() if key in fld.metadata]
    if all(test(value, bound) for _, test, bound in bounds):
        return None
    allowed = " and ".join(f"{sign} {bound}" for sign, _, bound in bounds)
    return f"{dotted}: must be {allowed}, got {value}. Fix: e.g. {dotted}={_format(_example(fld))}"


def _describe(value: Any) -> str:
    """``'abc' (str)`` style description of a value for messages."""
    if isinstance(value, (Mapping, list)):
        return f"a {type(value).__name__}"
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _example(fld: dataclasses.Field) -> Any:
    """The value used in 'e.g. key=value' hints: the field's ``example`` or its default (every field has one)."""
    if "example" in fld.metadata:
        return fld.metadata["example"]
    return fld.default_factory() if fld.default is dataclasses.MISSING else fld.default


def _format(value: Any) -> str:
    """Render a value the way it would be typed in a ``key=value`` override."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return ",".join(str(item) for item in value) if isinstance(value, list) else str(value)
