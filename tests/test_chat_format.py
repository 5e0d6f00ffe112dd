"""Chat templates: a tiny real Qwen2 whose tokenizer has a chat template and no BOS token, saved to a
directory. Prompts go through ``apply_chat_template`` (``data.prompt_format=auto|chat``), the answer alone
is trained on and scored, generation starts from the same prompt, and ``plain`` keeps the fixed template."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_DATA, run_cli, save_tiny_qwen2, small_run_config, write_config

from dist_unlearn.data import generate_facts
from dist_unlearn.data.qa import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    encode_qa,
    prompt_format_of,
    prompt_ids,
    set_prompt_format,
)
from dist_unlearn.models.loading import load_causal_lm, load_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML, as Qwen2's chat template writes turns (without its default system turn)."""


def _save_qwen(out, facts, chat_template: str | None, seed: int = 0):
    """A tiny random Qwen2 and a BPE tokenizer of ``facts`` (no bos; eos ``<|im_end|>``) saved to ``out``."""
    from dist_unlearn.models import train_tokenizer

    tok = train_tokenizer(facts.corpus(), vocab_size=300)
    tok.bos_token = None
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = chat_template
    save_tiny_qwen2(out, tok, seed)
    return out


@pytest.fixture(scope="module")
def chat_qwen(tmp_path_factory):
    """(target dir, oracle dir, facts): two random tiny Qwen2 with the chat tokenizer, on the small data."""
    facts = generate_facts(**SMALL_DATA, seed=0)
    root = tmp_path_factory.mktemp("chat_qwen")
    target = _save_qwen(root / "target", facts, CHAT_TEMPLATE, seed=0)
    oracle = _save_qwen(root / "oracle", facts, CHAT_TEMPLATE, seed=1)
    return target, oracle, facts


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _hand_made(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """ChatML by hand: special tokens by id, the text between them tokenized on its own."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    prompt = [start, *_ids(tok, "user\n" + question), end, *_ids(tok, "\n"), start, *_ids(tok, "assistant\n")]
    answer_ids = [*_ids(tok, answer), end]  # <|im_end|> is eos: no second eos
    return prompt, answer_ids


def test_auto_uses_the_chat_template_and_masks_the_prompt(chat_qwen):
    target, _, facts = chat_qwen
    tok = load_tokenizer(target)
    assert tok.bos_token_id is None and prompt_format_of(tok) == "chat"
    item = facts.split("forget")[0]
    enc = encode_qa(tok, item.question, item.answer, 256)
    prompt, answer = _hand_made(tok, item.question, item.answer)
    assert enc["input_ids"] == prompt + answer
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    text = tok.decode(enc["input_ids"])
    assert text == f"<|im_start|>user\n{item.question}<|im_end|>\n<|im_start|>assistant\n{item.answer}<|im_end|>"
    scored = tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert scored == f"{item.answer}<|im_end|>"
    assert prompt_ids(tok, item.question) == prompt  # generation starts where the answer starts in training


def test_plain_overrides_a_chat_tokenizer(chat_qwen):
    target, _, facts = chat_qwen
    tok = load_tokenizer(target, prompt_format="plain")
    item = facts.split("forget")[0]
    enc = encode_qa(tok, item.question, item.answer, 256)
    prompt = _ids(tok, PROMPT_TEMPLATE.format(question=item.question))  # no bos: the tokenizer has none
    assert enc["input_ids"] == [*prompt, *_ids(tok, " " + item.answer), tok.eos_token_id]
    assert enc["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)


def test_template_from_config_and_errors(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)  # the embedded tokenizer: no chat template
    assert prompt_format_of(tok) == "plain"
    with pytest.raises(ValueError, match=r"^data\.prompt_format: chat, but the tokenizer has no chat template"):
        load_tokenizer(tiny_dir, prompt_format="chat")
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    tok = load_tokenizer(tiny_dir, chat_template=str(tmp_path / "chat.jinja"))
    assert prompt_format_of(tok) == "chat"
    assert tok.decode(prompt_ids(tok, "Who?")) == "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match=r"^data\.chat_template: 'nope.jinja' is neither a file nor"):
        set_prompt_format(tok, "auto", "nope.jinja")


def test_config_refuses_chat_without_a_template(tiny_dir):
    from dist_unlearn.config import ConfigError, config_from_dict
    from dist_unlearn.engine.validate import validate_run

    for path in ("embedded", tiny_dir):
        cfg = config_from_dict({"model": {"path": path}, "data": {"prompt_format": "chat"}})
        with pytest.raises(ConfigError) as err:
            validate_run(cfg)
        assert err.value.problems[0].startswith("data.prompt_format: chat, but the ")
        assert "Fix: set data.chat_template=" in err.value.problems[0]


def test_generation_answers_the_training_prompt(chat_qwen):
    from dist_unlearn.eval.generation import generate_token_ids

    target, _, facts = chat_qwen
    tok = load_tokenizer(target)
    model = load_causal_lm(target, torch.float32, "eager").eval()
    question = facts.split("forget")[0].question
    got = generate_token_ids(model, tok, [question], max_new_tokens=4)
    prompt = torch.tensor([prompt_ids(tok, question)])
    want = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )[0, prompt.shape[1] :]
    assert got[0, : want.numel()].long().tolist() == want.tolist()


@pytest.mark.slow
def test_chat_qwen_unlearns_and_evaluates_end_to_end(chat_qwen, tmp_path):
    """``dist-unlearn run`` (one process) on the chat Qwen2 with an oracle by path, then ``dist-unlearn eval``
    of the unlearned model against the oracle's saved statistics: the same forget quality and scores."""
    from dist_unlearn.cli import main

    target, oracle, facts = chat_qwen
    out = tmp_path / "out"
    cfg = small_run_config(
        out,
        str(target),
        ray={"enabled": False},
        deepspeed={"zero_stage": 0},
        train={"steps": 2},
        checkpoint={"every_steps": 0},
        data={"max_length": 128},
        eval={"oracle_dir": str(oracle), "max_examples": 4, "generate": True, "max_new_tokens": 4},
    )
    run_cli(["run", str(write_config(out / "run.yaml", cfg))])
    run_result = json.loads((out / "grad_diff" / "eval.json").read_text())["result"]
    assert 0.0 <= run_result["forget_quality"] <= 1.0 and "rouge" in run_result["splits"]["forget"]
    stats = json.loads((out / "oracle_stats.json").read_text())
    assert stats["meta"]["prompt_format"] == "auto" and len(stats["forget_truth_ratio"]) == 4

    # the exported tokenizer keeps the template: the unlearned model is scored in the chat format
    tok = load_tokenizer(out / "grad_diff" / "model")
    item = facts.split("forget")[0]
    prompt, answer = _hand_made(tok, item.question, item.answer)
    assert encode_qa(tok, item.question, item.answer, 128)["labels"] == [IGNORE_INDEX] * len(prompt) + answer

    # `dist-unlearn eval` in this process (an interpreter start-up less): the oracle is the statistics file
    cfg["eval"] = {**cfg["eval"], "oracle_dir": "", "oracle_stats": str(out / "oracle_stats.json"), "generate": False}
    cfg["eval"]["model_dir"] = str(out / "grad_diff" / "model")
    cfg["output"]["dir"] = str(tmp_path / "eval")
    cfg["ray"]["cpus_per_worker"] = 0  # leaves this process's torch thread count alone
    assert main(["eval", str(write_config(tmp_path / "eval.yaml", cfg))]) == 0
    evaluated = json.loads((tmp_path / "eval" / "grad_diff" / "eval.json").read_text())["result"]
    assert evaluated["forget_quality"] == run_result["forget_quality"]
    assert evaluated["splits"]["forget"]["prob"] == run_result["splits"]["forget"]["prob"]
