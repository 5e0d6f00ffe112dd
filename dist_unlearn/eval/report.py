"""``report.md`` (one row per evaluated model) and ``tradeoff.png`` (forget quality vs model utility).

Inputs are ``eval.json`` files written by ``dist-unlearn eval`` / ``run`` / ``bench unlearning``: a run
directory ``R`` contributes ``R/eval.json`` and every ``R/*/eval.json`` (one per method), named by
their directory. Periodic evaluations (``eval.every_steps``) in ``R/<method>/eval_steps.jsonl`` add one
point per checkpoint to the plot. Both files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_unlearn.eval.suite import headline
from dist_unlearn.io import atomic_path, write_text_atomic

COLUMNS = (
    ("forget_quality", "forget quality ↑"),
    ("model_utility", "model utility (TOFU) ↑"),
    ("retain_utility", "retain utility ↑"),
    ("forget_rouge", "forget ROUGE-L ↓"),
    ("retain_rouge", "retain ROUGE-L ↑"),
    ("forget_prob", "forget prob ↓"),
    ("mia_auc", "MIA AUC (Min-K%++)"),
    ("privleak", "PrivLeak % (MUSE, →0)"),
    ("mia_auc_gap", "MIA AUC gap % (Min-K%++, →0)"),
    ("sampled_leak", "sampled leak ↓"),
)
ATTACK_COLUMNS = ("relearn", "nf4", "int8")
MUSE_COLUMNS = (
    ("verbmem_forget", "VerbMem forget (MUSE) ↓"),
    ("knowmem_forget", "KnowMem forget (MUSE) ↓"),
    ("knowmem_retain", "KnowMem retain (MUSE) ↑"),
)
"""Added to the table when some result has them (a MUSE benchmark, ``data.source=muse:DIR``)."""


def find_evals(run_dirs: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """``name → eval.json content`` for each run directory and each of its method subdirectories."""
    found: dict[str, dict[str, Any]] = {}
    for root in map(Path, run_dirs):
        if not root.is_dir():
            raise FileNotFoundError(f"report: {root} is not a directory (pass run directories of dist-unlearn eval)")
        candidates = [root / "eval.json", *sorted(root.glob("*/eval.json"))]
        for path in candidates:
            if path.is_file():
                name = path.parent.name
                if name in found:
                    name = f"{root.name}/{name}"
                found[name] = json.loads(path.read_text())
    if not found:
        raise FileNotFoundError(
            f"report: no eval.json under {', '.join(map(str, run_dirs))}; run dist-unlearn eval first"
        )
    return found


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) != 0 and (abs(value) < 10**-digits):
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _attack_cell(evaluation: dict[str, Any], name: str) -> str:
    attacked = evaluation.get("attacks", {}).get(name)
    if attacked is None:
        return "–"
    before, after = headline(evaluation["result"]), headline(attacked)
    return f"{_fmt(before['forget_rouge'], 2)} → {_fmt(after['forget_rouge'], 2)}"


def report_table(evals: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per model, :data:`COLUMNS` (plus :data:`MUSE_COLUMNS` when some result has
    them) and forget ROUGE-L before → after each attack."""
    heads = {name: headline(evaluation["result"]) for name, evaluation in evals.items()}
    muse = [col for col in MUSE_COLUMNS if any(h[col[0]] is not None for h in heads.values())]
    columns = (*COLUMNS, *muse)
    header = ["model", *(label for _, label in columns), *(f"{a}: forget ROUGE" for a in ATTACK_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, evaluation in evals.items():
        h = heads[name]
        cells = [name, *(_fmt(h[key]) for key, _ in columns), *(_attack_cell(evaluation, a) for a in ATTACK_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _utility(h: dict[str, float | None]) -> float | None:
    """The plot's x: TOFU's model utility when the benchmark has its sets, else our retain utility."""
    return h["model_utility"] if h["model_utility"] is not None else h["retain_utility"]


def _checkpoint_points(run_dir: Path) -> list[tuple[float, float, str]]:
    path = run_dir / "eval_steps.jsonl"
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        h = headline(record["result"])
        utility = _utility(h)
        if h["forget_quality"] is not None and utility is not None:
            points.append((utility, h["forget_quality"], f"step {record['step']}"))
    return points


def tradeoff_plot(evals: dict[str, dict[str, Any]], path: Path, run_dirs: Sequence[Path] = ()) -> None:
    """Scatter forget quality (log scale) vs model utility, one labelled point per model/checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, evaluation in evals.items():
        h = headline(evaluation["result"])
        utility = _utility(h)
        if h["forget_quality"] is None or utility is None:
            continue
        ax.scatter(utility, max(h["forget_quality"], 1e-30), s=40)
        ax.annotate(
            name,
            (utility, max(h["forget_quality"], 1e-30)),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    for root in run_dirs:
        for sub in sorted(p for p in Path(root).iterdir() if p.is_dir()):
            pts = _checkpoint_points(sub)
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [max(p[1], 1e-30) for p in pts],
                    ".--",
                    alpha=0.5,
                    label=f"{sub.name} checkpoints",
                )
    ax.set_yscale("log")
    ax.set_xlabel("model utility (TOFU, 9 numbers) where available, else retain utility (retain prob, ROUGE-L, TR)")
    ax.set_ylabel("forget quality (KS p-value vs oracle, log)")
    ax.set_title("Forget quality vs model utility")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, notes: str = ""
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``tradeoff.png`` into ``out_dir`` (default: the first run directory);
    ``notes`` (markdown) go after the table."""
    dirs = [Path(d) for d in run_dirs]
    evals = find_evals(dirs)
    out = Path(out_dir) if out_dir else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    png = out / "tradeoff.png"
    tradeoff_plot(evals, png, dirs)
    text = (
        "# Unlearning report\n\n"
        f"Models: {', '.join(evals)}. Forget quality: KS p-value of forget-set truth ratios vs the oracle; "
        "model utility (TOFU): harmonic mean of probability, ROUGE-L recall and truth-ratio statistic on "
        "each of retain, real authors and world facts (9 numbers; only with those sets); retain utility "
        "(ours): harmonic mean of the 3 retain numbers; "
        "MIA AUC: Min-K%++ (k = eval.min_k), forget (members) vs holdout; PrivLeak: MUSE's (Shi et al., "
        "2024): relative change of the Min-40% AUC (holdout as the positive side) vs the oracle's, "
        "−100 = as leaky as a model trained on the forget set, 0 = like the oracle; MIA AUC gap: ours, "
        "relative change of the Min-K%++ AUC vs the oracle's (positive = under-unlearned); sampled leak: "
        "fraction of sampled answers containing the whole true answer. Attack columns: forget ROUGE-L "
        "before → after the attack.\n\n" + report_table(evals) + "\n" + notes + "\n![tradeoff](tradeoff.png)\n"
    )
    md = write_text_atomic(out / "report.md", text)
    return md, png
