"""Evaluation: answer statistics, metrics and reports. Never imports Ray."""

from dist_unlearn.eval.answers import evaluate_splits, score_dataset, summarize_scores
from dist_unlearn.eval.tables import before_after_table

__all__ = ["before_after_table", "evaluate_splits", "score_dataset", "summarize_scores"]
