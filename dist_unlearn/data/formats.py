"""TOFU- and MUSE-format QA data → the package's :class:`~dist_unlearn.data.facts.QAItem` records.

A source is ``tofu:LOCATION[@FORGET]`` or ``muse:LOCATION``. ``LOCATION`` is a local directory of
``.json`` / ``.jsonl`` / ``.parquet`` files named after the subsets, or, when no such directory exists, a
Hugging Face hub dataset name read with ``datasets.load_dataset`` (needs the optional ``datasets``
package and a network; the records then go through the same conversion).

* **TOFU** (Maini et al., 2024, arXiv:2401.06121; hub ``locuslab/TOFU``): forget subset ``FORGET``
  (default ``forget10``) from ``FORGET_perturbed`` (else ``FORGET``); retain from ``retain_perturbed``
  (else ``retainN`` with ``N = 100 − forget %``); holdout from ``holdoutN``. Fields ``question``,
  ``answer``, optional ``paraphrased_answer`` and ``perturbed_answer`` (a list).
* **MUSE** knowledge-memorisation QA (Shi et al., 2024, arXiv:2407.06460; hub ``muse-bench/MUSE-News``,
  config ``knowmem``): ``forget_qa`` → forget, ``retain_qa`` → retain, optional ``holdout_qa`` →
  holdout. Fields ``question``, ``answer`` (MUSE has no paraphrased/perturbed answers, so truth ratio
  and forget quality are not defined on it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_unlearn.data.facts import FactsBenchmark, QAItem

FORMATS = ("tofu", "muse")
_SUFFIXES = (".json", ".jsonl", ".parquet")


def is_formatted_source(source: str) -> bool:
    """True for ``tofu:...`` / ``muse:...`` sources."""
    return source.split(":", 1)[0] in FORMATS and ":" in source


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else list(data.get("data", data.get("train", [])))


def _subset_reader(location: str, hub_config_of: dict[str, str]):
    """A function ``subset name → records or None``: local files first, else the hub."""
    root = Path(location).expanduser()
    if root.is_dir():

        def local(name: str) -> list[dict[str, Any]] | None:
            for suffix in _SUFFIXES:
                if (root / f"{name}{suffix}").is_file():
                    return _read_records(root / f"{name}{suffix}")
            return None

        return local
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(
            f"data.source: {location} is not a local directory and the 'datasets' package is not installed. "
            "Fix: give a directory of .json/.jsonl/.parquet subset files, or pip install datasets (needs a network)"
        ) from exc

    def hub(name: str) -> list[dict[str, Any]] | None:
        config, split = hub_config_of.get(name, name), "train"
        if ":" in config:
            config, split = config.split(":", 1)
        try:
            return list(datasets.load_dataset(location, config, split=split))
        except (ValueError, FileNotFoundError):
            return None

    return hub


def _items(records: list[dict[str, Any]], split: str, source: str) -> list[QAItem]:
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
            raise ValueError(f"{source}: {split} record {i} needs string fields 'question' and 'answer'")
        perturbed = rec.get("perturbed_answer") or rec.get("perturbed_answers") or []
        if isinstance(perturbed, str):
            perturbed = [perturbed]
        out.append(
            QAItem(
                person=str(rec.get("person", "")),
                attribute=str(rec.get("attribute", "")),
                question=rec["question"],
                answer=rec["answer"],
                paraphrased_answer=rec.get("paraphrased_answer") or rec["answer"],
                perturbed_answers=tuple(str(p) for p in perturbed),
                split=split,
            )
        )
    return out


def _first(read, names: list[str]) -> list[dict[str, Any]] | None:
    for name in names:
        records = read(name)
        if records is not None:
            return records
    return None


def load_tofu(location: str, forget: str = "forget10") -> FactsBenchmark:
    """TOFU subsets at ``location`` (directory or hub name) as a :class:`FactsBenchmark`."""
    pct = int("".join(ch for ch in forget if ch.isdigit()) or 10)
    read = _subset_reader(location, {})
    source = f"tofu:{location}"
    forget_recs = _first(read, [f"{forget}_perturbed", forget])
    retain_recs = _first(read, ["retain_perturbed", f"retain{100 - pct}"])
    if forget_recs is None or retain_recs is None:
        raise ValueError(
            f"data.source: {source} lacks the {forget}(_perturbed) or retain_perturbed/retain{100 - pct} subset. "
            "Fix: add those files (.json/.jsonl/.parquet) or choose another forget subset with @forgetNN"
        )
    holdout_recs = _first(read, [f"holdout{pct:02d}", f"holdout{pct}"]) or []
    items = _items(forget_recs, "forget", source) + _items(retain_recs, "retain", source)
    return FactsBenchmark(items=tuple(items + _items(holdout_recs, "holdout", source)))


def load_muse(location: str) -> FactsBenchmark:
    """MUSE knowmem QA subsets at ``location`` (directory or hub name, config ``knowmem``)."""
    read = _subset_reader(location, {"forget_qa": "knowmem:forget_qa", "retain_qa": "knowmem:retain_qa"})
    source = f"muse:{location}"
    forget_recs, retain_recs = read("forget_qa"), read("retain_qa")
    if forget_recs is None or retain_recs is None:
        raise ValueError(
            f"data.source: {source} lacks forget_qa or retain_qa. Fix: add forget_qa.json and retain_qa.json"
        )
    items = _items(forget_recs, "forget", source) + _items(retain_recs, "retain", source)
    return FactsBenchmark(items=tuple(items + _items(read("holdout_qa") or [], "holdout", source)))


def load_formatted(source: str) -> FactsBenchmark:
    """Dispatch ``tofu:LOCATION[@FORGET]`` / ``muse:LOCATION`` to :func:`load_tofu` / :func:`load_muse`."""
    kind, rest = source.split(":", 1)
    if kind == "tofu":
        location, _, forget = rest.partition("@")
        return load_tofu(location, forget or "forget10")
    if kind == "muse":
        return load_muse(rest)
    raise ValueError(f"data.source: unknown format {kind!r}. Fix: use tofu:PATH or muse:PATH")
