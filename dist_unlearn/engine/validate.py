"""Checks of a run config that need the objective registry (the schema checks live in ``config/``)."""

from __future__ import annotations

from dist_unlearn.config import ConfigError, RunConfig
from dist_unlearn.unlearning import objective_from_config


def resolve_reference_mode(cfg: RunConfig, name: str, needs_reference: bool) -> str:
    """The reference strategy for method ``name``: ``auto`` -> ``cached`` when it needs π_ref, else ``none``.

    Raises:
        ValueError: ``method.reference=none`` for a method that needs a reference model.
    """
    mode = cfg.method.reference
    if mode == "auto":
        return "cached" if needs_reference else "none"
    if mode == "none" and needs_reference:
        raise ValueError(
            f"method.reference: '{name}' needs a reference model but method.reference=none. "
            "Fix: method.reference=cached (or auto)"
        )
    return mode


def validate_run(cfg: RunConfig) -> None:
    """Build every objective once so bad method parameters fail before Ray or DeepSpeed start.

    Raises:
        ConfigError: one line per problem, naming the field and the fix.
    """
    problems: list[str] = []
    for name in cfg.method.names:
        try:
            objective = objective_from_config(cfg, name)
        except (TypeError, ValueError) as exc:
            problems.append(f"method.params.{name}: {exc}")
            continue
        try:
            resolve_reference_mode(cfg, name, objective.needs_reference)
        except ValueError as exc:
            problems.append(str(exc))
        if objective.uses_retain and cfg.train.retain_batch_size == 0 and cfg.method.retain_weight > 0:
            problems.append(
                f"train.retain_batch_size: '{name}' has a retain term but train.retain_batch_size=0. "
                "Fix: set train.retain_batch_size to a multiple of ray.num_workers, or method.retain_weight=0"
            )
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems), problems)
