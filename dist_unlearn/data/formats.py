"""TOFU- and MUSE-format QA data → the package's :class:`~dist_unlearn.data.facts.QAItem` records.

A source is ``tofu:LOCATION[@FORGET]`` or ``muse:LOCATION``. ``LOCATION`` is a local directory of
``.json`` / ``.jsonl`` / ``.parquet`` files named after the subsets, or, when no such directory exists, a
Hugging Face hub dataset name read with ``datasets.load_dataset`` (needs the optional ``datasets``
package and a network; the records then go through the same conversion).

* **TOFU** (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv:2401.06121;
  hub ``locuslab/TOFU``): forget subset ``FORGET`` (``forget01``, ``forget05`` or ``forget10``, default
  ``forget10``) from ``FORGET_perturbed`` (else ``FORGET``). The retain term trains on TOFU's matching
  retain split, the complement of the forget split: ``retainN`` with ``N = 100 − forget %``
  (``retain90`` for ``forget10``, ``retain95`` for ``forget05``, ``retain99`` for ``forget01``).
  ``retain_perturbed`` (TOFU's 400 retain questions with paraphrased and perturbed answers) is *not*
  trained on: it is the evaluation set of the retain split (:meth:`TofuBenchmark.evaluation_split`),
  as in TOFU, and ``real_authors(_perturbed)`` / ``world_facts(_perturbed)`` are loaded as evaluation
  sets when present. Holdout (non-members for the attacks) from ``holdoutNN``. Fields ``question``,
  ``answer``, optional ``paraphrased_answer`` and ``perturbed_answer`` (a list).
* **MUSE** (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models",
  arXiv:2407.06460; hub ``muse-bench/MUSE-News`` / ``MUSE-Books``, whose subsets are the folders below).
  Training is on the *raw* corpora, as in MUSE: ``raw/forget`` → forget, ``raw/retain1`` → retain (MUSE's
  retain set for the retain term; ``raw/retain2`` is only evaluated), ``raw/holdout`` → holdout. A raw
  file is ``.txt`` (the whole file is one document) or ``.json/.jsonl/.parquet`` records that are strings
  or objects with a ``text`` field (one document each). Each document is an item with an empty
  ``question``, which :class:`~dist_unlearn.data.qa.QADataset` cuts into ``data.max_length`` token
  windows that are trained on in full (no prompt). Evaluation files (:class:`MuseBenchmark`), each
  optional: ``verbmem/forget`` (records ``prompt``, ``gt``: VerbMem's excerpts; without it VerbMem is
  built from the raw forget documents), ``knowmem/forget_qa``, ``knowmem/retain_qa`` (``question``,
  ``answer``; KnowMem) with their few-shot examples ``knowmem/forget_qa_icl``, ``knowmem/retain_qa_icl``,
  and ``privleak/forget``, ``privleak/retain``, ``privleak/holdout`` (texts scored by the Min-K% attack
  of PrivLeak; without them the raw forget / holdout documents). Layout of ``muse:DIR``::

      DIR/raw/forget.txt  raw/retain1.txt  [raw/retain2.txt  raw/holdout.txt]
      DIR/verbmem/forget.json               [{"prompt": ..., "gt": ...}, ...]
      DIR/knowmem/forget_qa.json  forget_qa_icl.json  retain_qa.json  retain_qa_icl.json
      DIR/privleak/forget.json  retain.json  holdout.json      ["text", ...]

  (any of ``.txt/.json/.jsonl/.parquet``; the knowmem files may also sit at the top level, as
  ``DIR/forget_qa.json``). A hub name reads subset ``raw`` split ``forget`` for ``raw/forget``, etc.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_unlearn.config.schema import SOURCE_FORMATS
from dist_unlearn.data.facts import FactsBenchmark, QAItem

FORMATS = SOURCE_FORMATS  # the config lists them (config/schema.py): one source
TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")
TOFU_EVAL_SETS = ("retain", "real_authors", "world_facts")
"""TOFU's model-utility evaluation sets (``retain`` = ``retain_perturbed``)."""


@dataclass(frozen=True)
class TofuBenchmark(FactsBenchmark):
    """TOFU data: the training splits (``items``: forget, matching retain, holdout) plus TOFU's evaluation
    sets, which differ from the training splits (``evaluation``: ``(name, items)`` pairs, names from
    :data:`TOFU_EVAL_SETS`)."""

    evaluation: tuple[tuple[str, tuple[QAItem, ...]], ...] = ()

    def evaluation_split(self, name: str) -> list[QAItem]:
        """The items evaluation scores for ``name``: TOFU's evaluation set of that name when loaded
        (``retain`` → ``retain_perturbed``, ``real_authors``, ``world_facts``), else the training split
        (forget, holdout; ``[]`` for an evaluation-only set that is absent)."""
        for key, items in self.evaluation:
            if key == name:
                return list(items)
        return self.split(name) if name in ("forget", "retain", "holdout") else []


