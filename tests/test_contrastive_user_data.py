"""The contrastive job on users' own data and encoders, in-process (no training run): JSON Lines pairs and
triples, dev splits, one-line errors naming the field and file line before any work, encoder directories
(sentence-transformers layouts, causal LMs refused), and the learnable temperature's own optimizer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dist_unlearn.config import ConfigError, config_from_dict
from dist_unlearn.config.schema import ContrastiveConfig
from dist_unlearn.contrastive import InfoNCELoss, SigmoidLoss
from dist_unlearn.contrastive.loss_params import LossParameterStepper, build_contrastive_loss, loss_parameter_values
from dist_unlearn.data.pairs import load_pairs_data, pairs_eval_set, read_pairs, split_dev
from dist_unlearn.data.retrieval import RetrievalExample
from dist_unlearn.engine.validate import validate_run
from dist_unlearn.models.encoders import encoder_path, encoder_problem, transformer_dir
from dist_unlearn.tasks.contrastive import contrastive_data


def write_rows(path: Path, rows: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def triples(n: int, negatives: int = 2, tag: str = "") -> list[dict]:
    return [
        {"query": f"{tag}q{i}", "positive": f"{tag}p{i}", "negatives": [f"{tag}n{i}.{k}" for k in range(negatives)]}
        for i in range(n)
    ]


def contrastive_config(tmp_path: Path, **contrastive) -> dict:
    return {
        "job": {"kind": "contrastive"},
        "contrastive": {"global_batch_size": 4, **contrastive},
        "ray": {"enabled": False, "num_workers": 1},
        "output": {"dir": str(tmp_path / "out")},
    }


def problems_of(tmp_path: Path, **contrastive) -> list[str]:
    """The validation lines of a contrastive config (``[]`` when it is valid)."""
    try:
        validate_run(config_from_dict(contrastive_config(tmp_path, **contrastive), base_dir=tmp_path))
    except ConfigError as exc:
        return exc.problems
    return []


# --- reading rows ---------------------------------------------------------------------------------


def test_rows_take_negative_or_negatives_and_skip_blank_lines(tmp_path):
    path = write_rows(
        tmp_path / "pairs.jsonl",
        [
            {"query": "a", "positive": "A", "negative": "x", "id": 7},
            "",
            {"query": "b", "positive": "B", "negatives": ["y", "z"]},
            {"query": "c", "positive": "C"},
        ],
    )
    assert read_pairs(path) == [
        RetrievalExample("a", "A", ("x",)),
        RetrievalExample("b", "B", ("y", "z")),
        RetrievalExample("c", "C", ()),
    ]


def test_malformed_rows_fail_validation_with_their_line_and_field(tmp_path):
    write_rows(
        tmp_path / "bad.jsonl",
        [
            {"query": "a", "positive": "A"},
            {"query": "b"},
            "{not json",
            {"query": "c", "positive": "C", "negatives": "one"},
            {"query": "d", "positive": "D", "negative": "x", "negatives": ["y"]},
            ["a", "list"],
            {"query": "", "positive": "E"},
        ],
    )
    problems = problems_of(tmp_path, data="bad.jsonl", hard_negatives=0)
    path = tmp_path / "bad.jsonl"
    assert problems[0].startswith(f"contrastive.data: {path} line 2: field 'positive' is missing")
    assert problems[1].startswith(f"contrastive.data: {path} line 3: not valid JSON")
    assert "line 4: field 'negatives' is not a list of non-empty strings" in problems[2]
    assert "line 5: has both 'negative' and 'negatives'" in problems[3]
    assert "line 6: expected a JSON object, got list" in problems[4]
    assert problems[5] == f"contrastive.data: {path}: 1 more malformed row(s)"  # at most 5 rows, then a count
    assert all("\n" not in p for p in problems)


def test_missing_files_and_empty_files_are_named(tmp_path):
    assert problems_of(tmp_path, data="nowhere.jsonl")[0].startswith("contrastive.data: file not found:")
    (tmp_path / "dir").mkdir()
    assert "is a directory without train.jsonl" in problems_of(tmp_path, data="dir")[0]
    write_rows(tmp_path / "empty.jsonl", [""])
    assert "empty.jsonl: no rows" in problems_of(tmp_path, data="empty.jsonl", hard_negatives=0)[0]
    assert "contrastive.dev_data: only used with a user contrastive.data" in problems_of(tmp_path, dev_data="x")[0]


def test_too_few_hard_negatives_names_the_first_short_row_and_the_fix(tmp_path):
    rows = triples(6, negatives=2)
    rows[3]["negatives"] = ["only one"]
    write_rows(tmp_path / "t.jsonl", rows)
    problems = problems_of(tmp_path, data="t.jsonl", hard_negatives=2)
    assert problems == [
        f"contrastive.hard_negatives=2, but {tmp_path / 't.jsonl'} line 4 has 1 negative(s) (1 of 6 rows have fewer "
        "than 2). Fix: contrastive.hard_negatives=1 (the fewest any row has; 0 = in-batch negatives only), or give "
        "every row enough 'negatives'"
    ]
    assert problems_of(tmp_path, data="t.jsonl", hard_negatives=1) == []


def test_parquet_files_read_like_json_lines_with_nulls_as_absent_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {"query": ["a", "b", "c"], "positive": ["A", "B", None], "negatives": [["x", "y"], None, ["z"]]}
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table(table), tmp_path / "d" / "train.parquet")
    problems = problems_of(tmp_path, data="d", hard_negatives=0)
    assert problems == [
        f"contrastive.data: {tmp_path / 'd' / 'train.parquet'} row 3: field 'positive' is missing; each row needs "
        '"query" and "positive" (strings), optionally "negative" (a string) or "negatives" (a list)'
    ]
    table["positive"][2] = "C"
    pq.write_table(pa.table(table), tmp_path / "d" / "train.parquet")
    assert read_pairs(tmp_path / "d" / "train.parquet")[:2] == [
        RetrievalExample("a", "A", ("x", "y")),
        RetrievalExample("b", "B", ()),
    ]
    assert "train.parquet row 2 has 0 negative(s)" in problems_of(tmp_path, data="d", hard_negatives=1)[0]


def test_a_global_batch_larger_than_the_training_rows_is_refused(tmp_path):
    write_rows(tmp_path / "d" / "train.jsonl", triples(5, negatives=0))  # 1 row held out for dev, 4 train
    problems = problems_of(tmp_path, data="d", hard_negatives=0, global_batch_size=8)
    assert problems == [
        f"contrastive.global_batch_size (8) is more than the 4 training rows of {tmp_path / 'd' / 'train.jsonl'}: a "
        "batch would hold a row twice, its positive then also one of its negatives. Fix: "
        "contrastive.global_batch_size=4 or less, or more rows"
    ]


# --- splits and the held-out set ------------------------------------------------------------------


def test_a_directory_with_dev_jsonl_is_evaluated_on_it(tmp_path):
    write_rows(tmp_path / "d" / "train.jsonl", triples(8, tag="t"))
    write_rows(tmp_path / "d" / "dev.jsonl", triples(3, negatives=1, tag="v"))
    data = load_pairs_data(tmp_path / "d", None, hard_negatives=1, dev_fraction=0.1, seed=0)
    assert [e.query for e in data.train] == [f"tq{i}" for i in range(8)]
    assert all(len(e.negatives) == 1 for e in data.train)  # the first negative of each row
    assert data.eval_set.queries == ["vq0", "vq1", "vq2"]
    assert data.eval_set.passages == ["vp0", "vn0.0", "vp1", "vn1.0", "vp2", "vn2.0"]
    assert data.eval_set.relevant == [0, 2, 4]
    explicit = write_rows(tmp_path / "other_dev.jsonl", triples(2, tag="w"))
    assert load_pairs_data(tmp_path / "d", explicit, 1, 0.1, 0).eval_set.queries == ["wq0", "wq1"]


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Rows with one hard negative as CSV (a format only ``datasets`` reads here, not the JSON Lines reader)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["query", "positive", "negative"])
        writer.writeheader()
        writer.writerows({"query": r["query"], "positive": r["positive"], "negative": r["negatives"][0]} for r in rows)


def test_an_hf_dataset_trains_on_its_train_split_and_evaluates_on_its_validation_split(tmp_path):
    pytest.importorskip("datasets")
    _write_csv(tmp_path / "ds" / "train.csv", triples(6, negatives=1, tag="t"))
    _write_csv(tmp_path / "ds" / "validation.csv", triples(2, negatives=1, tag="v"))
    data = load_pairs_data(f"hf:{tmp_path / 'ds'}", None, hard_negatives=1, dev_fraction=0.5, seed=0)
    assert data.train == [RetrievalExample(f"tq{i}", f"tp{i}", (f"tn{i}.0",)) for i in range(6)]
    assert data.eval_set.queries == ["vq0", "vq1"] and data.eval_set.relevant == [0, 2]
    assert str(data.source.train) == f"hf:{tmp_path / 'ds'} (train split)"
    assert problems_of(tmp_path, data=f"hf:{tmp_path / 'ds'}", hard_negatives=1) == []
    # a malformed row is named by its split and row, as a file's by its line
    rows = triples(3, negatives=1)
    rows[1]["positive"] = ""
    _write_csv(tmp_path / "bad" / "train.csv", rows)
    problems = problems_of(tmp_path, data=f"hf:{tmp_path / 'bad'}", hard_negatives=0)
    assert problems[0].startswith(f"contrastive.data: hf:{tmp_path / 'bad'} (train split) row 2: "), problems


def test_an_hf_dataset_that_cannot_be_loaded_is_one_line_with_the_fix(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    problems = problems_of(tmp_path, data="hf:no-such-user/no-such-dataset", hard_negatives=0)
    assert len(problems) == 1, problems
    assert problems[0].startswith("contrastive.data: hf:no-such-user/no-such-dataset: datasets could not load it (")
    assert problems[0].endswith("(with network access, or in the local datasets cache) or a directory of data files")
    (tmp_path / "only_test").mkdir()
    _write_csv(tmp_path / "only_test" / "test.csv", triples(2, negatives=1))
    problems = problems_of(tmp_path, data=f"hf:{tmp_path / 'only_test'}", hard_negatives=0)
    assert problems == [f"contrastive.data: hf:{tmp_path / 'only_test'} has no train split (it has test)"]


def test_without_a_dev_file_a_seeded_fraction_is_held_out(tmp_path):
    rows = [RetrievalExample(f"q{i}", f"p{i}", ()) for i in range(20)]
    train, dev = split_dev(rows, 0.25, seed=3)
    assert len(dev) == 5 and len(train) == 15 and not {e.query for e in train} & {e.query for e in dev}
    assert split_dev(rows, 0.25, seed=3) == (train, dev) and split_dev(rows, 0.25, seed=4) != (train, dev)
    assert len(split_dev(rows[:3], 0.01, seed=0)[1]) == 1  # at least one dev row


def test_a_shared_passage_is_one_corpus_entry():
    dev = [RetrievalExample("q0", "same", ("other",)), RetrievalExample("q1", "other", ("same",))]
    eval_set = pairs_eval_set(dev)
    assert eval_set.passages == ["same", "other"] and eval_set.relevant == [0, 1]


def test_the_job_reads_the_users_file_or_the_fictitious_default(tmp_path):
    write_rows(tmp_path / "pairs.jsonl", triples(10, negatives=1))
    user = config_from_dict(contrastive_config(tmp_path, data="pairs.jsonl", dev_fraction=0.2), base_dir=tmp_path)
    assert user.contrastive.data == str(tmp_path / "pairs.jsonl")  # absolute for workers elsewhere
    examples, eval_set = contrastive_data(user)
    assert len(examples) == 8 and len(eval_set.queries) == 2 and len(eval_set.passages) == 4
    data = {"num_people": 60, "questions_per_person": 4, "forget_fraction": 0.05, "holdout_fraction": 0.2}
    default = config_from_dict({**contrastive_config(tmp_path, hard_negatives=2), "data": data}, base_dir=tmp_path)
    examples, eval_set = contrastive_data(default)
    assert len(examples) == 48 * 4 and all(len(e.negatives) == 2 for e in examples)
    # held-out people's questions against every item's passage (60 people x 4) + 7 attributes of 8 look-alikes
    # per held-out person (12)
    assert len(eval_set.queries) == 48 and len(eval_set.passages) == 60 * 4 + 12 * 8 * 7


# --- encoders -------------------------------------------------------------------------------------


def tiny_bert_dir(root: Path) -> Path:
    """A BERT config plus the bundled MiniLM tokenizer (no weights: the checks never load them)."""
    from transformers import BertConfig

    root.mkdir(parents=True)
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(root)
    bundled = Path(encoder_path("embedded"))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled / name, root / name)
    return root


def test_sentence_transformers_layouts_resolve_to_their_transformer_module(tmp_path):
    old = tmp_path / "st_old"
    tiny_bert_dir(old / "0_Transformer")
    modules = [
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (old / "modules.json").write_text(json.dumps(modules))
    assert transformer_dir(str(old)) == str(old / "0_Transformer") == encoder_path(str(old))
    assert encoder_problem(str(old)) is None
    assert transformer_dir(encoder_path("embedded")) == encoder_path("embedded")  # recent layout: path ""


def test_a_model_dir_that_is_not_an_encoder_gets_a_clear_message(tmp_path):
    from transformers import LlamaConfig

    lm = tmp_path / "lm"
    LlamaConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, architectures=["LlamaForCausalLM"]
    ).save_pretrained(lm)
    assert encoder_problem(str(lm)) == (
        f"model.path: {lm} is a causal language model (LlamaForCausalLM), not a text encoder. Fix: point model.path "
        "at a Hugging Face or sentence-transformers encoder directory (BERT, MiniLM, RoBERTa, E5, BGE, ...), a hub "
        "name of one, or use model.path=embedded"
    )
    (tmp_path / "weights_only").mkdir()
    assert "has no config.json, so it holds no Hugging Face model" in encoder_problem(str(tmp_path / "weights_only"))
    no_tokenizer = tmp_path / "no_tok"
    tiny_bert_dir(no_tokenizer)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink()
    assert "has no tokenizer files (tokenizer.json, vocab.txt" in encoder_problem(str(no_tokenizer))
    cfg = contrastive_config(tmp_path)
    cfg["model"] = {"path": str(lm)}
    with pytest.raises(ConfigError, match="is a causal language model"):
        validate_run(config_from_dict(cfg))


# --- the learnable temperature's optimizer --------------------------------------------------------


def test_learn_temperature_makes_the_loss_parameters_learnable():
    fixed = build_contrastive_loss(ContrastiveConfig())
    assert isinstance(fixed, InfoNCELoss) and not list(fixed.parameters())
    learned = build_contrastive_loss(ContrastiveConfig(temperature=0.07, learn_temperature=True))
    assert loss_parameter_values(learned) == {"temperature": pytest.approx(0.07)}
    learned_sigmoid = build_contrastive_loss(ContrastiveConfig(loss="sigmoid", learn_temperature=True))
    assert isinstance(learned_sigmoid, SigmoidLoss)
    assert loss_parameter_values(learned_sigmoid) == {"scale": pytest.approx(10.0), "bias": pytest.approx(-10.0)}
    # SigLIP always learns its scale and bias, from the configured start; "sigmoid" keeps them fixed by default
    siglip = build_contrastive_loss(ContrastiveConfig(loss="siglip", sigmoid_scale=5.0, sigmoid_bias=-3.0))
    assert isinstance(siglip, SigmoidLoss) and len(list(siglip.parameters())) == 2
    assert loss_parameter_values(siglip) == {"scale": pytest.approx(5.0), "bias": pytest.approx(-3.0)}
    fixed_sigmoid = build_contrastive_loss(ContrastiveConfig(loss="sigmoid", sigmoid_scale=5.0, sigmoid_bias=-3.0))
    assert not list(fixed_sigmoid.parameters())
    assert (fixed_sigmoid.init_scale, fixed_sigmoid.init_bias) == (5.0, -3.0)


def test_the_stepper_applies_adamw_then_clamps_and_round_trips_its_state():
    loss_fn = InfoNCELoss(0.0101, learnable_temperature=True)  # 1/τ = 99.0, just below the bound 100
    stepper = LossParameterStepper(loss_fn, lr=0.1)
    loss_fn.log_inverse_temperature.grad = torch.tensor(-1.0)  # descent raises 1/τ past the bound
    stepper.step()
    assert loss_fn.log_inverse_temperature.item() == pytest.approx(math.log(100.0))  # clamped after the step
    assert loss_fn.log_inverse_temperature.grad is None
    state = stepper.state_dict()
    other = LossParameterStepper(InfoNCELoss(0.05, learnable_temperature=True), lr=0.1)
    other.load_state_dict(state)
    assert other.loss_fn.log_inverse_temperature.item() == loss_fn.log_inverse_temperature.item()
    assert other.optimizer.state_dict()["state"][0]["step"] == 1
    LossParameterStepper(InfoNCELoss(0.05), lr=0.1).step()  # nothing to learn: a no-op
