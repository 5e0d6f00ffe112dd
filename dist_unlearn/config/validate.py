"""Validate a whole :class:`~dist_unlearn.config.schema.RunConfig` once, with the checks of its ``job.kind``.

The loader converts each field (types, choices, ranges); the checks here judge the fields together, the
files they name (:mod:`dist_unlearn.config.files`) and, through :class:`Registries`, what only the layers
above know: the objective registry, the data formats, the encoders. A check runs for the job kinds that
read its settings (:data:`CHECKS`), never on a field that already failed to convert, and the deep checks
(:data:`DEEP_CHECKS`: build objectives, read data files) run only with registries and once every other
check has passed. Every problem is one line
naming the field and the fix; all are raised together as one :class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_unlearn.config.files import check_files, check_pairs_files, is_formatted
from dist_unlearn.config.schema import EMBEDDED_MODEL, FICTITIOUS_SOURCE, RunConfig


class ConfigError(ValueError):
    """An invalid configuration; the message has one line per problem.

    ``problems`` holds those lines without the ``invalid config`` header.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class Registries:
    """What the layers above ``config`` know, passed in by the caller (``engine.validate.run_registries``).

    Without registries (a worker re-reading a validated config) only ``method.names`` can be given (as
    ``known_methods``) and the deep checks are skipped; with them, a check whose entry is ``None`` is skipped.
    """

    methods: Collection[str] | None = None
    """The objective registry that ``method.names`` and ``method.params`` are judged against."""
    build_objective: Callable[[RunConfig, str], Any] | None = None
    """Builds a method's objective (``needs.retain``, ``needs.holdout``); TypeError/ValueError on bad params."""
    check_reference: Callable[[RunConfig, str, Any], Any] | None = None
    """Resolves ``method.reference`` for a method and its objective; ValueError naming the field and fix."""
    embedded_oracle: Callable[[str], str | None] | None = None
    """The oracle model that comes with a model directory (the embedded benchmark's), or None."""
    encoder_problem: Callable[[str], str | None] | None = None
    """Why ``model.path`` is no text encoder (one line), or None."""
    load_pairs: Callable[..., Any] | None = None
    """Reads ``contrastive.data`` as the workers do; raises ValueError (with ``problems``) or OSError."""
    source_problem: Callable[[str], str | None] | None = None
    """Why a ``tofu:`` / ``muse:`` ``data.source`` cannot load (one line), or None."""
    read_chat_template: Callable[[str], Any] | None = None
    """Reads ``data.chat_template`` (a file or the template text); ValueError naming the field and fix."""
    load_oracle_stats: Callable[[str], Any] | None = None
    """Reads ``eval.oracle_stats``; ValueError naming the field and fix."""


@dataclass
class Context:
    """What a check reads: the config (its paths made absolute by the file checks), the directory relative
    paths are resolved against, the registries, and the fields that failed to convert."""

    cfg: RunConfig
    base_dir: Path
    registries: Registries
    bad: set[str] = field(default_factory=set)

    def ok(self, *fields: str) -> bool:
        """Whether each dotted field, and every section above it, converted."""
        parts = {name.rsplit(".", depth)[0] for name in fields for depth in range(name.count(".") + 1)}
        return not parts & self.bad


Check = Callable[[Context], Iterator[str]]


def validate_config(cfg: RunConfig, registries: Registries | None = None, base_dir: Path | None = None) -> None:
    """Check ``cfg`` for its job kind (making its paths absolute against ``base_dir``, default the cwd).

    Raises:
        ConfigError: one line per problem, naming the field and the fix.
    """
    problems = config_problems(cfg, registries, base_dir, deep=registries is not None)
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems), problems)


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
    kind = cfg.job.kind if ctx.ok("job.kind") else "unlearn"
    problems = [line for check in CHECKS[kind] for line in check(ctx)]
    if problems or ctx.bad or not deep:
        return problems
    return [line for check in DEEP_CHECKS[kind] for line in check(ctx)]


# --- settings read together -------------------------------------------------------------------


