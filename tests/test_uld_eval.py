"""ULD is scored as its unlearned model, ``softmax(z_target − α·z_assistant)`` (Ji et al. 2024), never as the
assistant: the combined module against a hand computation from the two models' logits, and a finished
``dist-unlearn run`` / ``dist-unlearn eval`` of ULD against the same hand computation on the saved models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, small_run_config, write_config

from dist_unlearn.models import build_tiny_llama
from dist_unlearn.models.combined import LogitDifferenceLM, load_scoring_model
from dist_unlearn.models.logprobs import forward_sequence_stats

ALPHA = 0.7


def _hand_answer_logprob(target, assistant, batch, alpha):
    """Per sequence ``Σ_t log softmax(z_t − α·z_a)[y_t]`` over answer tokens, from the full logits."""
    with torch.no_grad():
        zt = target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        za = assistant(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(zt - alpha * za, dim=-1)[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def _pair(tiny_lm):
    target, forget, _ = tiny_lm()
    vocab = target.config.vocab_size
    # a different width and depth: the combined head splits the concatenated hidden states correctly
    assistant = build_tiny_llama(vocab_size=vocab, hidden_size=48, num_layers=1, num_heads=2, seed=3)
    return target.eval(), assistant.eval(), forget


def test_combined_logprobs_equal_hand_computation(tiny_lm):
    target, assistant, batch = _pair(tiny_lm)
    combined = LogitDifferenceLM(target, assistant, ALPHA).eval()
    expected, _ = _hand_answer_logprob(target, assistant, batch, ALPHA)
    with torch.no_grad():
        logits = combined(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        zt = target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        za = assistant(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chunked = forward_sequence_stats(combined, batch).logprob  # the path every metric takes
        plain = forward_sequence_stats(target, batch).logprob
    torch.testing.assert_close(logits, zt - ALPHA * za, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.double(), expected, rtol=1e-5, atol=1e-4)
    assert (chunked - plain).abs().max() > 0.1  # not the target's numbers


def test_combined_greedy_generation_follows_combined_logits(tiny_lm):
    target, assistant, batch = _pair(tiny_lm)
    combined = LogitDifferenceLM(target, assistant, ALPHA).eval()
    prompt = batch["input_ids"][:1, :5]
    out = combined.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6)
    ids = prompt  # reference: argmax of the combined logits, recomputed from scratch each step (no cache)
    with torch.no_grad():
        for _ in range(6):
            z = target(input_ids=ids).logits[:, -1] - ALPHA * assistant(input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, z.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def _forget_prob(cfg_dict, target_dir, assistant_dir, alpha, combined=True):
    """Mean over the evaluated forget questions of ``exp(log π(y|x)/|y|)``, π from the saved models by hand."""
    from dist_unlearn.config import config_from_dict
    from dist_unlearn.data.qa import QADataset, collate_qa
    from dist_unlearn.engine.prepare import load_benchmark
    from dist_unlearn.eval.suite import split_items
    from dist_unlearn.models.loading import load_causal_lm, load_tokenizer

    cfg = config_from_dict(cfg_dict)
    tok = load_tokenizer(assistant_dir)
    items = split_items(load_benchmark(cfg.data), "forget", cfg.eval.max_examples)
    batch = collate_qa(list(QADataset(items, tok, cfg.data.max_length)), tok.pad_token_id)
    target = load_causal_lm(target_dir, torch.float32, "eager").eval()
    assistant = load_causal_lm(assistant_dir, torch.float32, "eager").eval()
    if combined:
        logprob, n = _hand_answer_logprob(target, assistant, batch, alpha)
    else:
        logprob, n = _hand_answer_logprob(assistant, assistant, batch, 0.0)
    return float((logprob / n).exp().mean())


@pytest.mark.slow
def test_uld_run_and_eval_score_the_combined_model(tmp_path, small_target):
    cfg = small_run_config(
        tmp_path,
        small_target,
        method={"names": ["uld"], "params": {"uld": {"alpha": ALPHA}}},
        train={"steps": 3, "forget_batch_size": 4, "retain_batch_size": 4, "lr": 5.0e-3},
        ray={"enabled": False, "num_workers": 1},
        deepspeed={"zero_stage": 3},
        checkpoint={"every_steps": 0},
        eval={"max_examples": 4, "generate": False, "every_steps": 3},  # periodic eval at the last step
        output={"dir": str(tmp_path), "save_dtype": "fp32", "tensorboard": False},
    )
    run_cli(["run", str(write_config(tmp_path / "run.yaml", cfg))], timeout=600)
    model_dir = tmp_path / "uld" / "model"
    spec = json.loads((model_dir / "inference.json").read_text())
    assert spec["kind"] == "logit_difference" and spec["alpha"] == ALPHA

    hand = _forget_prob(cfg, small_target, model_dir, ALPHA)
    assistant_only = _forget_prob(cfg, small_target, model_dir, ALPHA, combined=False)
    assert abs(hand - assistant_only) > 0.05  # the two models really differ on the forget set

    summary = json.loads((tmp_path / "uld" / "metrics.json").read_text())
    assert summary["eval"]["forget_prob"] == pytest.approx(hand, rel=1e-4)
    assert summary["after"]["forget"]["prob"] == pytest.approx(hand, rel=1e-4)
    periodic = json.loads((tmp_path / "uld" / "eval_steps.jsonl").read_text().splitlines()[-1])  # the live engine
    assert periodic["step"] == 3 and periodic["result"]["splits"]["forget"]["prob"] == pytest.approx(hand, rel=1e-4)
    assert json.loads((tmp_path / "uld" / "best_model" / "inference.json").read_text()) == spec

    (tmp_path / "uld" / "eval.json").unlink()
    run_cli(["eval", str(write_config(tmp_path / "eval.yaml", cfg)), f"eval.model_dir={model_dir}"], timeout=600)
    evaluation = json.loads((tmp_path / "uld" / "eval.json").read_text())
    assert evaluation["result"]["splits"]["forget"]["prob"] == pytest.approx(hand, rel=1e-4)

    loaded = load_scoring_model(model_dir)
    assert isinstance(loaded, LogitDifferenceLM) and loaded.alpha == ALPHA


def test_attacks_attack_the_combined_model(tmp_path):
    """Relearning fine-tunes target and assistant through the combined logits; nf4 quantizes both members."""
    from dist_unlearn.data import generate_facts
    from dist_unlearn.eval.attacks import quantized_model, relearned_model
    from dist_unlearn.models import build_embedded_model
    from dist_unlearn.unlearning.uld import write_uld_artifact

    facts = generate_facts(num_people=4, questions_per_person=2, seed=1)
    model, tok = build_embedded_model(facts.corpus(), vocab_size=300, hidden_size=32, num_layers=1, num_heads=2)
    for name, seed in (("target", 0), ("assistant", 1)):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    write_uld_artifact(tmp_path / "assistant", tmp_path / "target", ALPHA)
    before = load_scoring_model(tmp_path / "assistant")
    relearned = relearned_model(tmp_path / "assistant", tok, facts, 2, 0.5, 1e-2, 48)
    assert isinstance(relearned, LogitDifferenceLM) and relearned.alpha == ALPHA
    for member in ("target", "assistant"):
        old, new = getattr(before, member).lm_head.weight, getattr(relearned, member).lm_head.weight
        assert not torch.equal(old, new), member
    quantized = quantized_model(tmp_path / "assistant", "nf4")
    assert isinstance(quantized, LogitDifferenceLM)
    assert quantized.target.is_loaded_in_4bit and quantized.assistant.is_loaded_in_4bit
