"""Validate a whole :class:`~dist_unlearn.config.schema.RunConfig` once, with the checks of its ``job.kind``.

The loader converts each field (types, choices, ranges); the checks here judge the fields together, the
files they name (:mod:`dist_unlearn.config.files`) and, through :class:`Registries`, what only the layers
above know: the objective registry, the data formats, the encoders. A check runs for the job kinds that
read its settings (:data:`CHECKS`), never on a field that already failed to convert, and the deep checks
(:data:`DEEP_CHECKS`: build objectives, read data files) run only with registries and once every other
check has passed. Every problem is one line naming the field and the fix; all are raised together as one
:class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_unlearn.config.files import check_files, check_pairs_files, is_formatted
from dist_unlearn.config.schema import EMBEDDED_MODEL, FICTITIOUS_SOURCE, JOB_KINDS, RunConfig


class ConfigError(ValueError):
    """An invalid configuration; the message has one line per problem.

    ``problems`` holds those lines without the ``invalid config`` header.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class Registries:
    """What the layers above ``config`` know, passed in by the caller (``engine.validate.run_registries``):

    - ``methods``: the objective registry that ``method.names`` and ``method.params`` are judged against;
    - ``build_objective(cfg, name)``: the objective (``needs.retain``, ``needs.holdout``), TypeError or
      ValueError for bad parameters; ``check_reference(cfg, name, objective)``: resolves ``method.reference``;
    - ``embedded_oracle(model_path)``: the oracle model that comes with a model directory, or None;
    - ``encoder_problem(model_path)`` / ``source_problem(data_source)``: why it cannot load (a line), or None;
    - ``load_pairs(...)``: reads ``contrastive.data`` as the workers do (ValueError with ``problems``);
    - ``read_chat_template(text)`` / ``load_oracle_stats(path)``: read the file, ValueError when unusable.

    The ValueErrors name the field and the fix. Without registries (a worker re-reading a validated config)
    only ``method.names`` can be judged (given as ``known_methods``) and the deep checks are skipped; with
    them, a check whose entry is ``None`` is skipped.
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
    problems = [line for check in CHECKS if cfg.job.kind in check.kinds for line in check(ctx)]
    if problems or ctx.bad or not deep:
        return problems
    return [line for check in DEEP_CHECKS if cfg.job.kind in check.kinds for line in check(ctx)]


# --- the checks, and the job kinds that read their settings ----------------------------------------

ALL = JOB_KINDS  # a new job kind gets these checks without an edit here
UNLEARNING = ("unlearn", "continual")


@dataclass(frozen=True)
class Rule:
    """A problem when ``when(cfg)`` holds, reported as ``message(cfg)``; judged for the job kinds in
    ``kinds`` and only when each of the (space-separated) ``fields`` converted."""

    kinds: tuple[str, ...]
    fields: str
    when: Callable[[RunConfig], Any]
    message: str | Callable[[RunConfig], str]
    """The line, or a format string of the config ``c`` (e.g. ``{c.train.lr:g}``)."""

    def __call__(self, ctx: Context) -> Iterator[str]:
        if ctx.ok(*self.fields.split()) and self.when(ctx.cfg):
            yield self.message.format(c=ctx.cfg) if isinstance(self.message, str) else self.message(ctx.cfg)


@dataclass(frozen=True)
class Check:
    """A check that yields its own problem lines, for the job kinds in ``kinds``."""

    kinds: tuple[str, ...]
    run: Callable[[Context], Iterable[str]]

    def __call__(self, ctx: Context) -> Iterable[str]:
        return self.run(ctx)


def _batches_divide(*batches: str) -> Callable[[Context], Iterator[str]]:
    """A check that each global batch the job reads (dotted ``section.field``) splits evenly across
    ``ray.num_workers``; a retain batch may be 0."""

    def check(ctx: Context) -> Iterator[str]:
        if not ctx.ok("job.kind", "ray.num_workers", *batches):
            return
        workers = ctx.cfg.ray.num_workers
        sizes = {name: getattr(getattr(ctx.cfg, name.split(".")[0]), name.split(".")[1]) for name in batches}
        shared = math.gcd(*sizes.values())
        for name, batch in sizes.items():
            if batch % workers == 0:
                continue
            lower = batch // workers * workers
            options = [str(size) for size in (lower, lower + workers) if size >= (0 if "retain" in name else 1)]
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
    elif metric == "privleak_abs" and cfg.data.source == FICTITIOUS_SOURCE and cfg.data.holdout_fraction == 0:
        yield f"eval.best_metric: privleak_abs needs held-out examples but data.holdout_fraction=0. {fix}"


def _prompt_format(ctx: Context) -> Iterator[str]:
    """A ``data.chat_template`` that is neither a file nor a template, and ``data.prompt_format=chat`` with a
    model whose tokenizer has no chat template (the embedded model's never has; a local directory is read; a
    hub name is checked when its tokenizer loads)."""
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
    ``contrastive.data`` is read in full (every row, the hard negatives asked for, the dev split) by the same
    function the workers load it with."""
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


