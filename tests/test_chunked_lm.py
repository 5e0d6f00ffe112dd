"""The chunked LM path equals the plain full-logits computation, in value and gradient, also under ZeRO-3."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_on_ranks

from dist_unlearn.models.chunked_lm import (
    forward_hidden,
    output_head,
    scored_positions,
    token_values,
)
from dist_unlearn.models.logprobs import forward_sequence_stats, sequence_stats


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunked_sequence_stats_equal_plain_in_value_and_gradient(tiny_lm, chunk_size: int) -> None:
    model, forget, _ = tiny_lm()
    plain = sequence_stats(
        model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits, forget["labels"]
    )
    (plain.logprob * torch.arange(1.0, 1 + len(plain.logprob))).sum().backward()
    expected = _grads(model)
    chunked = forward_sequence_stats(model, forget, chunk_size=chunk_size)
    (chunked.logprob * torch.arange(1.0, 1 + len(chunked.logprob))).sum().backward()
    got = _grads(model)
    torch.testing.assert_close(chunked.logprob, plain.logprob, rtol=1e-6, atol=1e-5)
    assert torch.equal(chunked.num_tokens, plain.num_tokens)
    assert torch.equal(chunked.num_correct, plain.num_correct)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_token_values_kl_to_a_reference_equals_plain(tiny_lm) -> None:
    """A two-model per-token function (KL(π_ref‖π_θ)) through the same chunked mechanism."""
    model, forget, _ = tiny_lm()
    reference, _, _ = tiny_lm()
    for p in reference.parameters():
        p.requires_grad_(False)
        p.add_(0.05 * torch.randn_like(p)) if p.dim() > 1 else None
    mask, _ = scored_positions(forget["labels"])
    logits = model(input_ids=forget["input_ids"]).logits[:, :-1][mask]
    ref_logits = reference(input_ids=forget["input_ids"]).logits[:, :-1][mask]
    plain = (ref_logits.log_softmax(-1).exp() * (ref_logits.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
    plain.sum().backward()
    expected = _grads(model)

    hidden = forward_hidden(model, forget).final[:, :-1][mask]
    ref_hidden = forward_hidden(reference, forget).final[:, :-1][mask]
    ref_head = output_head(reference)

    def kl(z: torch.Tensor, h_ref: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref_logp = ref_head(h_ref).float().log_softmax(-1)
        return (ref_logp.exp() * (ref_logp - z.log_softmax(-1))).sum(-1)

    chunked = token_values(kl, output_head(model), hidden, ref_hidden, chunk_size=5)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for g, e in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_forward_hidden_captures_named_layers(tiny_lm) -> None:
    model, forget, _ = tiny_lm()
    out = forward_hidden(model, forget, layer_names=["model.layers.0"])
    ref = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"], output_hidden_states=True)
    assert out.final.shape == (*forget["input_ids"].shape, model.config.hidden_size)
    torch.testing.assert_close(out.layers["model.layers.0"], ref.hidden_states[1])
    with pytest.raises(ValueError, match="no module named 'model.layers.9'"):
        forward_hidden(model, forget, layer_names=["model.layers.9"])


def tiny_batch_and_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The same seeded tiny Llama and a forget batch in every process."""
    from dist_unlearn.data import QADataset, collate_qa, generate_facts
    from dist_unlearn.models import build_embedded_model

    facts = generate_facts(num_people=6, questions_per_person=2, seed=1)
    torch.manual_seed(0)
    model, tok = build_embedded_model(facts.corpus(), vocab_size=400, hidden_size=32, num_layers=2, num_heads=2)
    batch = collate_qa(list(QADataset(facts.split("forget")[:4], tok, 48)), tok.pad_token_id)
    return model, batch


def _zero3_grads(rank: int, world_size: int, chunk_size: int) -> dict:
    """ZeRO-3 (partitioning forced) on this rank's half of the batch; returns the full gathered gradients."""
    import os

    import deepspeed

    from dist_unlearn.engine.ds_config import build_deepspeed_config

    os.environ["LOCAL_RANK"] = str(rank)
    model, batch = tiny_batch_and_model()
    half = {k: v.chunk(world_size)[rank] for k, v in batch.items()}
    config = build_deepspeed_config(zero_stage=3, micro_batch_size=len(half["labels"]), world_size=world_size, lr=0.0)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config, dist_init_required=False
    )
    stats = forward_sequence_stats(engine, half, chunk_size=chunk_size)
    loss = -stats.logprob.sum() / len(batch["labels"]) * world_size  # engine averages over ranks
    engine.backward(loss)
    grads = {}
    for name, p in engine.module.named_parameters():
        grads[name] = deepspeed.utils.safe_get_full_grad(p).detach().clone()
    logprob = stats.logprob.detach()
    engine.destroy()
    return {"grads": grads, "logprob": logprob}


def test_chunked_stats_under_zero3_on_two_ranks_equal_one_process() -> None:
    model, batch = tiny_batch_and_model()
    plain = sequence_stats(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    (-plain.logprob.sum() / len(batch["labels"])).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    results = run_on_ranks(_zero3_grads, 2, 5, timeout=240)
    torch.testing.assert_close(torch.cat([r["logprob"] for r in results]), plain.logprob.detach(), rtol=1e-5, atol=1e-5)
    for name, grad in results[0]["grads"].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
