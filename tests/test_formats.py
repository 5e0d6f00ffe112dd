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
    (tmp_path / "retain_perturbed.jsonl").write_text("\n".join(json.dumps(r) for r in _tofu_rows("r", 4)))
    pq.write_table(pa.Table.from_pylist(_tofu_rows("h", 2, perturbed=False)), tmp_path / "holdout05.parquet")
    facts = load_formatted(f"tofu:{tmp_path}@forget05")
    assert [len(facts.split(s)) for s in ("forget", "retain", "holdout")] == [3, 4, 2]
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


def test_muse_knowmem(tmp_path):
    (tmp_path / "forget_qa.json").write_text(json.dumps([{"question": "Who?", "answer": "Her."}]))
    (tmp_path / "retain_qa.jsonl").write_text(json.dumps({"question": "When?", "answer": "Then."}) + "\n")
    facts = load_formatted(f"muse:{tmp_path}")
    assert facts.split("forget")[0].answer == "Her." and facts.split("retain")[0].question == "When?"
    assert is_formatted_source(f"muse:{tmp_path}") and not is_formatted_source("data/qa.jsonl")


def test_bad_files_name_the_problem(tmp_path):
    (tmp_path / "forget10.json").write_text(json.dumps([{"question": "q"}]))
    (tmp_path / "retain90.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="record 0 needs string fields 'question' and 'answer'"):
        load_formatted(f"tofu:{tmp_path}")
    with pytest.raises(ValueError, match="lacks forget_qa or retain_qa"):
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
