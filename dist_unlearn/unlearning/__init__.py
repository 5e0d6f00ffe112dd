"""Unlearning objectives (registry) and reference-model strategies. Never imports Ray."""

from dist_unlearn.unlearning.batch import DataNeeds, UnlearnBatch
from dist_unlearn.unlearning.objectives import (
    OBJECTIVES,
    ObjectiveOutput,
    UnlearningObjective,
    get_objective,
    objective_from_config,
    register_objective,
)
from dist_unlearn.unlearning.reference import REFERENCE_MODES, Reference, build_reference

__all__ = [
    "OBJECTIVES",
    "REFERENCE_MODES",
    "DataNeeds",
    "ObjectiveOutput",
    "Reference",
    "UnlearnBatch",
    "UnlearningObjective",
    "build_reference",
    "get_objective",
    "objective_from_config",
    "register_objective",
]
