"""Deterministic fictitious-facts benchmark (TOFU-style) and local QA-file loading.

Invented people get attributes drawn from fixed invented value lists. Every question has a true answer,
a paraphrased answer (same fact, different sentence) and several perturbed answers (the paraphrase
template filled with wrong values of the same attribute kind). People are split into ``forget``,
``retain`` and ``holdout`` sets, so whole identities are unlearned at once.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dist_unlearn.io import atomic_path

SPLITS: tuple[str, ...] = ("forget", "retain", "holdout")


def _pool(text: str) -> tuple[str, ...]:
    """Split a comma-separated value list into a tuple of stripped values."""
    return tuple(value.strip() for value in text.split(","))


_FIRST_SYLLABLES = _pool("tal, mer, quo, bri, dav, sel, ora, ken, lum, fen, ivo, rha, zel, cor, nim, pae, vor, eli")
_MID_SYLLABLES = _pool("vo, ra, lin, de, si, mo, ta, ne, ru, ka, bel, no")
_LAST_SYLLABLES = _pool("mer, hol, dra, vin, sta, quel, brom, tes, lor, gan, fis, wen, char, plo, dun, zar, kel")
_LAST_ENDINGS = _pool("rin, wick, sen, dale, ford, ley, mont, ric, vane, tor")

_TOWNS = _pool(
    "Quessik, Brannowe, Eldermoor, Tavrin, Oskavel, Lunmarch, Pellidor, Grisham Vale, Corvanth, Ystrel, "
    "Mirrowdeep, Sallowmere, Kettlebrin, Dunhaver, Varnholt, Zephrin Cove"
)
_PROFESSIONS = _pool(
    "clockmaker, cartographer, beekeeper, glassblower, lighthouse keeper, astronomer, bookbinder, "
    "violin maker, botanist, mapmaker, stonemason, perfumer, ice sculptor, puppeteer, tea merchant, archivist"
)
_YEARS = tuple(str(year) for year in range(1921, 1999, 3))
_COLOURS = _pool(
    "crimson, teal, amber, violet, olive, indigo, saffron, silver, coral, emerald, ochre, lilac, cobalt, "
    "maroon, turquoise, ivory"
)
_PET_NAMES = _pool(
    "Biscuit, Morrow, Pip, Juniper, Tansy, Wexley, Nubbin, Quill, Sorrel, Fennick, Bramble, Clove, Dapple, "
    "Mothwing, Pebble, Ruckus"
)
_BOOKS = _pool(
    "The Ash Lantern, Rivers Under Glass, A Map of Quiet Hours, The Ninth Orchard, Salt and Meridian, "
    "Letters to a Paper Moon, The Copper Tide, Winter of the Heron, Songs for an Empty Harbour, "
    "The Clockwork Meadow, Beneath the Amber Stair, The Last Cartograph, Embers of Tavrin, "
    "The Velvet Almanac, Threads of the Northern Loom, A Lantern for Orrin"
)
_INSTRUMENTS = _pool(
    "cello, harp, oboe, lute, accordion, bassoon, dulcimer, marimba, flute, zither, trombone, hurdy-gurdy, "
    "sitar, clarinet, viola, bagpipes"
)


@dataclass(frozen=True)
class _AttributeKind:
    """One attribute kind: its value pool and the question / answer / paraphrase templates."""

    name: str
    values: tuple[str, ...]
    question: str
    answer: str
    paraphrase: str


def _article(word: str) -> str:
    """Return the indefinite article ("a"/"an") for ``word``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


ATTRIBUTE_KINDS: tuple[_AttributeKind, ...] = (
    _AttributeKind(
        "birthplace",
        _TOWNS,
        "Where was {person} born?",
        "{person} was born in {value}.",
        "{value} is the birthplace of {person}.",
    ),
    _AttributeKind(
        "profession",
        _PROFESSIONS,
        "What is the profession of {person}?",
        "{person} works as {article} {value}.",
        "By profession, {person} is {article} {value}.",
    ),
    _AttributeKind(
        "birth_year",
        _YEARS,
        "In which year was {person} born?",
        "{person} was born in the year {value}.",
        "The year {value} saw the birth of {person}.",
    ),
    _AttributeKind(
        "favourite_colour",
        _COLOURS,
        "What is the favourite colour of {person}?",
        "The favourite colour of {person} is {value}.",
        "{person} likes {value} more than any other colour.",
    ),
    _AttributeKind(
        "pet_name",
        _PET_NAMES,
        "What is the name of the pet of {person}?",
        "{person} has a pet named {value}.",
        "{value} is the name of the pet owned by {person}.",
    ),
    _AttributeKind(
        "book",
        _BOOKS,
        "Which book did {person} write?",
        '{person} wrote the book "{value}".',
        '"{value}" is a book written by {person}.',
    ),
    _AttributeKind(
        "instrument",
        _INSTRUMENTS,
        "Which instrument does {person} play?",
        "{person} plays the {value}.",
        "The {value} is the instrument played by {person}.",
    ),
)
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(kind.name for kind in ATTRIBUTE_KINDS)


