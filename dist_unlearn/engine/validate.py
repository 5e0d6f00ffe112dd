"""Checks of a run config that need the objective registry (the schema checks live in ``config/``)."""

from __future__ import annotations

import json
from pathlib import Path

from dist_unlearn.config import ConfigError, RunConfig
from dist_unlearn.config.schema import EMBEDDED_MODEL, FICTITIOUS_SOURCE
from dist_unlearn.data.formats import is_formatted_source, source_problem
from dist_unlearn.data.pairs import PairsFormatError, load_pairs_data
from dist_unlearn.data.qa import read_chat_template
from dist_unlearn.eval.periodic import oracle_dir_for
from dist_unlearn.models.encoders import encoder_problem
from dist_unlearn.unlearning import OBJECTIVES, objective_from_config
from dist_unlearn.unlearning.reference import resolve_reference_mode


def validate_run(cfg: RunConfig) -> None:
    """Build every objective once so bad method parameters fail before Ray or DeepSpeed start.

    Raises:
        ConfigError: one line per problem, naming the field and the fix.
    """
    problems: list[str] = []
    unrun = [n for n in cfg.method.params if n not in cfg.method.names and n in OBJECTIVES]  # kept for another run
    for name in unrun:
        try:
            objective_from_config(cfg, name)
        except (TypeError, ValueError) as exc:
            problems.append(f"method.params.{name}: {exc} (this method is not in method.names)")
    for name in cfg.method.names:
        try:
            objective = objective_from_config(cfg, name)
        except (TypeError, ValueError) as exc:
            problems.append(f"method.params.{name}: {exc}")
            continue
        try:
            resolve_reference_mode(cfg, name, objective)
        except ValueError as exc:
            problems.append(str(exc))
        needs = objective.needs
        if needs.retain and cfg.train.retain_batch_size == 0:
            problems.append(
                f"train.retain_batch_size: '{name}' has a retain term but train.retain_batch_size=0. "
                "Fix: set train.retain_batch_size to a multiple of ray.num_workers, or method.retain_weight=0"
            )
        if needs.holdout and cfg.data.holdout_fraction == 0 and cfg.data.source == "fictitious":
            problems.append(
                f"data.holdout_fraction: '{name}' uses held-out examples but data.holdout_fraction=0. "
                "Fix: data.holdout_fraction=0.1"
            )
        if name == "contrastive" and cfg.train.retain_batch_size < cfg.train.forget_batch_size:
            problems.append(
                "train.retain_batch_size: 'contrastive' needs at least one retain negative per forget example. "
                f"Fix: train.retain_batch_size>={cfg.train.forget_batch_size}"
            )
    problems += _best_metric_problems(cfg)
    if cfg.job.kind == "contrastive":
        problems += contrastive_problems(cfg)
    problems += _prompt_format_problems(cfg)
    problems += _oracle_stats_problems(cfg)
    if is_formatted_source(cfg.data.source):  # tofu:DIR / muse:DIR: the subset files are there
        problem = source_problem(cfg.data.source)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems), problems)


def _best_metric_problems(cfg: RunConfig) -> list[str]:
    """``eval.best_metric`` that this run's periodic evaluation could never measure (it would keep no best
    model): forget quality and PrivLeak are measured against the oracle, which only the embedded model
    comes with unless ``eval.oracle_dir`` names one; PrivLeak also needs a holdout split. (A metric missing
    for a reason only the data shows falls back at run time: :class:`dist_unlearn.eval.periodic.RunEvaluator`.)"""
    metric = cfg.eval.best_metric
    if not cfg.eval.every_steps or metric not in ("forget_quality", "privleak_abs"):
        return []
    fix = "Fix: eval.best_metric=model_utility or eval.best_metric=neg_forget_prob"
    has_oracle = cfg.eval.oracle_dir or cfg.eval.oracle_stats or oracle_dir_for(cfg.model.path) is not None
    if cfg.model.path != EMBEDDED_MODEL and not has_oracle:
        return [
            f"eval.best_metric: {metric} is measured against an oracle (a model trained without the forget set), "
            f"which only the embedded model (model.path={EMBEDDED_MODEL}) comes with; with model.path="
            f"{cfg.model.path} the periodic evaluation (eval.every_steps={cfg.eval.every_steps}) could never "
            f"keep a best model. {fix}, or eval.oracle_dir=DIR (a model trained without the forget set) or "
            "eval.oracle_stats=FILE"
        ]
    if metric == "privleak_abs" and cfg.data.source == FICTITIOUS_SOURCE and cfg.data.holdout_fraction == 0:
        return [f"eval.best_metric: privleak_abs needs held-out examples but data.holdout_fraction=0. {fix}"]
    return []


