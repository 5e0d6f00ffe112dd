"""Tests for the fictitious-facts benchmark, QA-file loading and tokenized QA examples."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from dist_unlearn.data import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    SPLITS,
    FactsBenchmark,
    QADataset,
    QAItem,
    collate_qa,
    encode_answers,
    encode_qa,
    generate_facts,
    load_qa_file,
)
from dist_unlearn.data.facts import ATTRIBUTE_KINDS
from dist_unlearn.models import train_tokenizer

_KINDS = {kind.name: kind for kind in ATTRIBUTE_KINDS}


def _fill(template: str, person: str, value: str) -> str:
    return template.format(person=person, value=value, article="an" if value[0] in "aeiou" else "a")


def _true_value(item: QAItem) -> str:
    """Recover the fact value of an item by matching its answer against the answer template."""
    kind = _KINDS[item.attribute]
    matches = [v for v in kind.values if _fill(kind.answer, item.person, v) == item.answer]
    assert len(matches) == 1, item
    return matches[0]


@pytest.fixture(scope="module")
def bench() -> FactsBenchmark:
    return generate_facts(num_people=40, questions_per_person=4, num_perturbed=3, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(generate_facts(num_people=12, seed=3).corpus(), vocab_size=512)


# ----------------------------------------------------------------------------------------------------------
# generate_facts
# ----------------------------------------------------------------------------------------------------------


def test_determinism(bench: FactsBenchmark) -> None:
    assert generate_facts(num_people=40, questions_per_person=4, seed=0) == bench
    other = generate_facts(num_people=40, questions_per_person=4, seed=1)
    assert other.items != bench.items
    assert set(other.people()) != set(bench.people())


def test_people_unique_and_question_counts(bench: FactsBenchmark) -> None:
    people = bench.people()
    assert len(people) == 40
    per_person = Counter(item.person for item in bench.items)
    assert set(per_person.values()) == {4}
    for person in people:
        attributes = [item.attribute for item in bench.items if item.person == person]
        assert len(set(attributes)) == 4
    assert len(ATTRIBUTE_KINDS) >= 6
    assert len({item.attribute for item in bench.items}) == len(ATTRIBUTE_KINDS)


def test_split_sizes_and_disjoint_people(bench: FactsBenchmark) -> None:
    people = {name: set(bench.people(name)) for name in SPLITS}
    assert {name: len(p) for name, p in people.items()} == {"forget": 4, "retain": 32, "holdout": 4}
    assert not people["forget"] & people["retain"]
    assert not people["forget"] & people["holdout"]
    assert not people["retain"] & people["holdout"]
    assert sum(len(bench.split(name)) for name in SPLITS) == len(bench.items)
    with pytest.raises(ValueError, match="unknown split"):
        bench.split("train")


def test_at_least_one_forget_person() -> None:
    small = generate_facts(num_people=5, questions_per_person=1, forget_fraction=0.0, holdout_fraction=0.0)
    assert len(small.people("forget")) == 1
    assert len(small.people("retain")) == 4
    assert small.split("holdout") == []


def test_paraphrase_and_perturbed_answers(bench: FactsBenchmark) -> None:
    for item in bench.items:
        value = _true_value(item)
        kind = _KINDS[item.attribute]
        assert item.question == _fill(kind.question, item.person, value)
        assert item.paraphrased_answer != item.answer
        assert value in item.paraphrased_answer and item.person in item.paraphrased_answer
        assert len(item.perturbed_answers) == 3
        assert len(set(item.perturbed_answers)) == 3
        wrong_values = [v for v in kind.values if v != value]
        for perturbed in item.perturbed_answers:
            assert perturbed not in (item.answer, item.paraphrased_answer)
            # the paraphrase template filled with a wrong value of the same kind
            assert any(perturbed == _fill(kind.paraphrase, item.person, v) for v in wrong_values)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_people": 2},
        {"questions_per_person": 0},
        {"questions_per_person": len(ATTRIBUTE_KINDS) + 1},
        {"num_perturbed": 1000},
        {"forget_fraction": 0.6, "holdout_fraction": 0.5},
        {"forget_fraction": 1.5},
    ],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_facts(**kwargs)


def test_corpus_covers_all_texts(bench: FactsBenchmark) -> None:
    corpus = bench.corpus()
    assert len(corpus) == len(bench.items) * (3 + 3)
    item = bench.items[7]
    for text in (item.question, item.answer, item.paraphrased_answer, *item.perturbed_answers):
        assert text in corpus


# ----------------------------------------------------------------------------------------------------------
# jsonl / json files
# ----------------------------------------------------------------------------------------------------------


def test_jsonl_round_trip(bench: FactsBenchmark, tmp_path) -> None:
    path = tmp_path / "sub" / "facts.jsonl"
    bench.to_jsonl(path)
    assert path.exists() and not (tmp_path / "sub" / "facts.jsonl.tmp").exists()
    assert len(path.read_text().splitlines()) == len(bench.items)
    assert FactsBenchmark.from_jsonl(path) == bench
    assert load_qa_file(path) == bench


def test_load_json_with_defaults(tmp_path) -> None:
    records = [
        {"question": "What is two plus two?", "answer": "Four.", "split": "forget", "person": "math"},
        {
            "question": "Who wrote it?",
            "answer": "Nobody.",
            "split": "retain",
            "paraphrased_answer": "No one wrote it.",
            "perturbed_answers": ["Somebody.", "Everyone."],
        },
    ]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(records))
    loaded = load_qa_file(path)
    first, second = loaded.items
    assert first == QAItem("math", "", "What is two plus two?", "Four.", "Four.", (), "forget")
    assert second.paraphrased_answer == "No one wrote it."
    assert second.perturbed_answers == ("Somebody.", "Everyone.")
    assert loaded.split("retain") == [second]


def test_load_missing_field_names_record_and_field(tmp_path) -> None:
    path = tmp_path / "qa.jsonl"
    lines = [
        json.dumps({"question": "Q1?", "answer": "A1.", "split": "retain"}),
        json.dumps({"question": "Q2?", "split": "forget"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"record 1.*'answer'"):
        load_qa_file(path)
    bad_split = tmp_path / "bad.json"
    bad_split.write_text(json.dumps([{"question": "Q?", "answer": "A.", "split": "train"}]))
    with pytest.raises(ValueError, match=r"record 0.*split"):
        load_qa_file(bad_split)


# ----------------------------------------------------------------------------------------------------------
# tokenized QA examples
# ----------------------------------------------------------------------------------------------------------


def _prefix_len(tokenizer, question: str) -> int:
    prompt = PROMPT_TEMPLATE.format(question=question)
    return 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_encode_qa_masks_prompt_exactly(tokenizer, bench: FactsBenchmark) -> None:
    item = bench.items[0]
    encoded = encode_qa(tokenizer, item.question, item.answer, max_length=128)
    ids, labels = encoded["input_ids"], encoded["labels"]
    prefix = _prefix_len(tokenizer, item.question)
    assert len(ids) == len(labels)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert labels[:prefix] == [IGNORE_INDEX] * prefix
    assert IGNORE_INDEX not in labels[prefix:]
    assert labels[prefix:] == ids[prefix:]
    assert tokenizer.decode(ids[1:prefix]) == PROMPT_TEMPLATE.format(question=item.question)
    labelled = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == " " + item.answer + tokenizer.eos_token


def test_encode_qa_truncation(tokenizer, bench: FactsBenchmark) -> None:
    item = bench.items[1]
    full = encode_qa(tokenizer, item.question, item.answer, max_length=128)
    prefix = _prefix_len(tokenizer, item.question)
    cut = encode_qa(tokenizer, item.question, item.answer, max_length=prefix + 2)
    assert cut["input_ids"] == full["input_ids"][: prefix + 2]
    assert cut["labels"] == full["labels"][: prefix + 2]
    one = encode_qa(tokenizer, item.question, item.answer, max_length=prefix + 1)
    assert sum(t != IGNORE_INDEX for t in one["labels"]) == 1
    with pytest.raises(ValueError, match="max_length"):
        encode_qa(tokenizer, item.question, item.answer, max_length=prefix)


def test_dataset_and_collate(tokenizer, bench: FactsBenchmark) -> None:
    items = bench.split("forget")
    dataset = QADataset(items, tokenizer, max_length=96)
    para = QADataset(items, tokenizer, max_length=96, answer_field="paraphrased_answer")
    assert len(dataset) == len(items)
    assert dataset[2]["index"] == 2
    assert dataset[0]["input_ids"] != para[0]["input_ids"]
    with pytest.raises(ValueError, match="answer_field"):
        QADataset(items, tokenizer, max_length=96, answer_field="question")

    examples = [dataset[i] for i in (3, 0, 5)]
    batch = collate_qa(examples, pad_token_id=tokenizer.pad_token_id)
    width = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["index"].tolist() == [3, 0, 5]
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert batch["labels"][row, :n].tolist() == example["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_encode_answers(tokenizer, bench: FactsBenchmark) -> None:
    item = bench.items[5]
    answers = [item.paraphrased_answer, *item.perturbed_answers]
    batch = encode_answers(tokenizer, item.question, answers, max_length=96)
    assert batch["input_ids"].shape[0] == len(answers)
    assert batch["index"].tolist() == list(range(len(answers)))
    for row, answer in enumerate(answers):
        expected = encode_qa(tokenizer, item.question, answer, max_length=96)
        n = len(expected["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == expected["input_ids"]
        assert batch["labels"][row, :n].tolist() == expected["labels"]
        assert int(batch["attention_mask"][row].sum()) == n