_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


def is_formatted_source(source: str) -> bool:
    """True for ``tofu:...`` / ``muse:...`` sources."""
    return source.split(":", 1)[0] in FORMATS and ":" in source


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [{"text": text}]
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
        config, split = hub_config_of.get(name, name.replace("/", ":")), "train"
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


def load_tofu(location: str, forget: str = "forget10") -> TofuBenchmark:
    """TOFU subsets at ``location`` (directory or hub name) as a :class:`TofuBenchmark` (see module doc)."""
    source = f"tofu:{location}"
    if forget not in TOFU_FORGET_SPLITS:
        raise ValueError(
            f"data.source: {source}@{forget} names no TOFU forget split. Fix: use @forget01, @forget05 or @forget10"
        )
    pct = int(forget[len("forget") :])
    retain = f"retain{100 - pct}"
    read = _subset_reader(location, {})
    forget_recs = _first(read, [f"{forget}_perturbed", forget])
    retain_recs = read(retain)
    if forget_recs is None or retain_recs is None:
        raise ValueError(
            f"data.source: {source} lacks the {forget}(_perturbed) or {retain} subset (the retain term trains on "
            f"{retain}, the complement of {forget}). Fix: add those files (.json/.jsonl/.parquet) or choose another "
            "forget subset with @forgetNN"
        )
    holdout_recs = _first(read, [f"holdout{pct:02d}", f"holdout{pct}"]) or []
    items = _items(forget_recs, "forget", source) + _items(retain_recs, "retain", source)
    evaluation = []
    for name, files in (
        ("retain", ["retain_perturbed"]),
        ("real_authors", ["real_authors_perturbed", "real_authors"]),
        ("world_facts", ["world_facts_perturbed", "world_facts"]),
    ):
        records = _first(read, files)
        if records is not None:
            evaluation.append((name, tuple(_items(records, "retain" if name == "retain" else name, source))))
    return TofuBenchmark(items=tuple(items + _items(holdout_recs, "holdout", source)), evaluation=tuple(evaluation))


MUSE_NEEDED = (("raw/forget", "forget"), ("raw/retain1", "raw/retain", "retain1"))
"""Subset files a ``muse:DIR`` must hold (any one name of each group): the raw forget and retain corpora."""


@dataclass(frozen=True)
class MuseBenchmark(FactsBenchmark):
    """MUSE data: raw-text training items (``items``: forget, retain = ``retain1``, holdout; empty
    ``question``, the document in ``answer``) and MUSE's evaluation sets (see the module doc):

    * ``evaluation``: ``(name, items)`` for PrivLeak's texts (``forget`` / ``retain`` / ``holdout`` from
      ``privleak/*`` when present) and ``retain2`` (the raw retain2 corpus);
    * ``verbmem``: ``(prompt, gt)`` pairs of ``verbmem/forget`` (``()`` → built from the raw forget texts);
    * ``knowmem``: ``(name, qa_items, icl_items)`` for ``forget`` and ``retain`` (QA pairs and few-shot
      examples).
    """

    evaluation: tuple[tuple[str, tuple[QAItem, ...]], ...] = ()
    verbmem: tuple[tuple[str, str], ...] = ()
    knowmem: tuple[tuple[str, tuple[QAItem, ...], tuple[QAItem, ...]], ...] = ()

    def evaluation_split(self, name: str) -> list[QAItem]:
        """The items evaluation scores for ``name``: PrivLeak's texts when loaded, else the training split."""
        for key, items in self.evaluation:
            if key == name:
                return list(items)
        return self.split(name) if name in ("forget", "retain", "holdout") else []

    def verbmem_pairs(self) -> list[tuple[str, str]]:
        """``verbmem/forget``'s ``(prompt, gt)`` pairs (``[]`` when the directory has none)."""
        return list(self.verbmem)

    def knowmem_set(self, name: str) -> tuple[list[QAItem], list[QAItem]]:
        """KnowMem's ``(questions, few-shot examples)`` of ``forget`` or ``retain`` (``([], [])`` if absent)."""
        for key, qa, icl in self.knowmem:
            if key == name:
                return list(qa), list(icl)
        return [], []


def _texts(records: list[Any], split: str, source: str) -> list[QAItem]:
    """Raw-text records (strings, or objects with ``text``) as items with an empty question."""
    out = []
    for i, rec in enumerate(records):
        text = rec if isinstance(rec, str) else rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{source}: {split} text record {i} must be a string or have a string field 'text'")
        if text.strip():
            out.append(
                QAItem(
                    person="",
                    attribute="",
                    question="",
                    answer=text,
                    paraphrased_answer=text,
                    perturbed_answers=(),
                    split=split,
                )
            )
    return out


