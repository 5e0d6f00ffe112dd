"""TOFU- and MUSE-format local files (json, jsonl, parquet) become the same QAItem records."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_unlearn.data.formats import is_formatted_source, load_formatted


def _tofu_rows(prefix: str, n: int, perturbed: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"question": f"{prefix} q{i}?", "answer": f"{prefix} a{i}."}
        if perturbed:
            row |= {"paraphrased_answer": f"{prefix} p{i}.", "perturbed_answer": [f"{prefix} w{i}.", f"{prefix} x{i}."]}
        rows.append(row)
    return rows


def test_tofu_directory_json_jsonl_parquet(tmp_path):
    (tmp_path / "forget05_perturbed.json").write_text(json.dumps(_tofu_rows("f", 3)))
    (tmp_path / "retain95.jsonl").write_text("\n".join(json.dumps(r) for r in _tofu_rows("r", 4, perturbed=False)))
    (tmp_path / "retain_perturbed.jsonl").write_text("\n".join(json.dumps(r) for r in _tofu_rows("e", 2)))
    pq.write_table(pa.Table.from_pylist(_tofu_rows("h", 2, perturbed=False)), tmp_path / "holdout05.parquet")
    facts = load_formatted(f"tofu:{tmp_path}@forget05")
    assert [len(facts.split(s)) for s in ("forget", "retain", "holdout")] == [3, 4, 2]
    assert [it.question for it in facts.evaluation_split("retain")] == ["e q0?", "e q1?"]
    item = facts.split("forget")[1]
    assert (item.question, item.answer, item.paraphrased_answer) == ("f q1?", "f a1.", "f p1.")
    assert item.perturbed_answers == ("f w1.", "f x1.")
    holdout = facts.split("holdout")[0]
    assert holdout.paraphrased_answer == holdout.answer and holdout.perturbed_answers == ()


def test_tofu_falls_back_to_plain_subsets(tmp_path):
    (tmp_path / "forget10.json").write_text(json.dumps(_tofu_rows("f", 2, perturbed=False)))
    (tmp_path / "retain90.json").write_text(json.dumps(_tofu_rows("r", 3, perturbed=False)))
    facts = load_formatted(f"tofu:{tmp_path}")
    assert [len(facts.split(s)) for s in ("forget", "retain", "holdout")] == [2, 3, 0]


def _write_tofu_layout(root) -> None:
    """TOFU's file names and columns on a small scale: 100 fictitious authors with one question each;
    forget01/05/10 are the last 1/5/10 authors, retain99/95/90 their complements, retain_perturbed
    (evaluation only) the first 4 retain authors, plus real_authors and world_facts with options."""

    def row(i: int, perturbed: bool) -> dict:
        out = {"question": f"Where was author {i} born?", "answer": f"Author {i} was born in city {i}."}
        if perturbed:
            out |= {
                "paraphrased_answer": f"City {i} is where author {i} was born.",
                "perturbed_answer": [f"Author {i} was born in town {i + j}." for j in (1, 2, 3)],
            }
        return out

    def write(name: str, rows: list[dict]) -> None:
        (root / f"{name}.json").write_text(json.dumps(rows))

    for pct in (1, 5, 10):
        forget_ids, retain_ids = range(100 - pct, 100), range(100 - pct)
        write(f"forget{pct:02d}", [row(i, False) for i in forget_ids])
        write(f"forget{pct:02d}_perturbed", [row(i, True) for i in forget_ids])
        write(f"retain{100 - pct}", [row(i, False) for i in retain_ids])
    write("retain_perturbed", [row(i, True) for i in range(4)])
    for name, fact, right, wrong in (
        (
            "real_authors",
            "Who wrote 'Hamlet'?",
            "William Shakespeare",
            ["Charles Dickens", "Jane Austen", "Mark Twain"],
        ),
        ("world_facts", "What is the capital of France?", "Paris", ["Rome", "Oslo", "Bern"]),
    ):
        sentence = "Hamlet was written by {}." if name == "real_authors" else "The capital of France is {}."
        write(name, [{"question": fact, "answer": sentence.format(right)}])
        write(
            f"{name}_perturbed",
            [
                {
                    "question": fact,
                    "answer": sentence.format(right),
                    "perturbed_answer": [sentence.format(w) for w in wrong],
                }
            ],
        )


@pytest.mark.parametrize(("forget", "retain_count"), [("forget01", 99), ("forget05", 95), ("forget10", 90)])
def test_tofu_retain_term_trains_on_matching_retain_split(tmp_path, forget, retain_count):
    _write_tofu_layout(tmp_path)
    facts = load_formatted(f"tofu:{tmp_path}@{forget}")
    pct = 100 - retain_count
    forget_q = [it.question for it in facts.split("forget")]
    retain_q = [it.question for it in facts.split("retain")]
    # training: forgetNN_perturbed and its complement retain{100-NN}, never retain_perturbed's extra answers
    assert forget_q == [f"Where was author {i} born?" for i in range(100 - pct, 100)]
    assert retain_q == [f"Where was author {i} born?" for i in range(retain_count)]
    assert not set(forget_q) & set(retain_q)
    assert all(it.perturbed_answers == () for it in facts.split("retain"))
    assert facts.split("forget")[0].perturbed_answers[0] == f"Author {100 - pct} was born in town {101 - pct}."
    # evaluation: the retain split is scored on retain_perturbed (TOFU's 400 questions, here 4)
    evaluation = facts.evaluation_split("retain")
    assert [it.question for it in evaluation] == [f"Where was author {i} born?" for i in range(4)]
    assert evaluation[0].paraphrased_answer == "City 0 is where author 0 was born."
    assert facts.evaluation_split("forget") == facts.split("forget")
    assert [it.answer for it in facts.evaluation_split("real_authors")] == [
        "Hamlet was written by William Shakespeare."
    ]
    assert facts.evaluation_split("world_facts")[0].perturbed_answers[0] == "The capital of France is Rome."
    # a TOFU benchmark still goes through the suite's split selection
    from dist_unlearn.eval.suite import split_items

    assert [it.question for it in split_items(facts, "retain", max_examples=2)] == [
        "Where was author 0 born?",
        "Where was author 1 born?",
    ]


def test_tofu_without_matching_retain_split_names_it(tmp_path):
    (tmp_path / "forget05_perturbed.json").write_text(json.dumps(_tofu_rows("f", 3)))
    (tmp_path / "retain_perturbed.json").write_text(json.dumps(_tofu_rows("r", 4)))
    with pytest.raises(ValueError, match="lacks the forget05\\(_perturbed\\) or retain95 subset"):
        load_formatted(f"tofu:{tmp_path}@forget05")
    with pytest.raises(ValueError, match="use @forget01, @forget05 or @forget10"):
        load_formatted(f"tofu:{tmp_path}@forget07")


def test_muse_raw_text_and_knowmem(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "forget.txt").write_text("The forget corpus.")
    (tmp_path / "raw" / "retain1.jsonl").write_text(json.dumps({"text": "The retain corpus."}) + "\n")
    (tmp_path / "forget_qa.json").write_text(json.dumps([{"question": "Who?", "answer": "Her."}]))
    (tmp_path / "retain_qa.jsonl").write_text(json.dumps({"question": "When?", "answer": "Then."}) + "\n")
    facts = load_formatted(f"muse:{tmp_path}")
    # training is on the raw corpora (empty question); the QA pairs are KnowMem's evaluation questions
    assert facts.split("forget")[0].answer == "The forget corpus." and facts.split("forget")[0].question == ""
    assert facts.split("retain")[0].answer == "The retain corpus."
    assert facts.knowmem_set("forget")[0][0].answer == "Her." and facts.knowmem_set("retain")[0][0].question == "When?"
    assert is_formatted_source(f"muse:{tmp_path}") and not is_formatted_source("data/qa.jsonl")


def test_bad_files_name_the_problem(tmp_path):
    (tmp_path / "forget10.json").write_text(json.dumps([{"question": "q"}]))
    (tmp_path / "retain90.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="record 0 needs string fields 'question' and 'answer'"):
        load_formatted(f"tofu:{tmp_path}")
    with pytest.raises(ValueError, match="lacks the raw forget or retain corpus"):
        load_formatted(f"muse:{tmp_path}")


def test_config_source_reaches_the_loader(tmp_path):
    from dist_unlearn.config import load_config
    from dist_unlearn.engine.prepare import load_benchmark

    (tmp_path / "forget10.json").write_text(json.dumps(_tofu_rows("f", 2)))
    (tmp_path / "retain90.json").write_text(json.dumps(_tofu_rows("r", 3)))
    (tmp_path / "run.yaml").write_text("model: {path: embedded}\n")
    cfg = load_config(tmp_path / "run.yaml", [f"data.source=tofu:{tmp_path}"])
    facts = load_benchmark(cfg.data)
    assert [len(facts.split(s)) for s in ("forget", "retain")] == [2, 3]
