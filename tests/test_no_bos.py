"""Tokenizers without a BOS token (Qwen-style) are accepted: a tiny real Qwen2 with such a tokenizer, saved to
a directory, loads, formats QA examples without a leading BOS, trains one unlearning step and evaluates."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_qwen2

from dist_unlearn.data import generate_facts
from dist_unlearn.data.qa import PROMPT_TEMPLATE, QADataset, collate_qa, encode_qa
from dist_unlearn.models.loading import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from dist_unlearn.models import train_tokenizer

    facts = generate_facts(num_people=6, questions_per_person=2, seed=1)
    tok = train_tokenizer(facts.corpus(), vocab_size=300)
    tok.bos_token = None  # as Qwen2's tokenizer: eos and pad, no bos
    out = tmp_path_factory.mktemp("qwen_no_bos")
    save_tiny_qwen2(out, tok, max_positions=128)
    return out, facts


def test_qa_examples_without_bos(qwen_dir):
    path, facts = qwen_dir
    tok = load_tokenizer(path)
    assert tok.bos_token_id is None and tok.eos_token_id is not None
    item = facts.split("forget")[0]
    enc = encode_qa(tok, item.question, item.answer, 64)
    prompt = tok(PROMPT_TEMPLATE.format(question=item.question), add_special_tokens=False)["input_ids"]
    answer = tok(" " + item.answer, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == [*prompt, *answer, tok.eos_token_id]  # no leading bos
    assert enc["labels"] == [-100] * len(prompt) + [*answer, tok.eos_token_id]


def test_qwen_without_bos_unlearns_and_evaluates(qwen_dir):
    from dist_unlearn.eval.generation import generate_token_ids
    from dist_unlearn.eval.suite import EvalSettings, evaluate_model
    from dist_unlearn.unlearning import UnlearnBatch, get_objective

    path, facts = qwen_dir
    tok = load_tokenizer(path)
    model = load_causal_lm(path, torch.float32, "eager")
    forget = collate_qa(list(QADataset(facts.split("forget"), tok, 64)), tok.pad_token_id)
    retain = collate_qa(list(QADataset(facts.split("retain")[:4], tok, 64)), tok.pad_token_id)
    out = get_objective("grad_diff")(model, UnlearnBatch(forget=forget, retain=retain))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.lm_head.weight.grad is not None

    settings = EvalSettings(max_examples=4, sampled_generations=0, max_new_tokens=4, max_length=64, batch_size=4)
    result = evaluate_model(model.eval(), tok, facts, settings)
    assert 0 < result["splits"]["forget"]["prob"] < 1 and "rouge" in result["splits"]["forget"]
    ids = generate_token_ids(model, tok, [facts.split("forget")[0].question], max_new_tokens=3)
    assert ids.shape == (1, 3)