def _quantization(ctx: Context) -> Iterator[str]:
    """Quantized base weights are frozen (LoRA needed); 8-bit weights are refused under ZeRO-3."""
    cfg = ctx.cfg
    if not ctx.ok("model.quantization") or cfg.model.quantization == "none":
        return
    quant = cfg.model.quantization
    if quant == "int8" and ctx.ok("deepspeed.zero_stage") and cfg.deepspeed.zero_stage == 3:
        yield (
            "model.quantization=int8 with deepspeed.zero_stage=3: 8-bit base weights with ZeRO-3 are reported "
            "to train badly (ZeRO-3 cannot partition the int8 weights and their scales). "
            "Fix: use model.quantization=nf4 or deepspeed.zero_stage=2"
        )
    if ctx.ok("model.lora.r") and cfg.model.lora.r == 0:
        yield (
            f"model.quantization={quant} needs LoRA adapters: quantized base weights are frozen: set "
            f"model.lora.r, e.g. model.lora.r=8 (or use model.quantization=none)"
        )


def _saliency(ctx: Context) -> Iterator[str]:
    """A saliency mask needs no weight decay: AdamW would still shrink the masked-out weights."""
    cfg = ctx.cfg
    if ctx.ok("method.saliency", "train.weight_decay") and cfg.method.saliency < 1.0 and cfg.train.weight_decay > 0:
        yield (
            f"method.saliency={cfg.method.saliency:g} with train.weight_decay={cfg.train.weight_decay:g}: "
            "AdamW's decoupled weight decay would also change the weights outside the saliency mask. "
            "Fix: set train.weight_decay=0 (or method.saliency=1)"
        )


def _robust(ctx: Context) -> Iterator[str]:
    """Robustness is implemented for ``job.kind=unlearn`` only; ``method.robust=sure`` sets the saliency
    fraction itself and needs no weight decay."""
    cfg = ctx.cfg
    if not ctx.ok("method.robust.name") or cfg.method.robust.name == "none":
        return
    name = cfg.method.robust.name
    if ctx.ok("job.kind") and cfg.job.kind != "unlearn":
        yield (
            f"method.robust={name} with job.kind={cfg.job.kind}: robustness options apply to job.kind=unlearn "
            "only. Fix: method.robust=none (or job.kind=unlearn)"
        )
    if name != "sure":
        return
    if ctx.ok("method.saliency") and cfg.method.saliency < 1.0:
        yield (
            f"method.saliency={cfg.method.saliency:g} with method.robust=sure: SURE sets the saliency fraction "
            "itself (method.robust.fraction). Fix: method.saliency=1 and method.robust.fraction="
            f"{cfg.method.saliency:g}"
        )
    if ctx.ok("train.weight_decay") and cfg.train.weight_decay > 0.0:
        yield (
            f"method.robust=sure with train.weight_decay={cfg.train.weight_decay:g}: AdamW's decoupled weight "
            "decay would also change the weights outside SURE's saliency mask. Fix: set train.weight_decay=0"
        )


def _continual(ctx: Context) -> Iterator[str]:
    """Continual requests train LoRA adapters under ZeRO 0-2: the orthogonality penalty reads whole adapter
    matrices, which ZeRO-3 partitions."""
    if ctx.ok("model.lora.r") and ctx.cfg.model.lora.r == 0:
        yield "job.kind=continual trains one LoRA adapter per forget request: set model.lora.r. Fix: e.g. " + (
            "model.lora.r=8"
        )
    if ctx.ok("deepspeed.zero_stage") and ctx.cfg.deepspeed.zero_stage == 3:
        yield (
            "job.kind=continual with deepspeed.zero_stage=3: the adapter orthogonality penalty needs whole LoRA "
            "matrices, which ZeRO-3 partitions. Fix: deepspeed.zero_stage=2 (adapters are small)"
        )


