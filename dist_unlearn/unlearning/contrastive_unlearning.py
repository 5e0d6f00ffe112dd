"""Contrastive unlearning in representation space (after Zhang et al. 2024, "Contrastive Unlearning: A
Contrastive Approach to Machine Unlearning"; Zhang et al. 2025 for LLMs).

Each forget example's pooled representation ``q_i`` (mean of the final hidden states over its real
tokens) is an InfoNCE query whose positive is a held-out example's representation ``p_i`` and whose
negatives are retain representations ``r_j`` (and every other candidate gathered from all ranks):

``L = mean_i [ −s(q_i, p_i)/τ + log Σ_{d ∈ cands} exp(s(q_i, d)/τ) ]``, ``s`` the cosine similarity,

so forget representations move toward unseen data and away from their retain neighbours. Positives and
negatives are detached (targets, not trained). Candidates come from all ranks through
:class:`dist_unlearn.contrastive.InfoNCELoss` (cross-rank, global-mean convention: the DeepSpeed
average over ranks equals the single-process loss on the global batch). Data: D_f, D_r, holdout.
"""

from __future__ import annotations

import torch

from dist_unlearn.contrastive import InfoNCELoss
from dist_unlearn.unlearning.context import StepContext


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``[b, T, H]`` over positions where ``mask`` ``[b, T]`` is 1 → ``[b, H]``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class ContrastiveUnlearning:
    """Forget term of contrastive unlearning (see the module docstring). ``temperature`` = τ."""

    def __init__(self, temperature: float = 0.1) -> None:
        self.loss = InfoNCELoss(temperature=temperature, cross_rank=True)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        forget = mean_pool(ctx.hidden("forget").final, ctx.sub_batch("forget")["attention_mask"])
        with torch.no_grad():
            positives = mean_pool(ctx.hidden("holdout").final, ctx.sub_batch("holdout")["attention_mask"])
        negatives = mean_pool(ctx.hidden("retain").final, ctx.sub_batch("retain")["attention_mask"]).detach()
        b = forget.shape[0]
        if positives.shape[0] != b:
            raise ValueError(f"contrastive: {positives.shape[0]} holdout rows for {b} forget rows (need one each)")
        per_query = negatives.shape[0] // b
        docs = [positives.unsqueeze(1)]
        if per_query:
            docs.append(negatives[: b * per_query].view(b, per_query, -1))
        return self.loss(forget, torch.cat(docs, dim=1).to(forget.dtype))
