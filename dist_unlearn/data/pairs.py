"""Users' own retrieval pairs and triples for the contrastive job, from JSON Lines (or Parquet) files.

One row per line, a JSON object::

    {"query": "who wrote Dune?", "positive": "Dune is a 1965 novel by Frank Herbert.",
     "negatives": ["Foundation is a novel by Isaac Asimov.", "..."]}

``query`` and ``positive`` are non-empty strings; hard negatives are optional, given as ``negative`` (one
string) or ``negatives`` (a list of strings, hardest first, as mined by e.g. BM25 or a teacher model; cf. DPR,
Karpukhin et al., 2020). Other keys (ids, scores) are ignored. Blank lines are skipped; line numbers in
messages are 1-based file lines.

A location is a file, or a directory holding ``train.jsonl`` and optionally ``dev.jsonl`` (or their ``.parquet``
twins, read with pyarrow: the same columns, a null is an absent field, messages name the table row), or
``hf:NAME``: a dataset that Hugging Face ``datasets.load_dataset(NAME)`` loads (a hub name, or a local directory
of data files in any format it reads), with the same columns; its ``train`` split is trained on and its
``validation`` (else ``dev``, else ``test``) split, when it has one, is the dev set. The held-out
evaluation uses the dev rows (the ``dev.jsonl`` beside ``train.jsonl``, an explicit dev file, or a seeded
fraction of the rows) as a retrieval task: each dev query against the corpus of every distinct positive and
negative passage of the dev rows (:func:`pairs_eval_set`), scored by recall@k and MRR.

Everything here is plain Python (no torch), so the driver validates a file before any worker starts
(``datasets`` is imported only for an ``hf:`` location).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_unlearn.config.schema import HUB_DATA_PREFIX
from dist_unlearn.data.retrieval import RetrievalEvalSet, RetrievalExample

TRAIN_FILE = "train.jsonl"
DEV_FILE = "dev.jsonl"
PARQUET = ".parquet"
"""A file with this suffix is read as Parquet (columns ``query``, ``positive``, ``negative`` / ``negatives``; null =
absent); a directory may hold ``train.parquet`` / ``dev.parquet`` instead of the JSON Lines files."""
ROW_HELP = 'each row needs "query" and "positive" (strings), optionally "negative" (a string) or "negatives" (a list)'
MAX_REPORTED = 5
"""At most this many malformed rows are reported, then a count of the rest."""


class PairsFormatError(ValueError):
    """A malformed pairs file; ``problems`` holds one line per bad row (``FILE line N: ...``)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


DEV_SPLITS = ("validation", "dev", "test")
"""The split of an ``hf:`` dataset that is its dev set: the first of these it has."""


@dataclass(frozen=True)
class HubSplit:
    """One split of a dataset loaded by Hugging Face ``datasets`` (``name``: a hub name or a local directory)."""

    name: str
    split: str

    def __str__(self) -> str:
        return f"{HUB_DATA_PREFIX}{self.name} ({self.split} split)"


@dataclass(frozen=True)
class PairsSource:
    """Where the rows are: ``train`` file (or dataset split), and the dev one when there is one (else a fraction
    is held out)."""

    train: Path | HubSplit
    dev: Path | HubSplit | None


