"""Per-sequence answer statistics from a causal LM: summed log-probability, token count, greedy hits.

Conventions used by every objective and metric in the package:
``labels`` is ``[b, T]`` with ``-100`` on positions that are not scored (prompt, padding); position
``t`` of the logits predicts label ``t + 1``. A *sequence log-probability* is
``log π(y|x) = Σ_t log p(y_t | x, y_<t)`` over the scored tokens, and ``|y|`` is their count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_unlearn.models.chunked_lm import (
    forward_hidden,
    output_head,
    scatter_per_sequence,
    scored_positions,
    target_logprob_and_hit,
    token_values,
)

IGNORE_INDEX = -100


@dataclass
class SequenceStats:
    """Per-sequence statistics, each a tensor of shape ``[b]``.

    logprob: Σ_t log p(y_t | ·) over answer tokens (differentiable when the forward was).
    num_tokens: |y|, the number of scored tokens (float, ≥ 1 for real examples).
    num_correct: how many scored tokens the greedy (argmax) prediction gets right.
    """

    logprob: torch.Tensor
    num_tokens: torch.Tensor
    num_correct: torch.Tensor

    @property
    def mean_nll(self) -> torch.Tensor:
        """Length-normalised negative log-likelihood NLL/|y|, shape ``[b]``."""
        return -self.logprob / self.num_tokens.clamp(min=1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast for the softmax; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def shifted_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the next tokens.

    Args:
        logits: ``[b, T, V]``.
        labels: ``[b, T]`` with ``-100`` on unscored positions.
    Returns:
        ``(logp, mask)``, both ``[b, T-1]``: ``logp[:, t] = log softmax(logits[:, t])[labels[:, t+1]]``
        (0 where masked) and the float mask of scored positions.
    """
    target = labels[:, 1:]
    mask = target.ne(IGNORE_INDEX)
    safe_target = target.masked_fill(~mask, 0)
    logp = torch.log_softmax(_at_least_fp32(logits[:, :-1]), dim=-1)
    token_logp = logp.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    return token_logp * mask, mask.to(token_logp.dtype)


def sequence_stats(logits: torch.Tensor, labels: torch.Tensor) -> SequenceStats:
    """Summed answer log-probability, answer length and greedy hits per sequence (see module doc)."""
    token_logp, mask = shifted_token_logprobs(logits, labels)
    greedy = logits[:, :-1].argmax(dim=-1)
    correct = (greedy == labels[:, 1:]).to(mask.dtype) * mask
    return SequenceStats(token_logp.sum(-1), mask.sum(-1), correct.sum(-1).detach())


def forward_sequence_stats(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = None
) -> SequenceStats:
    """Run ``model`` (a module, PEFT model or DeepSpeed engine) on a QA batch and return :class:`SequenceStats`.

    Memory-lean and exact: the logits are computed only at scored positions, a chunk of tokens at a time,
    and recomputed in the backward (:mod:`dist_unlearn.models.chunked_lm`); equal to
    ``sequence_stats(model(...).logits, labels)`` in value and gradient.
    """
    return sequence_stats_from_hidden(model, forward_hidden(model, batch).final, batch["labels"], chunk_size)


def sequence_stats_from_hidden(
    model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None
) -> SequenceStats:
    """:class:`SequenceStats` from final hidden states ``[b, T, H]`` through the model's output head, chunked."""
    mask, targets = scored_positions(labels)
    per_token = token_values(
        target_logprob_and_hit, output_head(model), hidden[:, :-1][mask], targets, chunk_size=chunk_size
    )
    per_seq = scatter_per_sequence(per_token, mask).sum(1)  # [b, 2]
    return SequenceStats(per_seq[:, 0], mask.sum(-1).to(per_seq.dtype), per_seq[:, 1].detach())
