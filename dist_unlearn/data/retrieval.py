"""A question → passage retrieval dataset built from the fictitious-facts benchmark.

Each QA item gives a query (its question) and a positive passage (its paraphrased answer, which
shares few words with the question). Hard negatives are mined from the structure of the benchmark,
hardest first: passages about the *same person* with another attribute, then passages of the *same
attribute* about other people (both look alike on the surface; only the right one answers).
Training uses the people of some splits; evaluation uses people never trained on, so recall
measures generalisation rather than memorisation.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from dist_unlearn.data.facts import FactsBenchmark, QAItem


@dataclass(frozen=True)
class RetrievalExample:
    """One training example: a query, its positive passage and ``h`` hard-negative passages."""

    query: str
    positive: str
    negatives: tuple[str, ...]


def _passage(item: QAItem) -> str:
    return item.paraphrased_answer


def mine_hard_negatives(items: Sequence[QAItem], num_negatives: int, seed: int = 0) -> list[RetrievalExample]:
    """Examples for ``items`` with ``num_negatives`` mined negatives each (deterministic by ``seed``).

    Raises:
        ValueError: when ``items`` cannot supply that many distinct negatives.
    """
    rng = random.Random(seed)
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
        pool = [_passage(o) for o in same_person + same_attribute]
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


def retrieval_eval_set(facts: FactsBenchmark, split: str) -> RetrievalEvalSet:
    """Every question of ``split`` against the passages of *all* items of the benchmark (the other
    people's passages act as distractors, as in a real corpus)."""
    items = list(facts.items)
    position = {id(item): i for i, item in enumerate(items)}
    queries = facts.split(split)
    return RetrievalEvalSet(
        [q.question for q in queries], [_passage(i) for i in items], [position[id(q)] for q in queries]
    )