def load_muse(location: str) -> MuseBenchmark:
    """MUSE subsets at ``location`` (directory or hub name) as a :class:`MuseBenchmark` (see module doc)."""
    read = _subset_reader(location, {})
    source = f"muse:{location}"
    forget_recs, retain_recs = (_first(read, list(names)) for names in MUSE_NEEDED)
    if forget_recs is None or retain_recs is None:
        raise ValueError(
            f"data.source: {source} lacks the raw forget or retain corpus (MUSE trains on raw/forget and "
            "raw/retain1). Fix: add raw/forget.txt and raw/retain1.txt (or .json/.jsonl/.parquet texts)"
        )
    holdout_recs = _first(read, ["raw/holdout", "holdout"]) or []
    items = _texts(forget_recs, "forget", source) + _texts(retain_recs, "retain", source)
    items += _texts(holdout_recs, "holdout", source)
    evaluation = []
    for name in ("forget", "retain", "holdout"):
        records = read(f"privleak/{name}")
        if records is not None:
            evaluation.append((name, tuple(_texts(records, name, source))))
    retain2 = _first(read, ["raw/retain2", "retain2"])
    if retain2 is not None:
        evaluation.append(("retain2", tuple(_texts(retain2, "retain", source))))
    verbmem = []
    for i, rec in enumerate(_first(read, ["verbmem/forget", "verbmem_forget"]) or []):
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("gt"), str):
            raise ValueError(f"{source}: verbmem/forget record {i} needs string fields 'prompt' and 'gt'")
        verbmem.append((rec["prompt"], rec["gt"]))
    knowmem = []
    for name in ("forget", "retain"):
        qa = _first(read, [f"knowmem/{name}_qa", f"knowmem/{name}2_qa", f"{name}_qa"])
        if qa is not None:
            icl = _first(read, [f"knowmem/{name}_qa_icl", f"knowmem/{name}2_qa_icl", f"{name}_qa_icl"]) or []
            knowmem.append((name, tuple(_items(qa, name, source)), tuple(_items(icl, name, source))))
    return MuseBenchmark(
        items=tuple(items), evaluation=tuple(evaluation), verbmem=tuple(verbmem), knowmem=tuple(knowmem)
    )


def source_problem(source: str) -> str | None:
    """What stops ``source`` (``tofu:...`` / ``muse:...``) from loading, as one line naming ``data.source``
    and the fix, or ``None``. Cheap (file names only), so it runs before any work: a local directory
    must hold the subsets the loader needs; a hub name needs the ``datasets`` package."""
    kind, rest = source.split(":", 1)
    location, _, forget = rest.partition("@")
    if kind == "tofu":
        forget = forget or "forget10"
        if forget not in TOFU_FORGET_SPLITS:
            return (
                f"data.source: {source} names no TOFU forget split ({forget}). "
                "Fix: use @forget01, @forget05 or @forget10"
            )
        retain = f"retain{100 - int(forget[len('forget') :])}"
        needed = [[f"{forget}_perturbed", forget], [retain]]
    elif kind == "muse":
        needed = [list(names) for names in MUSE_NEEDED]
    else:
        return f"data.source: unknown format {kind!r}. Fix: use tofu:PATH or muse:PATH"
    root = Path(location).expanduser()
    if not root.is_dir():
        if importlib.util.find_spec("datasets") is None:
            return (
                f"data.source: {location} is not a local directory and the 'datasets' package is not installed. "
                "Fix: give a directory of .json/.jsonl/.parquet subset files, or pip install datasets (needs a network)"
            )
        return None
    missing = [
        names[0] if kind == "muse" else names[-1]
        for names in needed
        if not any((root / f"{n}{suffix}").is_file() for n in names for suffix in _SUFFIXES)
    ]
    if missing:
        return (
            f"data.source: {root} lacks the {' and '.join(missing)} subset. Fix: add "
            f"{' and '.join(m + '.json' for m in missing)} (or .jsonl/.parquet) there, or choose another directory"
        )
    return None


def load_formatted(source: str) -> FactsBenchmark:
    """Dispatch ``tofu:LOCATION[@FORGET]`` / ``muse:LOCATION`` to :func:`load_tofu` / :func:`load_muse`."""
    kind, rest = source.split(":", 1)
    if kind == "tofu":
        location, _, forget = rest.partition("@")
        return load_tofu(location, forget or "forget10")
    if kind == "muse":
        return load_muse(rest)
    raise ValueError(f"data.source: unknown format {kind!r}. Fix: use tofu:PATH or muse:PATH")
