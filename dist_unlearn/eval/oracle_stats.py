"""The oracle's statistics as a file: forget quality (and PrivLeak) for any model without the oracle model.

TOFU's forget quality (Maini et al., 2024, arXiv:2401.06121) is the p-value of the two-sample
Kolmogorov–Smirnov test between the per-question forget truth ratios of the evaluated model and of a
model trained on the retain split only (:func:`dist_unlearn.eval.metrics.forget_quality`). Only the
oracle's *truth ratios* enter it, so they can be computed once and saved: open-unlearning ships them as
"retain logs". ``dist-unlearn eval`` and ``dist-unlearn run`` write ``OUTPUT/oracle_stats.json`` whenever
they evaluate an oracle model (``eval.oracle_dir`` or the embedded one); a later run or evaluation with
``eval.oracle_stats=FILE`` uses it as the reference instead of loading a model. MUSE's PrivLeak (Shi et
al., 2024) likewise needs only the retrained model's Min-40% AUC, which the file carries too. The file
(:func:`stats_from_result`; each statistic only when the oracle's evaluation had it)::

    {"format": "dist-unlearn oracle stats", "version": 1,
     "forget_truth_ratio": [TR_1, ..., TR_n],     # the oracle's per-question truth ratios (forget split)
     "privleak_auc": a, "mia_auc": {...},          # MUSE's Min-40% AUC and our attacks' AUCs, when scored
     "meta": {"source": ..., "prompt_format": ..., "max_length": ..., "max_examples": ..., "oracle_dir": ...}}

Floats are written as JSON numbers (Python's shortest round-trip repr), so the reference read back is the
one computed: forget quality from the file equals forget quality from the oracle model.

:func:`load_oracle_stats` also reads open-unlearning's retain-model evaluation JSON (e.g. its
``TOFU_EVAL.json``): the scores of ``forget_truth_ratio.value_by_index`` in index order. Its truth ratio
is a per-question ratio of wrong to correct answer probabilities as ours (the KS p-value does not change
when one side is replaced by its reciprocal, since KS is invariant under monotone maps of both samples;
it does change if the oracle was evaluated on other questions or with another prompt format).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dist_unlearn.io import write_json_atomic

ORACLE_STATS_FILE = "oracle_stats.json"
STATS_FORMAT = "dist-unlearn oracle stats"
STATS_VERSION = 1
_FIX = "Fix: give the oracle_stats.json written by dist-unlearn eval with the oracle, or use eval.oracle_dir"


def stats_from_result(result: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The file's content from the oracle's :func:`~dist_unlearn.eval.suite.evaluate_model` result;
    ``None`` when it has neither forget truth ratios (no perturbed answers) nor a PrivLeak AUC."""
    ratios = result.get("per_example", {}).get("forget_truth_ratio")
    stats: dict[str, Any] = {"format": STATS_FORMAT, "version": STATS_VERSION}
    if ratios:
        stats["forget_truth_ratio"] = list(ratios)
    for key in ("privleak_auc", "mia_auc"):
        if key in result:
            stats[key] = result[key]
    if "forget_truth_ratio" not in stats and "privleak_auc" not in stats:
        return None
    stats["meta"] = dict(meta or {})
    return stats


def stats_meta(cfg: Any, oracle_dir: str | None) -> dict[str, Any]:
    """What the statistics were computed on (run config ``cfg``: data, prompt format, lengths; the oracle)."""
    data = cfg.data
    return {
        "source": data.source,
        "prompt_format": data.prompt_format,
        "chat_template": bool(data.chat_template),
        "max_length": data.max_length,
        "max_examples": cfg.eval.max_examples,
        "oracle_dir": oracle_dir,
    }


def write_oracle_stats(path: str | Path, result: dict[str, Any], meta: dict[str, Any] | None = None) -> Path | None:
    """Write :func:`stats_from_result` to ``path`` atomically (temp name, then rename); returns the path,
    or ``None`` (nothing written) when the result has no statistics to keep."""
    stats = stats_from_result(result, meta)
    if stats is None:
        return None
    write_json_atomic(Path(path), stats)
    return Path(path)


def _open_unlearning_ratios(data: dict[str, Any]) -> list[float] | None:
    """Scores of open-unlearning's ``forget_truth_ratio.value_by_index`` in index order, else ``None``."""
    by_index = data.get("forget_truth_ratio", {})
    by_index = by_index.get("value_by_index") if isinstance(by_index, dict) else None
    if not isinstance(by_index, dict) or not by_index:
        return None
    keys = sorted(by_index, key=lambda k: (len(str(k)), str(k)))
    return [float(by_index[k]["score"]) for k in keys]


def _ratios(data: Any) -> list[float] | None:
    if not isinstance(data, dict):
        return None
    ratios = data.get("forget_truth_ratio")
    if isinstance(ratios, list):
        return [float(r) for r in ratios]
    return _open_unlearning_ratios(data)


def load_oracle_stats(path: str | Path) -> dict[str, Any]:
    """A reference for :func:`~dist_unlearn.eval.suite.compare_to_reference` from a statistics file:
    ``{"per_example": {"forget_truth_ratio"?: [...]}, "privleak_auc"?, "mia_auc"?, "stats_file": path}``.

    ValueError (one line naming ``eval.oracle_stats`` and the fix) for a missing or unreadable file, one
    with neither truth ratios nor a PrivLeak AUC, or truth ratios that are not positive finite numbers."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"eval.oracle_stats: file not found: {path}. {_FIX}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"eval.oracle_stats: could not read {path} as JSON ({exc}). {_FIX}") from None
    try:
        ratios = _ratios(data)
    except (TypeError, ValueError, KeyError, AttributeError):
        ratios = None
    has_auc = isinstance(data, dict) and isinstance(data.get("privleak_auc"), (int, float))
    if not ratios and not has_auc:
        raise ValueError(
            f"eval.oracle_stats: {path} holds no forget truth ratios (a 'forget_truth_ratio' list, or "
            f"open-unlearning's forget_truth_ratio.value_by_index) and no privleak_auc. {_FIX}"
        )
    if ratios and not all(math.isfinite(r) and r > 0 for r in ratios):
        raise ValueError(f"eval.oracle_stats: {path} has truth ratios that are not positive finite numbers. {_FIX}")
    per_example = {"forget_truth_ratio": ratios} if ratios else {}
    reference: dict[str, Any] = {"per_example": per_example, "stats_file": str(path)}
    for key in ("privleak_auc", "mia_auc"):
        if key in data:
            reference[key] = data[key]
    return reference
