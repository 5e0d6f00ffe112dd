"""Objectives against independent computations of their formulas (values and gradients), and the
direction of one optimisation step."""

from __future__ import annotations

import math

import pytest
import torch
from fixed_logits import FixedLogitsLM

from dist_unlearn.models.logprobs import IGNORE_INDEX, sequence_stats
from dist_unlearn.unlearning import OBJECTIVES, get_objective


def _batch(seed: int = 0, b: int = 3, t: int = 6, v: int = 11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :2] = IGNORE_INDEX  # prompt
    labels[0, -1] = IGNORE_INDEX  # padding on the first row
    return logits, labels


def _loop_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Per-sequence Σ log p and |y| with explicit Python loops (independent of the vectorised code)."""
    sums, counts = [], []
    for i in range(labels.size(0)):
        total, count = logits.new_zeros(()), 0
        for t in range(1, labels.size(1)):
            y = int(labels[i, t])
            if y == IGNORE_INDEX:
                continue
            row = logits[i, t - 1]
            total = total + row[y] - torch.logsumexp(row, dim=0)
            count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def _run(name: str, forget, retain=None, ref=None, **params):
    objective = get_objective(name, **params)
    fb = {"input_ids": forget[1], "attention_mask": torch.ones_like(forget[1]), "labels": forget[1]}
    rb = None
    pairs = [forget]
    if retain is not None:
        rb = {"input_ids": retain[1], "attention_mask": torch.ones_like(retain[1]), "labels": retain[1]}
        pairs.append(retain)
    model = FixedLogitsLM(*pairs)
    return objective(model, fb, rb, ref)


def test_sequence_stats_match_loop():
    logits, labels = _batch()
    stats = sequence_stats(logits, labels)
    sums, counts = _loop_logprobs(logits, labels)
    torch.testing.assert_close(stats.logprob, torch.stack(sums))
    assert stats.num_tokens.tolist() == counts


def test_grad_diff_value_and_gradient():
    forget, retain = _batch(1), _batch(2)
    out = _run("grad_diff", forget, retain)
    fs, fc = _loop_logprobs(*forget)
    rs, rc = _loop_logprobs(*retain)
    expected = -sum(-s / c for s, c in zip(fs, fc)) / len(fs) + sum(-s / c for s, c in zip(rs, rc)) / len(rs)
    torch.testing.assert_close(out.loss, expected)
    g_out = torch.autograd.grad(out.loss, [forget[0], retain[0]])
    g_ref = torch.autograd.grad(expected, [forget[0], retain[0]])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_value_and_gradient(beta):
    forget = _batch(3)
    ref = torch.tensor([-4.0, -2.5, -7.0], dtype=torch.float64)
    out = _run("npo", forget, ref=ref, beta=beta)
    sums, _ = _loop_logprobs(*forget)
    expected = sum(-(2 / beta) * torch.log(torch.sigmoid(-beta * (s - r))) for s, r in zip(sums, ref)) / 3
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(torch.autograd.grad(out.loss, forget[0])[0], torch.autograd.grad(expected, forget[0])[0])


def test_npo_small_beta_tends_to_gradient_ascent_on_summed_nll():
    forget = _batch(4)
    ref = torch.zeros(3, dtype=torch.float64)
    g_npo = torch.autograd.grad(_run("npo", forget, ref=ref, beta=1e-6).loss, forget[0])[0]
    sums, _ = _loop_logprobs(*forget)
    g_ga = torch.autograd.grad(sum(sums) / 3, forget[0])[0]  # d/dθ of −(−Σ log p)/b
    torch.testing.assert_close(g_npo, g_ga, rtol=1e-4, atol=1e-8)


def test_simnpo_value():
    forget = _batch(5)
    out = _run("simnpo", forget, beta=2.5, delta=0.5)
    sums, counts = _loop_logprobs(*forget)
    expected = sum(-(2 / 2.5) * math.log(torch.sigmoid(-2.5 * s.detach() / c - 0.5)) for s, c in zip(sums, counts)) / 3
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-9)


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown unlearning method 'npoo'"):
        get_objective("npoo")
    with pytest.raises(ValueError, match="does not take parameter.*gamma.*accepts: beta"):
        get_objective("npo", gamma=1.0)
    with pytest.raises(ValueError, match="needs reference_logprob"):
        _run("npo", _batch())
    assert {"ga", "grad_diff", "npo", "npo_gd", "simnpo"} <= set(OBJECTIVES)


# a random-init model gives every answer log π/|y| ≈ −6, where SimNPO's default β=2.5 saturates
# (its weight on already-unlikely answers vanishes by design); β=0.1 keeps the test informative
_DIRECTION_PARAMS = {"simnpo": {"beta": 0.1}, "simnpo_gd": {"beta": 0.1}}


@pytest.mark.parametrize("name", ["ga", "grad_diff", "npo", "npo_gd", "simnpo", "simnpo_gd"])
def test_one_step_lowers_forget_probability(name, tiny_lm):
    """A real tiny Llama: one SGD step on the objective lowers log π(y_f|x_f)."""
    model, forget, retain = tiny_lm()
    objective = get_objective(name, **_DIRECTION_PARAMS.get(name, {}))
    with torch.no_grad():
        before = sequence_stats(model(input_ids=forget["input_ids"]).logits, forget["labels"]).logprob.sum()
    ref = before.new_full((forget["input_ids"].size(0),), 0.0) if objective.needs_reference else None
    if ref is not None:
        with torch.no_grad():
            ref = sequence_stats(model(input_ids=forget["input_ids"]).logits, forget["labels"]).logprob
    out = objective(model, forget, retain, ref)
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        after = sequence_stats(model(input_ids=forget["input_ids"]).logits, forget["labels"]).logprob.sum()
    assert after < before
