"""Plain-text tables of run summaries (the quickstart's before/after table)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def before_after_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per method: forget/retain answer probability and token accuracy, before -> after.

    ``summaries`` maps a method name to its ``metrics.json`` content (``before``/``after`` per split).
    """
    header = ("method", "forget prob", "forget acc", "retain prob", "retain acc")
    rows = [header]
    for method, summary in summaries.items():
        cells = [method]
        for split in ("forget", "retain"):
            for key in ("prob", "acc"):
                b, a = summary["before"][split][key], summary["after"][split][key]
                cells.append(f"{b:.3f} -> {a:.3f}")
        rows.append(tuple(cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def retrieval_table(summary: Mapping[str, Any]) -> str:
    """Held-out retrieval metrics of a contrastive run, before -> after."""
    keys = [k for k in summary["before"] if k in summary["after"]]
    width = max(len(k) for k in keys)
    lines = [f"{'metric'.ljust(width)}  before  after", f"{'-' * width}  ------  -----"]
    lines += [f"{k.ljust(width)}  {summary['before'][k]:.3f}   {summary['after'][k]:.3f}" for k in keys]
    return "\n".join(lines)
