"""A question → passage retrieval dataset built from the fictitious-facts benchmark.

Each QA item gives a query (its question) and a positive passage (its paraphrased answer, which
shares few words with the question). Hard negatives are mined from the structure of the benchmark,
hardest first: passages about a *look-alike person* (a name one vowel away, see :func:`lookalike_names`)
with the same attribute kind, passages about the *same person* with another attribute, then passages of
the *same attribute* about other people (all look alike on the surface; only the right one answers).
Training uses the people of some splits; evaluation uses people never trained on, so recall
measures generalisation rather than memorisation.

Held-out evaluation (:func:`retrieval_eval_set`) scores every question of the held-out split against the
passages of every item of the benchmark *plus* every attribute of ``lookalikes`` invented look-alike
people per held-out person. A query names its person exactly, so the task stays answerable, but the
distractors differ from the right passage by one letter of the name (or by the attribute), which is
what keeps recall@10 of an off-the-shelf encoder below 1 (cf. the mined hard negatives of DPR,
Karpukhin et al., 2020, and the name-perturbed negatives of entity retrieval benchmarks).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from dist_unlearn.data.facts import ATTRIBUTE_KINDS, FactsBenchmark, QAItem

VOWELS = "aeiou"
EVAL_LOOKALIKES = 8
"""Look-alike people per held-out person in the default evaluation corpus (7 passages each)."""

_KINDS = {kind.name: kind for kind in ATTRIBUTE_KINDS}


@dataclass(frozen=True)
class RetrievalExample:
    """One training example: a query, its positive passage and ``h`` hard-negative passages."""

    query: str
    positive: str
    negatives: tuple[str, ...]


def _passage(item: QAItem) -> str:
    return item.paraphrased_answer


def lookalike_names(
    name: str, count: int, rng: random.Random, taken: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """``count`` distinct names that differ from ``name`` in exactly one vowel (``Talvo Merrin`` →
    ``Talvo Merran``), none of them in ``taken``; drawn with ``rng`` (deterministic for a seeded ``rng``).

    Raises:
        ValueError: when ``name`` has too few vowels to give ``count`` distinct variants.
    """
    slots = [i for i, ch in enumerate(name) if ch.lower() in VOWELS]
    options = [
        name[:i] + (v.upper() if name[i].isupper() else v) + name[i + 1 :]
        for i in slots
        for v in VOWELS
        if v != name[i].lower()
    ]
    options = [o for o in dict.fromkeys(options) if o not in taken and o != name]
    if len(options) < count:
        raise ValueError(f"{name!r} has only {len(options)} one-vowel look-alikes, {count} asked for")
    return sorted(rng.sample(options, count))


def attribute_passage(person: str, attribute: str, value: str) -> str:
    """The benchmark's paraphrase sentence for ``attribute`` = ``value`` of ``person``."""
    article = "an" if value[:1].lower() in VOWELS else "a"
    return _KINDS[attribute].paraphrase.format(person=person, value=value, article=article)


def lookalike_passages(
    person: str, attributes: Sequence[str], count: int, rng: random.Random, taken: set[str]
) -> list[str]:
    """For each of ``count`` look-alikes of ``person``, one passage per attribute kind in ``attributes``
    (values drawn from the kind's pool). Attribute kinds unknown to the generator (user QA files) are skipped."""
    known = [a for a in attributes if a in _KINDS]
    if not known:
        return []
    return [
        attribute_passage(other, attribute, rng.choice(_KINDS[attribute].values))
        for other in lookalike_names(person, count, rng, taken)
        for attribute in known
    ]


def mine_hard_negatives(
    items: Sequence[QAItem], num_negatives: int, seed: int = 0, lookalikes: int = 0
) -> list[RetrievalExample]:
    """Examples for ``items`` with ``num_negatives`` mined negatives each (deterministic by ``seed``).

    Order of preference: ``lookalikes`` same-attribute passages about invented look-alike people (a name
    one vowel away; 0 turns them off), the same person's other passages, the same attribute about other
    people.

    Raises:
        ValueError: when ``items`` cannot supply that many distinct negatives.
    """
    rng = random.Random(seed)
    taken = {item.person for item in items}
    by_person: dict[str, list[QAItem]] = defaultdict(list)
    by_attribute: dict[str, list[QAItem]] = defaultdict(list)
    for item in items:
        by_person[item.person].append(item)
        by_attribute[item.attribute].append(item)
    examples = []
    for item in items:
        same_person = [o for o in by_person[item.person] if o is not item]
        same_attribute = [o for o in by_attribute[item.attribute] if o.person != item.person]
        rng.shuffle(same_person)
        rng.shuffle(same_attribute)
        lookalike = lookalike_passages(item.person, [item.attribute], lookalikes, rng, taken) if lookalikes else []
        pool = lookalike + [_passage(o) for o in same_person + same_attribute]
        negatives = tuple(dict.fromkeys(p for p in pool if p != _passage(item)))[:num_negatives]
        if len(negatives) < num_negatives:
            raise ValueError(
                f"only {len(negatives)} hard negatives available for {item.question!r}; "
                f"lower contrastive.hard_negatives or raise data.num_people"
            )
        examples.append(RetrievalExample(item.question, _passage(item), negatives))
    return examples


@dataclass(frozen=True)
class RetrievalEvalSet:
    """Queries and a passage corpus where ``queries[i]``'s relevant passage is ``passages[relevant[i]]``."""

    queries: list[str]
    passages: list[str]
    relevant: list[int]


def retrieval_eval_set(
    facts: FactsBenchmark, split: str, lookalikes: int = EVAL_LOOKALIKES, seed: int = 0
) -> RetrievalEvalSet:
    """Every question of ``split`` against the passages of *all* items of the benchmark (the other people's
    passages act as distractors, as in a real corpus) plus, for each person of ``split``, every attribute
    kind of ``lookalikes`` invented look-alike people (:func:`lookalike_names`), so the corpus holds
    ``len(items) + |people(split)| · lookalikes · 7`` passages. Deterministic given ``seed``."""
    items = list(facts.items)
    position = {id(item): i for i, item in enumerate(items)}
    queries = facts.split(split)
    passages = [_passage(i) for i in items]
    rng = random.Random(f"lookalikes-{seed}")
    taken = set(facts.people())
    attributes = [kind.name for kind in ATTRIBUTE_KINDS]
    for person in facts.people(split) if lookalikes else []:
        passages.extend(lookalike_passages(person, attributes, lookalikes, rng, taken))
    return RetrievalEvalSet([q.question for q in queries], passages, [position[id(q)] for q in queries])