def pairs_source(location: str | Path, dev: str | Path | None = None) -> PairsSource:
    """The train file (``location`` itself, or ``location/train.jsonl``) and the dev file (``dev`` when given,
    else ``location/dev.jsonl`` when ``location`` is a directory that has one, else None).

    Raises:
        FileNotFoundError: a directory without ``train.jsonl``, or a path that does not exist.
    """
    if str(location).startswith(HUB_DATA_PREFIX):
        return _hub_source(str(location).removeprefix(HUB_DATA_PREFIX), dev)
    path = Path(location)
    if path.is_dir():
        train = split_file(path, TRAIN_FILE)
        if train is None:
            raise FileNotFoundError(f"{path} is a directory without {TRAIN_FILE} (or train{PARQUET})")
        return PairsSource(train, Path(dev) if dev else split_file(path, DEV_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return PairsSource(path, Path(dev) if dev else None)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        message = f"{HUB_DATA_PREFIX}NAME needs the datasets package. Fix: pip install datasets"
        raise PairsFormatError([message]) from exc
    return datasets


def _hub_failure(name: str, exc: Exception) -> PairsFormatError:
    """One line for a dataset ``datasets`` could not load (not found, offline, unreadable files)."""
    reason = (str(exc).strip().splitlines() or [""])[0][:300]
    return PairsFormatError(
        [
            f"{HUB_DATA_PREFIX}{name}: datasets could not load it ({type(exc).__name__}: {reason}). Fix: give a hub "
            "dataset name (with network access, or in the local datasets cache) or a directory of data files"
        ]
    )


def _hub_source(name: str, dev: str | Path | None) -> PairsSource:
    """The ``train`` split of ``name`` and its dev split (:data:`DEV_SPLITS`), unless ``dev`` names a file."""
    datasets = _datasets()
    try:
        splits = list(datasets.get_dataset_split_names(name))
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds (not found, connection, format)
        raise _hub_failure(name, exc) from exc
    if "train" not in splits:
        raise FileNotFoundError(f"{HUB_DATA_PREFIX}{name} has no train split (it has {', '.join(splits)})")
    dev_split = next((split for split in DEV_SPLITS if split in splits), None)
    return PairsSource(HubSplit(name, "train"), Path(dev) if dev else HubSplit(name, dev_split) if dev_split else None)


def _hub_rows(split: HubSplit) -> list[tuple[int, dict[str, Any]]]:
    """The rows of one dataset split as dicts without their null values, numbered from 1."""
    datasets = _datasets()
    try:
        table = datasets.load_dataset(split.name, split=split.split)
    except Exception as exc:  # noqa: BLE001 - as in _hub_source
        raise _hub_failure(split.name, exc) from exc
    return [(i, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(table, 1)]


def split_file(directory: Path, name: str) -> Path | None:
    """``directory/name`` (``train.jsonl``, ``dev.jsonl``), else its Parquet twin (``train.parquet``), else None."""
    for candidate in (directory / name, (directory / name).with_suffix(PARQUET)):
        if candidate.is_file():
            return candidate
    return None


def _text(row: dict[str, Any], key: str) -> str | None:
    """``row[key]`` when it is a non-empty string, else None."""
    value = row.get(key)
    return value if isinstance(value, str) and value.strip() else None


def parse_row(row: Any) -> RetrievalExample:
    """One decoded JSON value → an example with every negative of the row (in file order).

    Raises:
        ValueError: naming the field that is missing or of the wrong type.
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}; {ROW_HELP}")
    query, positive = _text(row, "query"), _text(row, "positive")
    for key, value in (("query", query), ("positive", positive)):
        if value is None:
            what = "missing" if key not in row else "not a non-empty string"
            raise ValueError(f"field '{key}' is {what}; {ROW_HELP}")
    if "negative" in row and "negatives" in row:
        raise ValueError("has both 'negative' and 'negatives'; give one of them")
    negatives: tuple[str, ...] = ()
    if "negative" in row:
        if _text(row, "negative") is None:
            raise ValueError("field 'negative' is not a non-empty string; use 'negatives' for a list")
        negatives = (row["negative"],)
    elif "negatives" in row:
        values = row["negatives"]
        if not isinstance(values, list) or any(not isinstance(v, str) or not v.strip() for v in values):
            raise ValueError("field 'negatives' is not a list of non-empty strings")
        negatives = tuple(values)
    assert query is not None and positive is not None
    return RetrievalExample(query, positive, negatives)


def _numbered_rows(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def where(path: str | Path | HubSplit, number: int) -> str:
    """``FILE line N`` (JSON Lines: the file line) or ``FILE row N`` (Parquet, a dataset split: the table row),
    1-based."""
    table = isinstance(path, HubSplit) or Path(path).suffix == PARQUET
    return f"{path} {'row' if table else 'line'} {number}"


def _parquet_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a Parquet table as dicts without their null values, numbered from 1."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - a dependency of datasets
        raise PairsFormatError([f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"]) from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise PairsFormatError([f"{path}: not a readable Parquet file ({exc})"]) from exc
    return [(i, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(table.to_pylist(), 1)]


def _parse_table(path: Path | HubSplit) -> tuple[list[tuple[int, RetrievalExample]], list[str]]:
    """The rows of a Parquet file or a dataset split, and one problem line per malformed row."""
    rows, problems = [], []
    for number, row in _hub_rows(path) if isinstance(path, HubSplit) else _parquet_rows(path):
        try:
            rows.append((number, parse_row(row)))
        except ValueError as exc:
            problems.append(f"{where(path, number)}: {exc}")
    return rows, problems


def _parse_jsonl(path: Path) -> tuple[list[tuple[int, RetrievalExample]], list[str]]:
    rows, problems = [], []
    try:
        for number, line in _numbered_rows(path):
            try:
                rows.append((number, parse_row(json.loads(line))))
            except json.JSONDecodeError as exc:
                problems.append(f"{where(path, number)}: not valid JSON ({exc.msg} at column {exc.colno})")
            except ValueError as exc:
                problems.append(f"{where(path, number)}: {exc}")
    except UnicodeDecodeError as exc:
        raise PairsFormatError([f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})"]) from exc
    return rows, problems


def read_numbered_pairs(path: str | Path | HubSplit) -> list[tuple[int, RetrievalExample]]:
    """Every row of the JSON Lines (or Parquet) file ``path``, or of a dataset split, with its 1-based line (row)
    number, negatives as given.

    Raises:
        PairsFormatError: one line per malformed row (at most :data:`MAX_REPORTED`, then a count), each
            ``FILE line N: ...`` naming the field; also for a file without rows, not UTF-8 or not Parquet.
    """
    if not isinstance(path, HubSplit):
        path = Path(path)
    table = isinstance(path, HubSplit) or path.suffix == PARQUET
    rows, problems = _parse_table(path) if table else _parse_jsonl(path)
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"{path}: {len(problems) - MAX_REPORTED} more malformed row(s)")
        raise PairsFormatError(shown)
    if not rows:
        raise PairsFormatError([f"{path}: no rows; {ROW_HELP}"])
    return rows


def read_pairs(path: str | Path | HubSplit) -> list[RetrievalExample]:
    """:func:`read_numbered_pairs` without the line numbers."""
    return [example for _, example in read_numbered_pairs(path)]


def check_negatives(rows: Sequence[tuple[int, RetrievalExample]], count: int, path: str | Path | HubSplit) -> None:
    """Every row has at least ``count`` negatives (the job gives each query ``1 + count`` documents).

    Raises:
        ValueError: naming the first row that falls short (its file line), how many rows do, and the fix.
    """
    short = [(number, e) for number, e in rows if len(e.negatives) < count]
    if not short:
        return
    fewest = min(len(e.negatives) for _, e in rows)
    number, first = short[0]
    raise ValueError(
        f"contrastive.hard_negatives={count}, but {where(path, number)} has {len(first.negatives)} negative(s) "
        f"({len(short)} of {len(rows)} rows have fewer than {count}). Fix: contrastive.hard_negatives={fewest} "
        "(the fewest any row has; 0 = in-batch negatives only), or give every row enough 'negatives'"
    )


def take_negatives(examples: Sequence[RetrievalExample], count: int) -> list[RetrievalExample]:
    """Each example with its first ``count`` negatives (rows checked by :func:`check_negatives`)."""
    return [RetrievalExample(e.query, e.positive, e.negatives[:count]) for e in examples]


def split_dev(
    examples: Sequence[RetrievalExample], fraction: float, seed: int
) -> tuple[list[RetrievalExample], list[RetrievalExample]]:
    """``(train, dev)``: ``max(1, round(fraction · n))`` rows drawn with ``seed`` for dev, the rest (in file
    order) for training. Deterministic given ``seed``.

    Raises:
        ValueError: fewer than 2 rows (nothing would be left on one side).
    """
    if len(examples) < 2:
        raise ValueError(f"{len(examples)} row(s) cannot be split into training and dev rows")
    size = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    dev = set(random.Random(f"dev-{seed}").sample(range(len(examples)), size))
    train = [e for i, e in enumerate(examples) if i not in dev]
    return train, [e for i, e in enumerate(examples) if i in dev]


def pairs_eval_set(dev: Sequence[RetrievalExample]) -> RetrievalEvalSet:
    """Dev queries against the corpus of every distinct passage of the dev rows (positives and negatives).

    ``passages`` lists each distinct text once, in first-seen order; ``relevant[i]`` is the index of query
    ``i``'s positive. A dev row's positive that is another row's negative stays one passage (relevant to its
    own query, a distractor for the other).
    """
    index: dict[str, int] = {}
    for example in dev:
        for text in (example.positive, *example.negatives):
            index.setdefault(text, len(index))
    return RetrievalEvalSet([e.query for e in dev], list(index), [index[e.positive] for e in dev])


@dataclass(frozen=True)
class PairsData:
    """Training examples (``1 + hard_negatives`` documents each) and the held-out retrieval set."""

    train: list[RetrievalExample]
    eval_set: RetrievalEvalSet
    source: PairsSource


def load_pairs_data(
    location: str | Path, dev: str | Path | None, hard_negatives: int, dev_fraction: float, seed: int
) -> PairsData:
    """Read, check and split a pairs location (see the module docstring); the driver's validation and the
    workers call the same function, so a file that passed validation loads identically on every rank.

    Raises:
        FileNotFoundError: see :func:`pairs_source`.
        PairsFormatError: malformed rows (see :func:`read_pairs`).
        ValueError: too few negatives (:func:`check_negatives`) or rows to hold out (:func:`split_dev`).
    """
    source = pairs_source(location, dev)
    numbered = read_numbered_pairs(source.train)
    check_negatives(numbered, hard_negatives, source.train)
    rows = [example for _, example in numbered]
    if source.dev is not None:
        train, held_out = rows, read_pairs(source.dev)
    else:
        train, held_out = split_dev(rows, dev_fraction, seed)
    return PairsData(take_negatives(train, hard_negatives), pairs_eval_set(held_out), source)