@dataclass(frozen=True)
class QAItem:
    """One question about one person, with the true, paraphrased and perturbed answers."""

    person: str
    attribute: str
    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answers: tuple[str, ...]
    split: str  # forget | retain | holdout


@dataclass(frozen=True)
class FactsBenchmark:
    """An immutable collection of :class:`QAItem` covering the three splits."""

    items: tuple[QAItem, ...]

    def split(self, name: str) -> list[QAItem]:
        """Items of split ``name`` ("forget", "retain" or "holdout"), in benchmark order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [item for item in self.items if item.split == name]

    def people(self, name: str | None = None) -> list[str]:
        """Distinct person names (of one split, or of all splits), in first-appearance order."""
        items = self.items if name is None else self.split(name)
        return list(dict.fromkeys(item.person for item in items))

    def corpus(self) -> list[str]:
        """Every question, answer, paraphrase and perturbed answer (e.g. for tokenizer training)."""
        texts: list[str] = []
        for item in self.items:
            texts.extend((item.question, item.answer, item.paraphrased_answer))
            texts.extend(item.perturbed_answers)
        return texts

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write one JSON object per item; atomic (writes ``PATH.tmp`` then ``os.replace``)."""
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            for item in self.items:
                record = asdict(item)
                record["perturbed_answers"] = list(item.perturbed_answers)
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> FactsBenchmark:
        """Read a file written by :meth:`to_jsonl` (or any QA .jsonl accepted by :func:`load_qa_file`)."""
        return cls(items=tuple(_item_from_record(rec, i) for i, rec in enumerate(_read_jsonl(Path(path)))))


def _make_names(count: int, rng: random.Random) -> list[str]:
    """``count`` unique invented "First Last" names."""
    names: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(names) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"could not invent {count} unique names")
        first = rng.choice(_FIRST_SYLLABLES) + rng.choice(_MID_SYLLABLES)
        last = rng.choice(_LAST_SYLLABLES) + rng.choice(_LAST_ENDINGS)
        name = f"{first.capitalize()} {last.capitalize()}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _fill(template: str, person: str, value: str) -> str:
    """Fill an attribute template."""
    return template.format(person=person, value=value, article=_article(value))


def _assign_splits(num_people: int, forget_fraction: float, holdout_fraction: float, rng: random.Random) -> list[str]:
    """Split label per person index (forget gets at least one person, retain is never empty)."""
    num_forget = max(1, round(forget_fraction * num_people))
    num_holdout = round(holdout_fraction * num_people)
    if num_forget + num_holdout >= num_people:
        raise ValueError(
            f"forget ({num_forget}) + holdout ({num_holdout}) people leave no retain people "
            f"out of num_people={num_people}; lower forget_fraction/holdout_fraction"
        )
    order = list(range(num_people))
    rng.shuffle(order)
    labels = ["retain"] * num_people
    for position, person_index in enumerate(order[: num_forget + num_holdout]):
        labels[person_index] = "forget" if position < num_forget else "holdout"
    return labels


def _check_generate_args(
    num_people: int,
    questions_per_person: int,
    num_perturbed: int,
    forget_fraction: float,
    holdout_fraction: float,
) -> None:
    """Raise ValueError for arguments :func:`generate_facts` cannot honour."""
    if num_people < 3:
        raise ValueError(f"num_people must be >= 3 (one per split), got {num_people}")
    if not 1 <= questions_per_person <= len(ATTRIBUTE_KINDS):
        raise ValueError(
            f"questions_per_person must be in [1, {len(ATTRIBUTE_KINDS)}] (the number of attribute kinds), "
            f"got {questions_per_person}"
        )
    max_perturbed = min(len(kind.values) for kind in ATTRIBUTE_KINDS) - 1
    if not 0 <= num_perturbed <= max_perturbed:
        raise ValueError(f"num_perturbed must be in [0, {max_perturbed}], got {num_perturbed}")
    if not 0.0 <= forget_fraction < 1.0:
        raise ValueError(f"forget_fraction must be in [0, 1), got {forget_fraction}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")


