"""Validate a whole :class:`~dist_unlearn.config.schema.RunConfig` once, with the checks of its ``job.kind``
(:data:`CHECKS`): the fields together, the files they name (made absolute: Ray workers run elsewhere) and,
through :class:`Registries`, what only the layers above know (:data:`DEEP_CHECKS`, once nothing else is
wrong). A check never judges a field that failed to convert; every problem is one line naming the field and
the fix, all raised together as one ConfigError.
"""

from __future__ import annotations

import difflib
import json
import math
import operator
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_unlearn.config.schema import (
    EMBEDDED_MODEL,
    FICTITIOUS_SOURCE,
    HUB_DATA_PREFIX,
    JOB_KINDS,
    SOURCE_FORMATS,
    RunConfig,
)


class ConfigError(ValueError):
    """An invalid configuration; the message has one line per problem, ``problems`` the lines without the header."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)

    @classmethod
    def of(cls, header: str, problems: Sequence[str]) -> ConfigError:
        """The error listing ``problems`` below ``header``."""
        return cls("\n".join([header, *problems]), problems)


@dataclass(frozen=True)
class Registries:
    """What the layers above ``config`` know (``engine.validate.run_registries``): the objective registry
    ``methods``; ``build_objective(cfg, name)`` (TypeError or ValueError for bad parameters) and
    ``check_reference(cfg, name, objective)``; ``embedded_oracle(model_path)``; ``encoder_problem(model_path)``
    and ``source_problem(data_source)`` (a line, or None); ``load_pairs(...)``, ``read_chat_template(text)`` and
    ``load_oracle_stats(path)`` (ValueError naming the field and the fix). A check whose entry is None is skipped.
    """

    methods: Collection[str] | None = None
    build_objective: Callable[[RunConfig, str], Any] | None = None
    check_reference: Callable[[RunConfig, str, Any], Any] | None = None
    embedded_oracle: Callable[[str], str | None] | None = None
    encoder_problem: Callable[[str], str | None] | None = None
    load_pairs: Callable[..., Any] | None = None
    source_problem: Callable[[str], str | None] | None = None
    read_chat_template: Callable[[str], Any] | None = None
    load_oracle_stats: Callable[[str], Any] | None = None


@dataclass
class Context:
    """What a check reads: the config, the directory relative paths are resolved against, the registries,
    and the dotted fields that failed to convert."""

    cfg: RunConfig
    base_dir: Path
    registries: Registries
    bad: set[str] = field(default_factory=set)

    def ok(self, *fields: str) -> bool:
        """Whether each dotted field, and every section above it, converted."""
        parts = {name.rsplit(".", depth)[0] for name in fields for depth in range(name.count(".") + 1)}
        return not parts & self.bad


def validate_config(cfg: RunConfig, registries: Registries | None = None, base_dir: Path | None = None) -> None:
    """Check ``cfg`` for its job kind (making its paths absolute against ``base_dir``, default the cwd); raise
    one ConfigError with a line per problem, naming the field and the fix."""
    problems = config_problems(cfg, registries, base_dir, deep=registries is not None)
    if problems:
        raise ConfigError.of("invalid config:", problems)


def config_problems(
    cfg: RunConfig,
    registries: Registries | None = None,
    base_dir: Path | None = None,
    bad: Collection[str] = (),
    deep: bool = False,
) -> list[str]:
    """The problems of ``cfg`` for its job kind, one line each; ``bad``: fields that failed to convert.
    With ``deep``, the checks that build objectives or read data run too, once nothing else is wrong."""
    ctx = Context(cfg, base_dir or Path.cwd(), registries or Registries(), set(bad))
    problems = [line for kinds, check in CHECKS if cfg.job.kind in kinds for line in check(ctx)]
    if problems or ctx.bad or not deep:
        return problems
    return [line for kinds, check in DEEP_CHECKS if cfg.job.kind in kinds for line in check(ctx)]


ALL = JOB_KINDS  # a new job kind gets these checks without an edit here
UNLEARNING = ("unlearn", "continual")


def _combinations(ctx: Context) -> Iterator[str]:
    """Settings that do not go together, each judged for the job kinds that read them."""
    c, ok, unlearning, continual = ctx.cfg, ctx.ok, ctx.cfg.job.kind in UNLEARNING, ctx.cfg.job.kind == "continual"
    quantization, zero = c.model.quantization, c.deepspeed.zero_stage
    saliency, decay = c.method.saliency, c.train.weight_decay
    if ok("model.quantization", "deepspeed.zero_stage") and quantization == "int8" and zero == 3:
        yield (
            "model.quantization=int8 with deepspeed.zero_stage=3: 8-bit base weights with ZeRO-3 are reported "
            "to train badly (ZeRO-3 cannot partition the int8 weights and their scales). "
            "Fix: use model.quantization=nf4 or deepspeed.zero_stage=2"
        )
    if ok("model.quantization", "model.lora.r") and quantization != "none" and c.model.lora.r == 0:
        yield (
            f"model.quantization={quantization} needs LoRA adapters: quantized base weights are frozen: "
            "set model.lora.r, e.g. model.lora.r=8 (or use model.quantization=none)"
        )
    if unlearning and ok("method.saliency", "train.weight_decay") and saliency < 1 and decay > 0:
        yield (  # AdamW would still shrink the masked-out weights
            f"method.saliency={saliency:g} with train.weight_decay={decay:g}: "
            "AdamW's decoupled weight decay would also change the weights outside the saliency mask. "
            "Fix: set train.weight_decay=0 (or method.saliency=1)"
        )
    if ok("method.robust.name", "job.kind") and c.method.robust.name != "none" and c.job.kind != "unlearn":
        yield (
            f"method.robust={c.method.robust.name} with job.kind={c.job.kind}: robustness options apply to "
            "job.kind=unlearn only. Fix: method.robust=none (or job.kind=unlearn)"
        )
    sure = unlearning and c.method.robust.name == "sure"
    if sure and ok("method.robust.name", "method.saliency") and saliency < 1:
        yield (
            f"method.saliency={saliency:g} with method.robust=sure: SURE sets the saliency fraction "
            f"itself (method.robust.fraction). Fix: method.saliency=1 and method.robust.fraction={saliency:g}"
        )
    if sure and ok("method.robust.name", "train.weight_decay") and decay > 0:
        yield (
            f"method.robust=sure with train.weight_decay={decay:g}: AdamW's decoupled weight "
            "decay would also change the weights outside SURE's saliency mask. Fix: set train.weight_decay=0"
        )
    if continual and ok("model.lora.r") and c.model.lora.r == 0:
        yield (
            "job.kind=continual trains one LoRA adapter per forget request: set model.lora.r. Fix: e.g. model.lora.r=8"
        )
    if continual and ok("deepspeed.zero_stage") and zero == 3:  # the penalty reads whole matrices
        yield (
            "job.kind=continual with deepspeed.zero_stage=3: the adapter orthogonality penalty needs whole "
            "LoRA matrices, which ZeRO-3 partitions. Fix: deepspeed.zero_stage=2 (adapters are small)"
        )
    forget, holdout = c.data.forget_fraction, c.data.holdout_fraction
    if ok("data.forget_fraction", "data.holdout_fraction") and forget + holdout >= 1:
        yield (
            "data.forget_fraction + data.holdout_fraction must be < 1 so that retain data is left, "
            f"got {forget} + {holdout} = {forget + holdout:g}. "
            "Fix: lower one of them, e.g. data.forget_fraction=0.1 data.holdout_fraction=0.1"
        )
    prep = c.prepare
    if unlearning and ok("prepare.hidden_size", "prepare.num_heads") and prep.hidden_size % prep.num_heads:
        yield (
            f"prepare.hidden_size ({prep.hidden_size}) must be divisible by prepare.num_heads "
            f"({prep.num_heads}). Fix: e.g. prepare.hidden_size={prep.num_heads * 32}"
        )


def _batches_divide(ctx: Context, *batches: str) -> Iterator[str]:
    """Each global batch the job reads (dotted ``section.field``) splits evenly across ``ray.num_workers``;
    a retain batch may be 0."""
    if not ctx.ok("job.kind", "ray.num_workers", *batches):
        return
    workers, sizes = ctx.cfg.ray.num_workers, {name: operator.attrgetter(name)(ctx.cfg) for name in batches}
    shared = math.gcd(*sizes.values())  # the worker counts closest to ray.num_workers that divide every batch
    divisors = {d for c in range(1, math.isqrt(shared) + 1) if shared % c == 0 for d in (c, shared // c)}
    below, above = [d for d in divisors if d < workers], [d for d in divisors if d > workers]
    nearest = ([max(below)] if below else []) + ([min(above)] if above else [])
    for name, batch in ((name, batch) for name, batch in sizes.items() if batch % workers):
        lower = batch // workers * workers
        options = [str(size) for size in (lower, lower + workers) if size >= (0 if "retain" in name else 1)]
        yield (
            f"{name} ({batch}) must be divisible by ray.num_workers ({workers}): it is the global "
            f"batch, split evenly across workers. Fix: set {name} to {' or '.join(options)}, "
            f"or set ray.num_workers to {' or '.join(str(w) for w in nearest)}"
        )


def _methods(ctx: Context) -> Iterator[str]:
    """``method.names`` non-empty, unique and registered; ``method.params`` only for registered methods
    (a config may carry settings for several methods and the command line pick some)."""
    method, known = ctx.cfg.method, ctx.registries.methods
    if not ctx.ok("method.names"):
        return
    if not method.names:
        yield "method.names: must name at least one method. Fix: e.g. method.names=grad_diff"
        return
    known = sorted(known) if known is not None else None
    for index, name in enumerate(method.names):
        if name in method.names[:index]:
            yield f"method.names: '{name}' is listed twice. Fix: list each method once"
        if known is not None and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            yield f"method.names: unknown method '{name}'{hint} Known methods: {', '.join(known)}"
    if not ctx.ok("method.params") or known is None:
        return
    for name in (name for name in method.params if name not in method.names and name not in known):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        yield (
            f"method.params.{name}: parameters given for '{name}', which is neither in method.names "
            f"({', '.join(method.names)}) nor a known method.{hint} "
            f"Fix: correct the name or remove method.params.{name}"
        )


# --- files: each must exist before any work; relative paths resolve against the config's directory --------

_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_FORMAT_HINTS = {
    "tofu": ("TOFU subset files such as forget10_perturbed.json and retain90.json", "locuslab/TOFU"),
    "muse": ("MUSE subset files such as raw/forget.txt and raw/retain1.txt", "muse-bench/MUSE-News"),
}


def is_formatted(source: str) -> bool:
    """True for a benchmark in its own format: ``tofu:...`` / ``muse:...``."""
    return ":" in source and source.split(":", 1)[0] in SOURCE_FORMATS


def _files(ctx: Context) -> Iterator[str]:
    """``output.dir`` (against the cwd), ``data.source``, ``deepspeed.config``, ``eval.oracle_dir``,
    ``eval.oracle_stats``, ``data.chat_template`` and ``model.path``; a value that does not look like a
    local path (``org/name``) is taken as a hub name."""
    cfg, ok, base = ctx.cfg, ctx.ok, ctx.base_dir
    if ok("output.dir"):
        cfg.output.dir = str(Path(cfg.output.dir).expanduser().resolve())
        existing = next(p for p in (Path(cfg.output.dir), *Path(cfg.output.dir).parents) if p.exists())
        if not existing.is_dir():
            yield (
                f"output.dir: {existing} is a file, so {cfg.output.dir} cannot be a directory. "
                "Fix: choose another output.dir"
            )
    if ok("data.source") and cfg.data.source != FICTITIOUS_SOURCE:
        yield from (_formatted_source if is_formatted(cfg.data.source) else _data_file)(cfg, base)
    if ok("deepspeed.config") and isinstance(cfg.deepspeed.config, str):
        yield from _deepspeed_file(cfg, base)
    if ok("eval.oracle_dir") and cfg.eval.oracle_dir:
        oracle = _resolve(cfg.eval.oracle_dir, base)
        if (oracle / "config.json").is_file():
            cfg.eval.oracle_dir = str(oracle)
        else:
            yield (
                f"eval.oracle_dir: {oracle} has no config.json. Fix: point it at a saved model directory trained "
                "without the forget set (the retrained / retain model), or leave it empty"
            )
    if ok("eval.oracle_stats") and cfg.eval.oracle_stats:
        if cfg.eval.oracle_dir:
            yield (
                "eval.oracle_stats: set together with eval.oracle_dir, but the reference is one or the other. "
                "Fix: keep eval.oracle_stats (the saved statistics) or eval.oracle_dir (the model), not both"
            )
        stats = _resolve(cfg.eval.oracle_stats, base)
        if stats.is_file():
            cfg.eval.oracle_stats = str(stats)
        else:
            yield (
                f"eval.oracle_stats: file not found: {stats}. Fix: give the oracle_stats.json that dist-unlearn eval "
                "wrote with the oracle (OUTPUT/oracle_stats.json), or use eval.oracle_dir"
            )
    if ok("data.chat_template") and cfg.data.chat_template and _resolve(cfg.data.chat_template, base).is_file():
        cfg.data.chat_template = str(_resolve(cfg.data.chat_template, base))  # else the template text itself
    if ok("model.path") and cfg.model.path != EMBEDDED_MODEL:
        path, what = _resolve(cfg.model.path, base), _missing_local_dir(cfg.model.path, base)
        if what:
            yield (
                f"model.path: {what}: {path}. Fix: give a local model directory, a hub name such as "
                f"org/model-name, or use model.path={EMBEDDED_MODEL}"
            )
        elif path.is_dir():
            cfg.model.path = str(path)


def _data_file(cfg: RunConfig, base_dir: Path) -> Iterator[str]:
    """``data.source``: a local .json/.jsonl file of questions and answers."""
    path = _resolve(cfg.data.source, base_dir)
    fix = f"Fix: give a path to a local .json/.jsonl file, or use data.source={FICTITIOUS_SOURCE}"
    if not path.exists():
        yield f"data.source: file not found: {path}. {fix}"
    elif not path.is_file():
        yield f"data.source: not a file: {path}. {fix}"
    elif path.suffix.lower() not in (".json", ".jsonl"):
        yield f"data.source: expected a .json or .jsonl file, got {path}. {fix}"
    else:
        cfg.data.source = str(path)


def _formatted_source(cfg: RunConfig, base_dir: Path) -> Iterator[str]:
    """``data.source=tofu:LOCATION[@FORGET]`` / ``muse:LOCATION``: a local-looking ``LOCATION`` must be a
    directory; anything else is taken as a hub dataset name. The files inside are read by the deep checks."""
    value = cfg.data.source
    kind, rest = value.split(":", 1)
    location, at, forget = rest.partition("@")
    files, hub = _FORMAT_HINTS[kind]
    fix = f"Fix: give a directory of {files} (.json/.jsonl/.parquet), or a hub dataset name such as {hub}"
    if not location:
        yield f"data.source: {value} names no location. {fix}"
        return
    path, what = _resolve(location, base_dir), _missing_local_dir(location, base_dir)
    if what:
        yield f"data.source: {what}: {path} (in {value}). {fix}"
    elif path.is_dir():
        cfg.data.source = f"{kind}:{path}{at}{forget}"


def _deepspeed_file(cfg: RunConfig, base_dir: Path) -> Iterator[str]:
    """``deepspeed.config``: a DeepSpeed JSON file holding an object."""
    path = _resolve(cfg.deepspeed.config, base_dir)
    fix = "Fix: give a path to a DeepSpeed JSON file, or set deepspeed.config=null to use the built-in defaults"
    if not path.is_file():
        yield f"deepspeed.config: file not found: {path}. {fix}"
        return
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        yield f"deepspeed.config: could not read {path} as JSON ({exc}). {fix}"
        return
    if isinstance(content, dict):
        cfg.deepspeed.config = str(path)
    else:
        got = f"a {type(content).__name__}" if isinstance(content, list) else f"{content!r} ({type(content).__name__})"
        yield f"deepspeed.config: {path} must hold a JSON object of DeepSpeed settings, got {got}. {fix}"


def _pairs_files(ctx: Context) -> Iterator[str]:
    """``contrastive.data`` (a file, or a directory with ``train.jsonl``) and ``contrastive.dev_data`` (a file)
    exist; their rows are read by the deep checks."""
    c = ctx.cfg.contrastive
    fix = (
        "Fix: give a JSON Lines file of query/positive rows, a directory holding train.jsonl, "
        f"a datasets dataset as {HUB_DATA_PREFIX}NAME, or contrastive.data={FICTITIOUS_SOURCE}"
    )
    if ctx.ok("contrastive.data") and c.data != FICTITIOUS_SOURCE and not c.data.startswith(HUB_DATA_PREFIX):
        path = _resolve(c.data, ctx.base_dir)
        if path.is_dir() and not any((path / name).is_file() for name in ("train.jsonl", "train.parquet")):
            yield f"contrastive.data: {path} is a directory without train.jsonl. {fix}"
        elif not path.exists():
            yield f"contrastive.data: file not found: {path}. {fix}"
        else:
            c.data = str(path)
    if ctx.ok("contrastive.dev_data") and c.dev_data:
        path = _resolve(c.dev_data, ctx.base_dir)
        if c.data == FICTITIOUS_SOURCE:
            yield (
                "contrastive.dev_data: only used with a user contrastive.data file (the fictitious data holds out "
                "people by data.holdout_fraction). Fix: set contrastive.data, or leave contrastive.dev_data empty"
            )
        elif not path.is_file():
            yield f"contrastive.dev_data: file not found: {path}. Fix: give a JSON Lines file, or leave it empty"
        else:
            c.dev_data = str(path)


def _missing_local_dir(value: str, base_dir: Path) -> str | None:
    """What is wrong with a ``value`` that looks like a local path but is no directory; else None (a
    directory, or a hub name)."""
    path = _resolve(value, base_dir)
    if path.is_dir():
        return None
    first = Path(value).parts[0] if Path(value).parts else value
    local = value.startswith(_LOCAL_PREFIXES) or value in (".", "..")
    if local or (base_dir / first).exists() or (Path.cwd() / first).exists():
        return "not a directory" if path.exists() else "directory not found"
    return None


def _resolve(value: str, base_dir: Path) -> Path:
    """Absolute path for ``value``: relative to ``base_dir``, or to the cwd if it exists only there."""
    candidate, from_cwd = (Path(os.path.normpath(root / Path(value).expanduser())) for root in (base_dir, Path.cwd()))
    return from_cwd if not candidate.exists() and from_cwd.exists() else candidate


# --- deep checks: objectives and data, through the registries -----------------------------------


def _objectives(ctx: Context) -> Iterator[str]:
    """Build every objective once, so that bad method parameters fail before Ray or DeepSpeed start; then
    what each needs (a reference model, retain data, held-out data)."""
    cfg, reg = ctx.cfg, ctx.registries
    if reg.build_objective is None:
        return
    for name in [n for n in cfg.method.params if n not in cfg.method.names and n in (reg.methods or ())]:
        try:
            reg.build_objective(cfg, name)
        except (TypeError, ValueError) as exc:
            yield f"method.params.{name}: {exc} (this method is not in method.names)"
    for name in cfg.method.names:
        try:
            objective = reg.build_objective(cfg, name)
        except (TypeError, ValueError) as exc:
            yield f"method.params.{name}: {exc}"
            continue
        yield from _raised(reg.check_reference, cfg, name, objective)
        if objective.needs.retain and cfg.train.retain_batch_size == 0:
            yield (
                f"train.retain_batch_size: '{name}' has a retain term but train.retain_batch_size=0. "
                "Fix: set train.retain_batch_size to a multiple of ray.num_workers, or method.retain_weight=0"
            )
        if objective.needs.holdout and cfg.data.holdout_fraction == 0 and cfg.data.source == FICTITIOUS_SOURCE:
            yield (
                f"data.holdout_fraction: '{name}' uses held-out examples but data.holdout_fraction=0. "
                "Fix: data.holdout_fraction=0.1"
            )
        if name == "contrastive" and cfg.train.retain_batch_size < cfg.train.forget_batch_size:
            yield (
                "train.retain_batch_size: 'contrastive' needs at least one retain negative per forget example. "
                f"Fix: train.retain_batch_size>={cfg.train.forget_batch_size}"
            )


def _best_metric(ctx: Context) -> Iterator[str]:
    """An ``eval.best_metric`` that the periodic evaluation could never measure: forget quality and PrivLeak
    need an oracle (the embedded model's, ``eval.oracle_dir`` or ``eval.oracle_stats``); PrivLeak also a
    holdout split. (A metric missing for a reason only the data shows falls back at run time.)"""
    cfg, embedded_oracle = ctx.cfg, ctx.registries.embedded_oracle
    metric = cfg.eval.best_metric
    if not cfg.eval.every_steps or metric not in ("forget_quality", "privleak_abs"):
        return
    fix = "Fix: eval.best_metric=model_utility or eval.best_metric=neg_forget_prob"
    has_oracle = cfg.eval.oracle_dir or cfg.eval.oracle_stats or embedded_oracle is None
    if cfg.model.path != EMBEDDED_MODEL and not has_oracle and embedded_oracle(cfg.model.path) is None:
        yield (
            f"eval.best_metric: {metric} is measured against an oracle (a model trained without the forget set), "
            f"which only the embedded model (model.path={EMBEDDED_MODEL}) comes with; with model.path="
            f"{cfg.model.path} the periodic evaluation (eval.every_steps={cfg.eval.every_steps}) could never "
            f"keep a best model. {fix}, or eval.oracle_dir=DIR (a model trained without the forget set) or "
            "eval.oracle_stats=FILE"
        )
    elif metric == "privleak_abs" and cfg.data.source == FICTITIOUS_SOURCE and cfg.data.holdout_fraction == 0:
        yield f"eval.best_metric: privleak_abs needs held-out examples but data.holdout_fraction=0. {fix}"


def _prompt_format(ctx: Context) -> Iterator[str]:
    """A ``data.chat_template`` that is neither a file nor a template, and ``data.prompt_format=chat`` with a
    model whose tokenizer has no chat template (the embedded model's never has; a local directory is read)."""
    data, model = ctx.cfg.data, Path(ctx.cfg.model.path)
    if data.chat_template:
        yield from _raised(ctx.registries.read_chat_template, data.chat_template)
        return
    fix = "Fix: set data.chat_template=FILE.jinja (or the template text), or data.prompt_format=auto"
    if data.prompt_format != "chat":
        return
    if ctx.cfg.model.path == EMBEDDED_MODEL:
        yield f"data.prompt_format: chat, but the embedded model's tokenizer has no chat template. {fix}"
    elif model.is_dir() and not _saved_chat_template(model):
        yield f"data.prompt_format: chat, but the tokenizer in {model} has no chat template. {fix}"


def _saved_chat_template(model_dir: Path) -> bool:
    """Whether a saved tokenizer directory carries a chat template (its own file or tokenizer_config.json)."""
    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def _data_contents(ctx: Context) -> Iterator[str]:
    """What ``eval.oracle_stats`` and a ``tofu:`` / ``muse:`` ``data.source`` hold (read now, before any work)."""
    cfg, reg = ctx.cfg, ctx.registries
    if cfg.eval.oracle_stats:
        yield from _raised(reg.load_oracle_stats, cfg.eval.oracle_stats)
    if reg.source_problem is not None and is_formatted(cfg.data.source):
        yield from filter(None, [reg.source_problem(cfg.data.source)])


def _encoder_and_pairs(ctx: Context) -> Iterator[str]:
    """The contrastive job's encoder and data: ``model.path`` must be a text encoder, and a user
    ``contrastive.data`` is read in full by the same function the workers load it with."""
    cfg, reg, c = ctx.cfg, ctx.registries, ctx.cfg.contrastive
    if cfg.model.path != EMBEDDED_MODEL and reg.encoder_problem is not None:
        yield from filter(None, [reg.encoder_problem(cfg.model.path)])
    if c.data == FICTITIOUS_SOURCE or reg.load_pairs is None:
        return
    try:
        pairs = reg.load_pairs(c.data, c.dev_data or None, c.hard_negatives, c.dev_fraction, cfg.data.seed)
    except (OSError, ValueError) as exc:
        lines = getattr(exc, "problems", None) or [str(exc)]
        yield from (line if line.startswith("contrastive.") else f"contrastive.data: {line}" for line in lines)
        return
    if len(pairs.train) < c.global_batch_size:
        largest = len(pairs.train) // cfg.ray.num_workers * cfg.ray.num_workers
        yield (
            f"contrastive.global_batch_size ({c.global_batch_size}) is more than the {len(pairs.train)} training rows "
            f"of {pairs.source.train}: a batch would hold a row twice, its positive then also one of its negatives. "
            f"Fix: contrastive.global_batch_size={largest} or less, or more rows"
        )


def _raised(call: Callable[..., Any] | None, *args: Any) -> Iterator[str]:
    """The message of the ValueError that ``call(*args)`` raises; nothing when it passes or is not given."""
    try:
        if call is not None:
            call(*args)
    except ValueError as exc:
        yield str(exc)


Check = tuple[tuple[str, ...], Callable[[Context], Iterator[str]]]
CHECKS: tuple[Check, ...] = (
    (ALL, _combinations),
    (UNLEARNING, lambda ctx: _batches_divide(ctx, "train.forget_batch_size", "train.retain_batch_size")),
    (("contrastive",), lambda ctx: _batches_divide(ctx, "contrastive.global_batch_size")),
    (UNLEARNING, _methods),
    (ALL, _files),
    (("contrastive",), _pairs_files),
)
"""Every check and the job kinds that read its settings, in the order of its problem lines."""
DEEP_CHECKS: tuple[Check, ...] = (
    (UNLEARNING, _objectives),
    (UNLEARNING, _best_metric),
    (("contrastive",), _encoder_and_pairs),
    (UNLEARNING, _prompt_format),
    (ALL, _data_contents),
)
"""The checks that build objectives or read data, once the others have passed."""
