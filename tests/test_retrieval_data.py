"""The retrieval data of the contrastive job: look-alike names, the held-out corpus, mined negatives."""

from __future__ import annotations

import random
import re

import pytest

from dist_unlearn.data import generate_facts
from dist_unlearn.data.facts import ATTRIBUTE_KINDS
from dist_unlearn.data.retrieval import lookalike_names, mine_hard_negatives, retrieval_eval_set


def _one_vowel_apart(a: str, b: str) -> bool:
    diffs = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    return len(diffs) == 1 and all(c.lower() in "aeiou" for c in diffs[0])


def test_lookalike_names_differ_by_one_vowel_and_avoid_taken_names():
    names = lookalike_names("Talvo Merrin", 6, random.Random(0), taken={"Talvo Merran"})
    assert len(set(names)) == 6 and "Talvo Merran" not in names and "Talvo Merrin" not in names
    assert all(_one_vowel_apart("Talvo Merrin", n) for n in names)
    assert names == lookalike_names("Talvo Merrin", 6, random.Random(0), taken={"Talvo Merran"})
    with pytest.raises(ValueError, match="look-alikes"):
        lookalike_names("Bo Ly", 10, random.Random(0))


def test_eval_set_adds_every_attribute_of_lookalikes_and_keeps_the_right_passage():
    facts = generate_facts(num_people=30, questions_per_person=4, forget_fraction=0.1, holdout_fraction=0.2)
    holdout = facts.split("holdout")
    eval_set = retrieval_eval_set(facts, "holdout", lookalikes=3, seed=0)
    people = facts.people("holdout")
    assert len(eval_set.passages) == len(facts.items) + len(people) * 3 * len(ATTRIBUTE_KINDS)
    assert eval_set.queries == [q.question for q in holdout]
    assert [eval_set.passages[i] for i in eval_set.relevant] == [q.paraphrased_answer for q in holdout]
    extra = eval_set.passages[len(facts.items) :]
    real = set(facts.people())
    assert not any(f" {p}" in text or text.startswith(p) for text in extra for p in real)
    assert retrieval_eval_set(facts, "holdout", lookalikes=3, seed=0) == eval_set
    assert len(retrieval_eval_set(facts, "holdout", lookalikes=0).passages) == len(facts.items)


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{person\}", "(?P<person>.+)").replace(r"\{value\}", ".+")
    return re.compile("^" + pattern.replace(r"\{article\}", "an?") + "$")


def test_mined_negatives_start_with_a_same_attribute_lookalike():
    facts = generate_facts(num_people=20, questions_per_person=3)
    items = facts.split("retain")
    examples = mine_hard_negatives(items, num_negatives=2, seed=0, lookalikes=1)
    kinds = {kind.name: kind for kind in ATTRIBUTE_KINDS}
    for item, example in zip(items, examples, strict=True):
        assert example.positive == item.paraphrased_answer and len(example.negatives) == 2
        match = _template_regex(kinds[item.attribute].paraphrase).match(example.negatives[0])
        assert match is not None, example.negatives[0]  # same attribute kind ...
        assert _one_vowel_apart(item.person, match["person"])  # ... about a look-alike person
        assert item.person in example.negatives[1]  # then the same person's other attributes
    assert mine_hard_negatives(items, 2, seed=0)[0].negatives[0] != examples[0].negatives[0]