CHECKS: tuple[Rule | Check, ...] = (
    Rule(
        ALL,
        "model.quantization deepspeed.zero_stage",
        lambda c: c.model.quantization == "int8" and c.deepspeed.zero_stage == 3,
        "model.quantization=int8 with deepspeed.zero_stage=3: 8-bit base weights with ZeRO-3 are reported "
        "to train badly (ZeRO-3 cannot partition the int8 weights and their scales). "
        "Fix: use model.quantization=nf4 or deepspeed.zero_stage=2",
    ),
    Rule(
        ALL,
        "model.quantization model.lora.r",
        lambda c: c.model.quantization != "none" and c.model.lora.r == 0,
        "model.quantization={c.model.quantization} needs LoRA adapters: quantized base weights are frozen: "
        "set model.lora.r, e.g. model.lora.r=8 (or use model.quantization=none)",
    ),
    Rule(  # AdamW would still shrink the masked-out weights
        UNLEARNING,
        "method.saliency train.weight_decay",
        lambda c: c.method.saliency < 1.0 and c.train.weight_decay > 0.0,
        "method.saliency={c.method.saliency:g} with train.weight_decay={c.train.weight_decay:g}: "
        "AdamW's decoupled weight decay would also change the weights outside the saliency mask. "
        "Fix: set train.weight_decay=0 (or method.saliency=1)",
    ),
    Rule(
        ALL,
        "method.robust.name job.kind",
        lambda c: c.method.robust.name != "none" and c.job.kind != "unlearn",
        "method.robust={c.method.robust.name} with job.kind={c.job.kind}: robustness options apply to "
        "job.kind=unlearn only. Fix: method.robust=none (or job.kind=unlearn)",
    ),
    Rule(
        UNLEARNING,
        "method.robust.name method.saliency",
        lambda c: c.method.robust.name == "sure" and c.method.saliency < 1.0,
        "method.saliency={c.method.saliency:g} with method.robust=sure: SURE sets the saliency fraction "
        "itself (method.robust.fraction). Fix: method.saliency=1 and method.robust.fraction={c.method.saliency:g}",
    ),
    Rule(
        UNLEARNING,
        "method.robust.name train.weight_decay",
        lambda c: c.method.robust.name == "sure" and c.train.weight_decay > 0.0,
        "method.robust=sure with train.weight_decay={c.train.weight_decay:g}: AdamW's decoupled weight "
        "decay would also change the weights outside SURE's saliency mask. Fix: set train.weight_decay=0",
    ),
    Rule(
        ("continual",),
        "model.lora.r",
        lambda c: c.model.lora.r == 0,
        "job.kind=continual trains one LoRA adapter per forget request: set model.lora.r. Fix: e.g. model.lora.r=8",
    ),
    Rule(  # the orthogonality penalty reads whole adapter matrices
        ("continual",),
        "deepspeed.zero_stage",
        lambda c: c.deepspeed.zero_stage == 3,
        "job.kind=continual with deepspeed.zero_stage=3: the adapter orthogonality penalty needs whole "
        "LoRA matrices, which ZeRO-3 partitions. Fix: deepspeed.zero_stage=2 (adapters are small)",
    ),
    Rule(
        ALL,
        "data.forget_fraction data.holdout_fraction",
        lambda c: c.data.forget_fraction + c.data.holdout_fraction >= 1.0,
        lambda c: (
            "data.forget_fraction + data.holdout_fraction must be < 1 so that retain data is left, "
            f"got {c.data.forget_fraction} + {c.data.holdout_fraction} = "
            f"{c.data.forget_fraction + c.data.holdout_fraction:g}. "
            "Fix: lower one of them, e.g. data.forget_fraction=0.1 data.holdout_fraction=0.1"
        ),
    ),
    Rule(
        UNLEARNING,
        "prepare.hidden_size prepare.num_heads",
        lambda c: c.prepare.hidden_size % c.prepare.num_heads,
        lambda c: (
            f"prepare.hidden_size ({c.prepare.hidden_size}) must be divisible by prepare.num_heads "
            f"({c.prepare.num_heads}). Fix: e.g. prepare.hidden_size={c.prepare.num_heads * 32}"
        ),
    ),
    Check(UNLEARNING, _batches_divide("train.forget_batch_size", "train.retain_batch_size")),
    Check(("contrastive",), _batches_divide("contrastive.global_batch_size")),
    Check(UNLEARNING, _methods),
    Check(ALL, lambda ctx: check_files(ctx.cfg, ctx.base_dir, ctx.ok)),
    Check(("contrastive",), lambda ctx: check_pairs_files(ctx.cfg, ctx.base_dir, ctx.ok)),
)
"""Every check, in the order of its problem lines; each runs for the job kinds that read its settings."""
DEEP_CHECKS: tuple[Check, ...] = (
    Check(UNLEARNING, _objectives),
    Check(UNLEARNING, _best_metric),
    Check(("contrastive",), _encoder_and_pairs),
    Check(UNLEARNING, _prompt_format),
    Check(ALL, _data_contents),
)
"""The checks that build objectives or read data, once the others have passed."""
