"""The objective of ``dist-unlearn sweep`` and its outputs (no Ray): scores, ranking, Pareto front, the
results table (JSON + markdown) and the forget-quality-vs-utility plot (PNG).

Objective: the best ``forget_quality`` among trials whose utility is at least ``x`` times the target's
(``x`` = ``sweep.min_utility_ratio``). Both numbers are the suite's (:mod:`dist_unlearn.eval.suite`):
forget quality is the KS-test p-value of the forget truth ratios against the oracle's; utility is the
first of ``model_utility`` (TOFU's 9 numbers, only with real-authors and world-facts sets),
``retain_utility`` (ours: retain probability, ROUGE-L, truth ratio) and ``retain_utility_no_rouge``
(the same without ROUGE-L, what a periodic evaluation without generation has) that the trial's result
has, divided by the target's value of the *same* metric (the target is evaluated once with the full
suite, which computes all three).

Score (higher is better, the number Ray Tune's scheduler compares): ``forget_quality`` (≥ 0) when the
utility ratio is ≥ x, else ``-1 / (1 + ratio)`` (< 0): a trial that violates the constraint ranks below
every trial that meets it, and among violators the one closer to the target's utility ranks higher. A
result without forget quality or utility scores ``-inf``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dist_unlearn.io import atomic_path, write_json_atomic, write_text_atomic

UTILITY_METRICS = ("model_utility", "retain_utility", "retain_utility_no_rouge")
"""Utility metrics in order of preference; a trial is compared with the target on the first it has."""

DONE, STOPPED, ERROR, PENDING = "done", "stopped early", "error", "not finished"


def result_numbers(result: Mapping[str, Any]) -> dict[str, float]:
    """The top-level numbers of an evaluation result (forget quality, utilities, PrivLeak, ...)."""
    return {
        key: float(value)
        for key, value in result.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    }


@dataclass(frozen=True)
class Objective:
    """Forget quality subject to utility ≥ ``min_ratio`` × the target's (``target``: the target model's
    utility numbers, :data:`UTILITY_METRICS` → value)."""

    min_ratio: float
    target: dict[str, float]

    def utility(self, result: Mapping[str, Any]) -> tuple[str | None, float | None, float | None]:
        """``(metric, value, value / target's value)`` on the first utility metric both sides have."""
        for metric in UTILITY_METRICS:
            value, reference = result.get(metric), self.target.get(metric)
            if value is not None and reference:
                return metric, float(value), float(value) / float(reference)
        return None, None, None

    def measure(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """Forget quality, utility (metric, value, ratio), feasibility and score of one result."""
        metric, utility, ratio = self.utility(result)
        fq = result.get("forget_quality")
        fq = None if fq is None else float(fq)
        return {
            "forget_quality": fq,
            "utility": utility,
            "utility_metric": metric,
            "utility_ratio": ratio,
            "feasible": ratio is not None and ratio >= self.min_ratio,
            "score": score(fq, ratio, self.min_ratio),
        }


def score(forget_quality: float | None, ratio: float | None, min_ratio: float) -> float:
    """The objective as one number (module docstring): ``forget_quality`` when ``ratio ≥ min_ratio``, else
    ``-1/(1+ratio)``; ``-inf`` when either is missing."""
    if forget_quality is None or ratio is None:
        return float("-inf")
    return forget_quality if ratio >= min_ratio else -1.0 / (1.0 + max(ratio, 0.0))


@dataclass
class TrialRow:
    """One trial of a sweep as the table shows it."""

    index: int
    name: str
    overrides: dict[str, Any]
    status: str
    step: int | None = None
    forget_quality: float | None = None
    utility: float | None = None
    utility_metric: str | None = None
    utility_ratio: float | None = None
    feasible: bool = False
    score: float = float("-inf")
    pareto: bool = False
    run_dir: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def rank(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Best first: by score (feasible trials by forget quality, then violators by utility ratio), ties by
    utility; trials without a score last, in index order."""
    return sorted(rows, key=lambda r: (-r.score, -(r.utility or 0.0), r.index))


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """For points ``(utility, forget quality)`` (both higher = better; ``None`` = not measured), whether
    each is on the Pareto front: no other point is at least as good in both and better in one."""
    flags = []
    for i, (u, f) in enumerate(points):
        if u is None or f is None:
            flags.append(False)
            continue
        dominated = any(
            j != i and v is not None and g is not None and v >= u and g >= f and (v > u or g > f)
            for j, (v, g) in enumerate(points)
        )
        flags.append(not dominated)
    return flags


def mark_pareto(rows: Sequence[TrialRow]) -> None:
    """Set ``pareto`` on each row (finished and early-stopped trials with both numbers)."""
    flags = pareto_front([(r.utility, r.forget_quality) for r in rows])
    for row, flag in zip(rows, flags, strict=True):
        row.pareto = flag


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _overrides_text(overrides: Mapping[str, Any]) -> str:
    from dist_unlearn.config.sweep import override_args

    return " ".join(override_args(overrides)) or "(base config)"


def table_markdown(rows: Sequence[TrialRow], objective: Objective) -> str:
    """Markdown table, best first: rank, trial, overrides, forget quality, utility, ratio, constraint,
    Pareto, status."""
    lines = [
        "| rank | trial | overrides | forget quality ↑ | utility ↑ (metric) | ratio to target | "
        f"≥ {objective.min_ratio:g}× | Pareto | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for position, row in enumerate(rank(rows), start=1):
        utility = "–" if row.utility is None else f"{_fmt(row.utility)} ({row.utility_metric})"
        status = row.status + (f" at step {row.step}" if row.status == STOPPED and row.step else "")
        if row.error:
            status += f": {row.error}"
        lines.append(
            f"| {position} | {row.index} | `{_overrides_text(row.overrides)}` | {_fmt(row.forget_quality)} | "
            f"{utility} | {_fmt(row.utility_ratio)} | {'yes' if row.feasible else 'no'} | "
            f"{'yes' if row.pareto else ''} | {status} |"
        )
    return "\n".join(lines)


def pareto_plot(rows: Sequence[TrialRow], objective: Objective, path: Path) -> Path:
    """Scatter forget quality (log) vs utility ratio to the target, one labelled point per measured trial
    (finished: filled, stopped early: hollow), the Pareto front as a line and the constraint ``x`` as a
    vertical line; written to a temporary name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    measured = [r for r in rows if r.utility_ratio is not None and r.forget_quality is not None]
    for row in measured:
        y = max(row.forget_quality or 0.0, 1e-30)
        done = row.status == DONE
        ax.scatter(
            row.utility_ratio,
            y,
            s=45,
            facecolors="tab:blue" if done else "none",
            edgecolors="tab:blue" if row.feasible else "tab:red",
        )
        ax.annotate(str(row.index), (row.utility_ratio, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((r for r in measured if r.pareto), key=lambda r: r.utility_ratio or 0.0)
    if front:
        ax.plot(
            [r.utility_ratio for r in front],
            [max(r.forget_quality or 0.0, 1e-30) for r in front],
            "--",
            color="tab:green",
            label="Pareto front",
        )
    ax.axvline(objective.min_ratio, color="gray", linestyle=":", label=f"utility = {objective.min_ratio:g}× target's")
    ax.set_yscale("log")
    ax.set_xlabel("utility / target's utility (same metric; see the table)")
    ax.set_ylabel("forget quality (KS p-value vs oracle, log)")
    ax.set_title("Sweep: forget quality vs utility (filled: finished, hollow: stopped early)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_results(
    out_dir: Path, rows: Sequence[TrialRow], objective: Objective, meta: Mapping[str, Any]
) -> tuple[Path, Path, Path]:
    """``results.json``, ``results.md`` and ``pareto.png`` in ``out_dir`` (each written atomically);
    ``meta`` (command, target, settings) goes into the JSON and above the markdown table."""
    mark_pareto(rows)
    ranked = rank(rows)
    data = {
        **meta,
        "objective": {
            "min_utility_ratio": objective.min_ratio,
            "target_utility": objective.target,
            "definition": "best forget_quality among trials with utility >= min_utility_ratio x the target's "
            "(same utility metric); violators rank below, by utility ratio",
        },
        "trials": [_row_json(r) for r in ranked],
    }
    json_path = write_json_atomic(Path(out_dir) / "results.json", data)
    best = ranked[0] if ranked and ranked[0].score > float("-inf") else None
    text = (
        "# Sweep results\n\n"
        f"Objective: best forget quality (KS p-value vs the oracle) among trials whose utility is at least "
        f"{objective.min_ratio:g}× the target's, on the same metric (model_utility when the benchmark has "
        "TOFU's sets, else retain_utility; retain_utility_no_rouge for trials stopped early at a periodic "
        "evaluation without generation). Trials that miss the constraint rank below, by their utility ratio.\n\n"
        + table_markdown(rows, objective)
        + "\n\n"
        + (_best_text(best, objective) if best else "")
        + "![pareto](pareto.png)\n"
    )
    md_path = write_text_atomic(Path(out_dir) / "results.md", text)
    png_path = pareto_plot(rows, objective, Path(out_dir) / "pareto.png")
    return json_path, md_path, png_path


def _best_text(best: TrialRow, objective: Objective) -> str:
    if best.feasible:
        return f"Best: trial {best.index}.\n\n"
    return f"No trial keeps utility ≥ {objective.min_ratio:g}× the target's; closest: trial {best.index}.\n\n"


def _row_json(row: TrialRow) -> dict[str, Any]:
    data = asdict(row)
    if data["score"] == float("-inf"):
        data["score"] = None
    return data


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The trial rows of a ``results.json``."""
    return list(json.loads(Path(path).read_text())["trials"])
