"""Unlearning objectives (registry) and reference-model strategies. Never imports Ray."""

from dist_unlearn.unlearning.objectives import (
    OBJECTIVES,
    ObjectiveOutput,
    UnlearningObjective,
    get_objective,
    objective_from_config,
)

__all__ = ["OBJECTIVES", "ObjectiveOutput", "UnlearningObjective", "get_objective", "objective_from_config"]
