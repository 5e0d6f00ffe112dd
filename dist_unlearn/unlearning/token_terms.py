"""Per-token functions for :func:`dist_unlearn.models.chunked_lm.token_values`: each maps one chunk of
logits ``[c, V]`` (and aligned chunks, the target tokens ``[c]`` always last) to ``[c]``. Reference
logits are computed inside the chunk from π_ref's hidden states (``ref_logits``, no gradient), so
neither side's full ``[n, V]`` logits exist. All distributions are ``log_softmax`` of logits (never raw logits)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

RefLogits = Callable[[torch.Tensor], torch.Tensor]


def kl_to_reference(ref_logits: RefLogits) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``KL(π_ref ‖ π_θ)_t = Σ_v p_ref,v·(log p_ref,v − log p_θ,v)`` per token, ``[c]``."""

    def fn(logits: torch.Tensor, ref_hidden: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        ref_logp = ref_logits(ref_hidden).log_softmax(-1).to(logits.dtype)
        return (ref_logp.exp() * (ref_logp - logits.log_softmax(-1))).sum(-1)

    return fn


def undial_ce(ref_logits: RefLogits, beta: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """UNDIAL per-token CE ``−Σ_v q_v log p_θ,v`` with ``q = softmax(z_ref − β·onehot(y))`` ``[c]``.

    Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in LLMs".
    """

    def fn(logits: torch.Tensor, ref_hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z_ref = ref_logits(ref_hidden).to(logits.dtype)
        adjusted = z_ref - beta * F.one_hot(target, z_ref.shape[-1]).to(z_ref.dtype)
        return -(adjusted.softmax(-1) * logits.log_softmax(-1)).sum(-1)

    return fn


def weighted_nll(beta: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """WGA per-token ``sg(p_t)^β · NLL_t`` with ``p_t = π_θ(y_t|·)`` (weight without gradient) ``[c]``.

    Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond" (WGA).
    """

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (beta * logp.detach()).exp() * (-logp)

    return fn


def uniform_ce(logits: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    """Cross entropy of π_θ to the uniform distribution, ``−(1/V)·Σ_v log p_θ,v`` per token ``[c]``."""
    return -logits.log_softmax(-1).mean(-1)