def _saved_chat_template(model_dir: Path) -> bool:
    """Whether a saved tokenizer directory carries a chat template (its own file or tokenizer_config.json)."""
    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def _prompt_format_problems(cfg: RunConfig) -> list[str]:
    """``data.chat_template`` that is neither a file nor a template, and ``data.prompt_format=chat`` with a
    model whose tokenizer has no chat template (the embedded model's never has; a local directory is read;
    a hub name is checked when its tokenizer loads)."""
    data = cfg.data
    if data.chat_template:
        try:
            read_chat_template(data.chat_template)
        except ValueError as exc:
            return [str(exc)]
        return []
    if data.prompt_format != "chat":
        return []
    fix = "Fix: set data.chat_template=FILE.jinja (or the template text), or data.prompt_format=auto"
    if cfg.model.path == EMBEDDED_MODEL:
        return [f"data.prompt_format: chat, but the embedded model's tokenizer has no chat template. {fix}"]
    path = Path(cfg.model.path)
    if path.is_dir() and not _saved_chat_template(path):
        return [f"data.prompt_format: chat, but the tokenizer in {path} has no chat template. {fix}"]
    return []


def _oracle_stats_problems(cfg: RunConfig) -> list[str]:
    """``eval.oracle_stats`` that holds no usable forget truth ratios (read now, before any work)."""
    if not cfg.eval.oracle_stats:
        return []
    from dist_unlearn.eval.oracle_stats import load_oracle_stats

    try:
        load_oracle_stats(cfg.eval.oracle_stats)
    except ValueError as exc:
        return [str(exc)]
    return []


def contrastive_problems(cfg: RunConfig) -> list[str]:
    """The contrastive job's encoder and data, checked on the driver before any worker starts: ``model.path``
    must be a text encoder (:func:`~dist_unlearn.models.encoders.encoder_problem`), and a user
    ``contrastive.data`` is read in full (every row, the hard negatives asked for, the dev split) by the same
    function the workers load it with. One line per problem, naming the field (and file line) and the fix."""
    problems: list[str] = []
    if cfg.model.path != EMBEDDED_MODEL:
        problem = encoder_problem(cfg.model.path)
        if problem:
            problems.append(problem)
    c = cfg.contrastive
    if c.data == FICTITIOUS_SOURCE:
        return problems
    field = "contrastive.data"
    try:
        pairs = load_pairs_data(c.data, c.dev_data or None, c.hard_negatives, c.dev_fraction, cfg.data.seed)
    except PairsFormatError as exc:
        return problems + [f"{field}: {line}" for line in exc.problems]
    except (OSError, ValueError) as exc:
        message = str(exc)
        return problems + [message if message.startswith("contrastive.") else f"{field}: {message}"]
    if len(pairs.train) < c.global_batch_size:
        largest = len(pairs.train) // cfg.ray.num_workers * cfg.ray.num_workers
        problems.append(
            f"contrastive.global_batch_size ({c.global_batch_size}) is more than the {len(pairs.train)} training rows "
            f"of {pairs.source.train}: a batch would hold a row twice, its positive then also one of its negatives. "
            f"Fix: contrastive.global_batch_size={largest} or less, or more rows"
        )
    return problems
