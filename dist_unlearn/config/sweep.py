"""Search spaces of ``dist-unlearn sweep``: parsing, checking, trial overrides (no Ray, no engine).

A space maps dotted config keys (exactly the ``key`` of a ``key=value`` override) to the values to try::

    sweep:
      space:
        train.lr: loguniform(1e-5, 1e-3)          # or {loguniform: [1.0e-5, 1.0e-3]}
        method.params.npo.beta: [0.05, 0.1]       # a list: every value (a grid)
        method.retain_weight: uniform(1, 5)
        train.steps: choice(10, 20)               # one value at random per sample
        train.seed: randint(0, 9)                 # an integer in [0, 9], both ends included

or on the command line, ``'sweep.space.train.lr=loguniform(1e-5,1e-3)'`` (nested keys, as the override
creates them, are flattened back into dotted keys). Trials = ``sweep.num_samples`` × the grid's size (Ray
Tune's rule: the random dimensions are sampled anew for each trial).

:func:`parse_space` checks the syntax; :func:`check_space` runs every value of a list (the ends of a
range) through the caller's full validation of a run config, so a key that does not exist, a value of
the wrong type or out of range fails before any trial starts, as one line per problem naming
``sweep.space.KEY`` and the fix.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from dist_unlearn.config.schema import RunConfig
from dist_unlearn.config.validate import ConfigError

GRID, CHOICE, UNIFORM, LOGUNIFORM, RANDINT = "grid", "choice", "uniform", "loguniform", "randint"
DISTRIBUTIONS = (GRID, CHOICE, UNIFORM, LOGUNIFORM, RANDINT)
RANGES = (UNIFORM, LOGUNIFORM, RANDINT)
FIXED_SECTIONS = ("job", "data", "prepare", "ray", "failure", "eval", "output", "sweep")
"""Sections that are the same in every trial: the data and evaluation every trial (and the target's
utility) is measured on, where trials run and where they write."""
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)
_EXPONENT = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+\s*$")
_EXAMPLE = "sweep.space.train.lr=loguniform(1e-5,1e-3)"


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` is a :data:`DISTRIBUTIONS` name; ``values`` the listed values (grid,
    choice) or ``(low, high)`` (uniform, loguniform, randint with both ends included)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def candidates(self) -> tuple[Any, ...]:
        """The values a trial can get that are checked before the sweep: every listed value, or both ends."""
        return self.values

    def describe(self) -> str:
        """The dimension as typed, e.g. ``loguniform(1e-05, 0.001)`` or ``[0.05, 0.1]``."""
        if self.kind == GRID:
            return "[" + ", ".join(format_value(v) for v in self.values) + "]"
        return f"{self.kind}(" + ", ".join(format_value(v) for v in self.values) + ")"


def grid_size(dims: Sequence[Dimension]) -> int:
    """How many grid points the lists span (1 without lists)."""
    return math.prod(len(d.values) for d in dims if d.kind == GRID)


def trial_count(dims: Sequence[Dimension], num_samples: int) -> int:
    """Trials a sweep runs: ``num_samples`` per grid point."""
    return grid_size(dims) * num_samples


# --- parsing ----------------------------------------------------------------------------------------


def parse_space(space: Mapping[str, Any]) -> list[Dimension]:
    """The dimensions of ``sweep.space`` (flat dotted keys or nested mappings); raises one
    :class:`ConfigError` with every syntax problem."""
    problems: list[str] = []
    dims: list[Dimension] = []
    # a key given flat in the file and nested by an override (sweep.space.train.lr=...): the later one, the
    # override, wins, as overrides do
    for key, spec in dict(_flatten(space)).items():
        dim, problem = _parse_one(key, spec)
        if problem:
            problems.append(problem)
        elif dim is not None:
            dims.append(dim)
    if not problems and not dims:
        problems.append(f"sweep.space is empty: nothing to search. Fix: name a key and its values, e.g. {_EXAMPLE}")
    if problems:
        raise sweep_error(problems)
    return dims


def sweep_error(problems: Sequence[str]) -> ConfigError:
    """A :class:`ConfigError` for sweep problems: one line when there is one problem."""
    if len(problems) == 1:
        return ConfigError(f"invalid sweep: {problems[0]}", list(problems))
    return ConfigError("invalid sweep:\n" + "\n".join(problems), list(problems))


def _is_spec(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return True
    if isinstance(value, str):
        return _CALL.match(value) is not None
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _flatten(space: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in space.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not _is_spec(value):
            out += _flatten(value, f"{dotted}.")
        else:
            out.append((dotted, value))
    return out


def _parse_one(key: str, spec: Any) -> tuple[Dimension | None, str | None]:
    where = f"sweep.space.{key}"
    section = key.split(".", 1)[0]
    if section in FIXED_SECTIONS:
        return None, (
            f"{where}: {section}.* is the same in every trial (the data, the evaluation every trial and the "
            f"target's utility are measured with, where trials run and write). Fix: set {key} in the config or as "
            f"{key}=VALUE, and search keys of method, train, model or deepspeed"
        )
    if key == "model.path":
        return None, f"{where}: every trial unlearns the same model. Fix: set model.path in the config"
    if isinstance(spec, (list, tuple)):
        kind, args = GRID, list(spec)
    elif isinstance(spec, str) and _CALL.match(spec):
        match = _CALL.match(spec)
        assert match is not None
        kind, args = match.group(1), _call_args(match.group(2))
        if args is None:
            return None, f"{where}: could not read the values of {spec!r}. Fix: write e.g. {kind}(1e-5, 1e-3)"
    elif isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        kind, raw = next(iter(spec.items()))
        if not isinstance(raw, (list, tuple)):
            return None, f"{where}: {kind} takes a list of values, got {raw!r}. Fix: e.g. {key}: {{{kind}: [1, 2]}}"
        args = list(raw)
    else:
        return None, (
            f"{where}: {_describe(spec)} is no search space. Fix: list the values to try, e.g. {where}=[a,b], or use "
            f"choice(...), uniform(lo,hi), loguniform(lo,hi), randint(lo,hi); a single value belongs in the config "
            f"({key}=VALUE)"
        )
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(kind, DISTRIBUTIONS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(DISTRIBUTIONS)}"
        return None, f"{where}: unknown distribution '{kind}'. Fix: {hint}"
    args = [_number_from_text(a) for a in args]
    if kind in (GRID, CHOICE):
        if not args:
            return None, f"{where}: an empty list has no value to try. Fix: list at least one value, e.g. {where}=[a,b]"
        return Dimension(key, kind, tuple(args)), None
    return _parse_range(key, kind, args)


def _parse_range(key: str, kind: str, args: list[Any]) -> tuple[Dimension | None, str | None]:
    where = f"sweep.space.{key}"
    example = {UNIFORM: "uniform(0.5, 2)", LOGUNIFORM: "loguniform(1e-5, 1e-3)", RANDINT: "randint(0, 9)"}[kind]
    if len(args) != 2:
        return None, f"{where}: {kind} takes two values (low, high), got {len(args)}. Fix: e.g. {example}"
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    if kind == RANDINT and not (numeric and all(float(a).is_integer() for a in args)):
        return None, f"{where}: randint takes two integers, got {_args_text(args)}. Fix: e.g. {example}"
    if not numeric:
        return None, f"{where}: {kind} takes two numbers, got {_args_text(args)}. Fix: e.g. {example}"
    low, high = (int(a) for a in args) if kind == RANDINT else (float(a) for a in args)
    if low >= high:
        fix = f"{kind}({format_value(high)}, {format_value(low)})" if low > high else f"{key}={format_value(low)}"
        got = f"low {format_value(low)}, high {format_value(high)}"
        return None, f"{where}: {kind} needs low < high, got {got}. Fix: {fix}"
    if kind == LOGUNIFORM and low <= 0:
        return None, f"{where}: loguniform needs low > 0, got {format_value(low)}. Fix: e.g. {example}"
    return Dimension(key, kind, (low, high)), None


def _call_args(text: str) -> list[Any] | None:
    if not text.strip():
        return []
    try:
        value = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError:
        return None
    return list(value) if isinstance(value, list) else None


def _number_from_text(value: Any) -> Any:
    """PyYAML reads ``1e-5`` (an exponent without a dot) as a string: make it the number it means."""
    if isinstance(value, str) and _EXPONENT.match(value):
        return float(value)
    return value


def _args_text(args: Sequence[Any]) -> str:
    return ", ".join(repr(a) for a in args)


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping" if value else "an empty mapping"
    return f"the single value {value!r}"


# --- checking against the run config -----------------------------------------------------------------


def check_space(
    dims: Sequence[Dimension],
    base: RunConfig,
    base_dict: Mapping[str, Any],
    validate: Callable[[dict[str, Any]], Any],
) -> None:
    """Check the sweep against the run config before any trial: the sweep section's own rules, then every
    candidate value of every dimension applied alone to ``base_dict`` and passed to ``validate`` (the CLI's
    full validation: schema, method parameters, evaluation). Raises one :class:`ConfigError`."""
    problems = _sweep_rules(dims, base)
    for dim in dims:
        seen: set[str] = set()  # a problem every value has (an unknown key) is told once
        for value in dim.candidates():
            data = apply_overrides(base_dict, {dim.key: value})
            try:
                validate(data)
            except ConfigError as exc:
                for line in exc.problems or [str(exc)]:
                    if line not in seen:
                        seen.add(line)
                        problems.append(_candidate_problem(dim.key, value, line))
    if problems:
        raise sweep_error(list(dict.fromkeys(problems)))


def _candidate_problem(key: str, value: Any, line: str) -> str:
    """A validation problem of one candidate value as a ``sweep.space.KEY`` line (an unknown key names the fix)."""
    if line.startswith("unknown key"):
        close = re.search(r"did you mean '([^']+)'", line)
        what = line.split("?")[0] + "?" if close else line.split(" Valid keys")[0]
        fix = f"sweep.space.{close.group(1)}" if close else "a key that `dist-unlearn config CONFIG` prints"
        return f"sweep.space.{key}: {what} Fix: search {fix}"
    fix = "" if "Fix:" in line else f" Fix: change or remove sweep.space.{key}"
    return f"sweep.space.{key} (value {format_value(value)}): {line}{fix}"


def _sweep_rules(dims: Sequence[Dimension], base: RunConfig) -> list[str]:
    problems = []
    if base.job.kind != "unlearn":
        problems.append(
            f"job.kind={base.job.kind}: dist-unlearn sweep tunes unlearning runs (forget quality vs utility). "
            "Fix: job.kind=unlearn"
        )
    if not base.ray.enabled:
        problems.append("ray.enabled=false: dist-unlearn sweep runs its trials on Ray (Tune). Fix: ray.enabled=true")
    names = next((d for d in dims if d.key == "method.names"), None)
    if names is None and len(base.method.names) != 1:
        problems.append(
            f"method.names: a trial tunes one method, the config runs {', '.join(base.method.names)}. Fix: "
            f"method.names={base.method.names[0]}, or search it: "
            f"sweep.space.method.names=[{','.join(base.method.names)}]"
        )
    for value in names.candidates() if names is not None else ():
        if not (isinstance(value, str) and "," not in value) and not (isinstance(value, list) and len(value) == 1):
            problems.append(
                f"sweep.space.method.names: each value is one method (a trial tunes one), got {format_value(value)}. "
                "Fix: e.g. sweep.space.method.names=[grad_diff,npo]"
            )
    if base.sweep.scheduler == "asha" and base.eval.every_steps == 0:
        problems.append(
            "sweep.scheduler=asha stops poor trials at their periodic evaluations, and eval.every_steps is 0. "
            "Fix: set eval.every_steps (e.g. eval.every_steps=5), or sweep.scheduler=none"
        )
    return problems


# --- trials -------------------------------------------------------------------------------------------


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the config mapping ``data`` with each dotted key set (missing mappings created)."""
    out = copy.deepcopy(dict(data))
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # a shorthand such as method.robust=sam, then method.robust.rho
                child = {"name": child}
            if not isinstance(child, dict):
                child = {}
            node[part] = child
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return out


def format_value(value: Any) -> str:
    """``value`` as typed in a ``key=value`` override, read back to the same value (YAML flow style;
    floats always with a dot, since PyYAML reads ``1e-05`` as a string)."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("\n...")].strip() if text.endswith("\n...") else text


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``key=value`` arguments for ``overrides`` (unquoted)."""
    return [f"{key}={format_value(value)}" for key, value in overrides.items()]


def shell_command(words: Sequence[str]) -> str:
    """A command line from ``words``, each quoted for a POSIX shell where needed."""
    return " ".join(shlex.quote(word) for word in words)


def trial_dirname(index: int, overrides: Mapping[str, Any]) -> str:
    """``trial_003_1a2b3c4d``: the trial's index and a hash of its overrides (a trial directory never
    holds another trial's run)."""
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"trial_{index:03d}_{digest}"