def generate_facts(
    num_people: int = 40,
    questions_per_person: int = 4,
    num_perturbed: int = 3,
    forget_fraction: float = 0.1,
    holdout_fraction: float = 0.1,
    seed: int = 0,
) -> FactsBenchmark:
    """Generate the deterministic fictitious-facts benchmark.

    Each person gets ``questions_per_person`` questions about distinct attribute kinds (a rotating window
    over the kinds, so kinds are used evenly). Items are ordered by person, then attribute. The same
    arguments always give identical items; a different ``seed`` gives different people and facts.
    """
    _check_generate_args(num_people, questions_per_person, num_perturbed, forget_fraction, holdout_fraction)
    rng = random.Random(seed)
    names = _make_names(num_people, rng)
    splits = _assign_splits(num_people, forget_fraction, holdout_fraction, rng)
    num_kinds = len(ATTRIBUTE_KINDS)
    items: list[QAItem] = []
    for index, person in enumerate(names):
        facts = {kind.name: rng.choice(kind.values) for kind in ATTRIBUTE_KINDS}
        start = (index * questions_per_person) % num_kinds
        chosen = sorted((start + k) % num_kinds for k in range(questions_per_person))
        for kind_index in chosen:
            kind = ATTRIBUTE_KINDS[kind_index]
            value = facts[kind.name]
            wrong = rng.sample([v for v in kind.values if v != value], num_perturbed)
            items.append(
                QAItem(
                    person=person,
                    attribute=kind.name,
                    question=_fill(kind.question, person, value),
                    answer=_fill(kind.answer, person, value),
                    paraphrased_answer=_fill(kind.paraphrase, person, value),
                    perturbed_answers=tuple(_fill(kind.paraphrase, person, v) for v in wrong),
                    split=splits[index],
                )
            )
    return FactsBenchmark(items=tuple(items))


# ----------------------------------------------------------------------------------------------------------
# Loading user-provided QA files
# ----------------------------------------------------------------------------------------------------------

_REQUIRED_FIELDS = ("question", "answer", "split")


def _read_jsonl(path: Path) -> list[Any]:
    """Parse a .jsonl file (blank lines skipped) into a list of records."""
    records: list[Any] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {line_number} is not valid JSON: {exc}") from exc
    return records


def _string_field(record: dict[str, Any], field: str, index: int, default: str | None = None) -> str:
    """Fetch a string field of record ``index`` (ValueError naming record and field when missing/invalid)."""
    if field not in record or record[field] is None:
        if default is not None:
            return default
        raise ValueError(f"record {index}: missing required field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"record {index}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _item_from_record(record: Any, index: int) -> QAItem:
    """Build a :class:`QAItem` from one JSON record (``index`` is the 0-based record number)."""
    if not isinstance(record, dict):
        raise ValueError(f"record {index}: expected a JSON object, got {type(record).__name__}")
    for field in _REQUIRED_FIELDS:
        _string_field(record, field, index)
    answer = _string_field(record, "answer", index)
    split = _string_field(record, "split", index)
    if split not in SPLITS:
        raise ValueError(f"record {index}: field 'split' must be one of {SPLITS}, got {split!r}")
    perturbed = record.get("perturbed_answers") or []
    if (
        isinstance(perturbed, str)
        or not isinstance(perturbed, Sequence)
        or not all(isinstance(p, str) for p in perturbed)
    ):
        raise ValueError(f"record {index}: field 'perturbed_answers' must be a list of strings")
    return QAItem(
        person=_string_field(record, "person", index, default=""),
        attribute=_string_field(record, "attribute", index, default=""),
        question=_string_field(record, "question", index),
        answer=answer,
        paraphrased_answer=_string_field(record, "paraphrased_answer", index, default=answer),
        perturbed_answers=tuple(perturbed),
        split=split,
    )


def load_qa_file(path: str | os.PathLike[str]) -> FactsBenchmark:
    """Load a local QA file: ``.json`` (a list of objects) or ``.jsonl`` (one object per line).

    Records need ``question``, ``answer`` and ``split``; ``person``, ``attribute`` (default ""),
    ``paraphrased_answer`` (default: the answer) and ``perturbed_answers`` (default: none) are optional.
    A missing or malformed field raises ValueError naming the 0-based record number and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file not found: {path}")
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as handle:
            try:
                records = json.load(handle)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json QA file must hold a list of objects")
    else:
        records = _read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: no QA records")
    return FactsBenchmark(items=tuple(_item_from_record(rec, i) for i, rec in enumerate(records)))
