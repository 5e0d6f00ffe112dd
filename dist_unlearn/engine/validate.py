"""The registries the config checks need from the layers above ``config``, and :func:`validate_run`."""

from __future__ import annotations

from dist_unlearn.config import RunConfig
from dist_unlearn.config.validate import Registries, validate_config
from dist_unlearn.data.formats import source_problem
from dist_unlearn.data.pairs import load_pairs_data
from dist_unlearn.data.qa import read_chat_template
from dist_unlearn.eval.oracle_stats import load_oracle_stats
from dist_unlearn.eval.periodic import oracle_dir_for
from dist_unlearn.models.encoders import encoder_problem
from dist_unlearn.unlearning import OBJECTIVES, objective_from_config
from dist_unlearn.unlearning.reference import resolve_reference_mode


def run_registries() -> Registries:
    """Every registry the checks of :mod:`dist_unlearn.config.validate` ask."""
    return Registries(
        methods=OBJECTIVES,
        build_objective=objective_from_config,
        check_reference=resolve_reference_mode,
        embedded_oracle=oracle_dir_for,
        encoder_problem=encoder_problem,
        load_pairs=load_pairs_data,
        source_problem=source_problem,
        read_chat_template=read_chat_template,
        load_oracle_stats=load_oracle_stats,
    )


def validate_run(cfg: RunConfig) -> None:
    """Check ``cfg`` for its job kind with every registry, so that bad method parameters, data files or
    encoders fail before Ray or DeepSpeed start; raises ConfigError, one line per problem."""
    validate_config(cfg, run_registries())