def _fractions(ctx: Context) -> Iterator[str]:
    """The forget and holdout shares of the data leave some retain data."""
    data = ctx.cfg.data
    total = data.forget_fraction + data.holdout_fraction
    if ctx.ok("data.forget_fraction", "data.holdout_fraction") and total >= 1.0:
        yield (
            f"data.forget_fraction + data.holdout_fraction must be < 1 so that retain data is left, "
            f"got {data.forget_fraction} + {data.holdout_fraction} = {total:g}. "
            f"Fix: lower one of them, e.g. data.forget_fraction=0.1 data.holdout_fraction=0.1"
        )


def _prepare(ctx: Context) -> Iterator[str]:
    """The embedded model's attention heads split its hidden size."""
    prep = ctx.cfg.prepare
    if ctx.ok("prepare.hidden_size", "prepare.num_heads") and prep.hidden_size % prep.num_heads:
        yield (
            f"prepare.hidden_size ({prep.hidden_size}) must be divisible by prepare.num_heads "
            f"({prep.num_heads}). Fix: e.g. prepare.hidden_size={prep.num_heads * 32}"
        )


def _batches_divide(batches: Callable[[RunConfig], list[tuple[str, int, int]]]) -> Check:
    """A check that each global batch the job reads (``(field, size, smallest allowed)``) splits evenly
    across ``ray.num_workers``."""

    def check(ctx: Context) -> Iterator[str]:
        sizes = batches(ctx.cfg)
        if not ctx.ok("job.kind", "ray.num_workers", *(name for name, _, _ in sizes)):
            return
        workers = ctx.cfg.ray.num_workers
        shared = math.gcd(*(size for _, size, _ in sizes))
        for name, batch, min_batch in sizes:
            if batch % workers == 0:
                continue
            lower = batch // workers * workers
            options = [str(size) for size in (lower, lower + workers) if size >= min_batch]
            yield (
                f"{name} ({batch}) must be divisible by ray.num_workers ({workers}): it is the global "
                f"batch, split evenly across workers. Fix: set {name} to {' or '.join(options)}, "
                f"or set ray.num_workers to {' or '.join(str(w) for w in _nearest_divisors(shared, workers))}"
            )

    return check


def _nearest_divisors(number: int, target: int) -> list[int]:
    """The divisors of ``number`` closest to ``target`` from below and from above."""
    divisors = {d for c in range(1, math.isqrt(number) + 1) if number % c == 0 for d in (c, number // c)}
    below = [d for d in divisors if d < target]
    above = [d for d in divisors if d > target]
    return ([max(below)] if below else []) + ([min(above)] if above else [])


def _methods(ctx: Context) -> Iterator[str]:
    """``method.names`` non-empty, unique and registered; ``method.params`` only for registered methods
    (a method that is not run may keep its parameters: a config may carry settings for several methods and
    the command line pick some)."""
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
    for name in method.params:
        if name in method.names or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        yield (
            f"method.params.{name}: parameters given for '{name}', which is neither in method.names "
            f"({', '.join(method.names)}) nor a known method.{hint} "
            f"Fix: correct the name or remove method.params.{name}"
        )


# --- files (made absolute in the config) ---------------------------------------------------------


def _files(ctx: Context) -> Iterator[str]:
    return check_files(ctx.cfg, ctx.base_dir, ctx.ok)


def _pairs_files(ctx: Context) -> Iterator[str]:
    return check_pairs_files(ctx.cfg, ctx.base_dir, ctx.ok)


# --- deep checks: objectives and data, through the registries -----------------------------------


def _objectives(ctx: Context) -> Iterator[str]:
    """Build every objective once, so that bad method parameters fail before Ray or DeepSpeed start."""
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
        try:
            if reg.check_reference is not None:
                reg.check_reference(cfg, name, objective)
        except ValueError as exc:
            yield str(exc)
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
    """An ``eval.best_metric`` that the periodic evaluation could never measure (it would keep no best
    model): forget quality and PrivLeak are measured against an oracle, which only the embedded model comes
    with unless ``eval.oracle_dir`` or ``eval.oracle_stats`` gives one; PrivLeak also needs a holdout split.
    (A metric missing for a reason only the data shows falls back at run time.)"""
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
        return
    if metric == "privleak_abs" and cfg.data.source == FICTITIOUS_SOURCE and cfg.data.holdout_fraction == 0:
        yield f"eval.best_metric: privleak_abs needs held-out examples but data.holdout_fraction=0. {fix}"


def _prompt_format(ctx: Context) -> Iterator[str]:
    """A ``data.chat_template`` that is neither a file nor a template, and ``data.prompt_format=chat`` with a
    model whose tokenizer has no chat template (the embedded model's never has; a local directory is read; a
    hub name is checked when its tokenizer loads)."""
    data, read = ctx.cfg.data, ctx.registries.read_chat_template
    if data.chat_template:
        try:
            if read is not None:
                read(data.chat_template)
        except ValueError as exc:
            yield str(exc)
        return
    if data.prompt_format != "chat":
        return
    fix = "Fix: set data.chat_template=FILE.jinja (or the template text), or data.prompt_format=auto"
    if ctx.cfg.model.path == EMBEDDED_MODEL:
        yield f"data.prompt_format: chat, but the embedded model's tokenizer has no chat template. {fix}"
    elif Path(ctx.cfg.model.path).is_dir() and not _saved_chat_template(Path(ctx.cfg.model.path)):
        yield f"data.prompt_format: chat, but the tokenizer in {ctx.cfg.model.path} has no chat template. {fix}"


def _saved_chat_template(model_dir: Path) -> bool:
    """Whether a saved tokenizer directory carries a chat template (its own file or tokenizer_config.json)."""
    import json

    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def _data_contents(ctx: Context) -> Iterator[str]:
    """What ``eval.oracle_stats`` and a ``tofu:`` / ``muse:`` ``data.source`` hold (read now, before any work)."""
    cfg, reg = ctx.cfg, ctx.registries
    if cfg.eval.oracle_stats and reg.load_oracle_stats is not None:
        try:
            reg.load_oracle_stats(cfg.eval.oracle_stats)
        except ValueError as exc:
            yield str(exc)
    if reg.source_problem is not None and is_formatted(cfg.data.source):
        problem = reg.source_problem(cfg.data.source)
        if problem:
            yield problem


def _encoder_and_pairs(ctx: Context) -> Iterator[str]:
    """The contrastive job's encoder and data: ``model.path`` must be a text encoder, and a user
    ``contrastive.data`` is read in full (every row, the hard negatives asked for, the dev split) by the same
    function the workers load it with."""
    cfg, reg = ctx.cfg, ctx.registries
    if cfg.model.path != EMBEDDED_MODEL and reg.encoder_problem is not None:
        problem = reg.encoder_problem(cfg.model.path)
        if problem:
            yield problem
    c = cfg.contrastive
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


# --- the checks of each job kind -----------------------------------------------------------------


def _unlearning_batches(cfg: RunConfig) -> list[tuple[str, int, int]]:
    return [
        ("train.forget_batch_size", cfg.train.forget_batch_size, 1),
        ("train.retain_batch_size", cfg.train.retain_batch_size, 0),
    ]


def _contrastive_batch(cfg: RunConfig) -> list[tuple[str, int, int]]:
    return [("contrastive.global_batch_size", cfg.contrastive.global_batch_size, 1)]


_UNLEARN: tuple[Check, ...] = (_quantization, _saliency, _robust, _fractions, _prepare)
CHECKS: dict[str, tuple[Check, ...]] = {
    "unlearn": (*_UNLEARN, _batches_divide(_unlearning_batches), _methods, _files),
    "continual": (*_UNLEARN, _continual, _batches_divide(_unlearning_batches), _methods, _files),
    "contrastive": (_quantization, _robust, _fractions, _batches_divide(_contrastive_batch), _files, _pairs_files),
}
"""The checks of each ``job.kind``: only the settings that the kind's task reads."""
DEEP_CHECKS: dict[str, tuple[Check, ...]] = {
    "unlearn": (_objectives, _best_metric, _prompt_format, _data_contents),
    "continual": (_objectives, _best_metric, _prompt_format, _data_contents),
    "contrastive": (_encoder_and_pairs, _data_contents),
}
"""The checks that build objectives or read data, once the others have passed."""
