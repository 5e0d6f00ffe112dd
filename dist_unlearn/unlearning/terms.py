"""Forget and retain loss terms on per-sequence statistics.

Normalisation convention (every term): a term is a **mean over sequences** of a per-sequence
quantity. Likelihood terms use the length-normalised NLL ``NLL(y|x)/|y|``; preference-style terms (NPO)
use the summed sequence log-probability ``log π(y|x)`` as in their papers. Averaging per sequence
(not per token over the whole batch) makes the gradient of a mean over ranks equal to that of the
global batch whatever the answer lengths on each rank, which world-size invariance needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_unlearn.models.logprobs import SequenceStats


def nll_term(stats: SequenceStats) -> torch.Tensor:
    """Retain NLL: ``mean_i NLL(y_i|x_i)/|y_i|``, shape ``[]``."""
    return stats.mean_nll.mean()


def gradient_ascent_term(stats: SequenceStats) -> torch.Tensor:
    """GA forget term: ``−mean_i NLL(y_i|x_i)/|y_i|`` (minimising it raises the NLL).

    Thudi et al. 2022, "Unrolling SGD"; Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy
    Risks in Language Models".
    """
    return -stats.mean_nll.mean()


def npo_term(stats: SequenceStats, reference_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative Preference Optimization forget term.

    ``L = −(2/β)·mean_i log σ(−β·[log π_θ(y_i|x_i) − log π_ref(y_i|x_i)])`` with summed sequence
    log-probabilities (``stats.logprob`` and ``reference_logprob``, both ``[b]``). As β→0 it tends to
    GA on the summed NLL; for finite β the weight of already-forgotten sequences decays.

    Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective
    Unlearning".
    """
    log_ratio = stats.logprob - reference_logprob.to(stats.logprob)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def simnpo_term(stats: SequenceStats, beta: float, delta: float) -> torch.Tensor:
    """SimNPO forget term (reference-free, length-normalised).

    ``L = −(2/β)·mean_i log σ(−β·log π_θ(y_i|x_i)/|y_i| − δ)``.

    Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
    Unlearning".
    """
    normalised = stats.logprob / stats.num_tokens.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * normalised - delta).mean()


def dpo_term(
    preferred: torch.Tensor,
    preferred_ref: torch.Tensor,
    dispreferred: torch.Tensor,
    dispreferred_ref: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO / IdkDPO forget term on summed sequence log-probs (all ``[b]``).

    ``L = −(2/β)·mean_i log σ(β·[Δ(y_idk,i) − Δ(y_f,i)])`` with ``Δ(y) = log π_θ(y|x) − log π_ref(y|x)``;
    preferred = the refusal answer, dispreferred = the forget answer.

    Rafailov et al. 2023, "Direct Preference Optimization"; used for unlearning with refusals in
    Maini et al. 2024 (TOFU) and Zhang et al. 2024 (NPO).
    """
    margin = (preferred - preferred_ref.to(preferred)) - (dispreferred - dispreferred_ref.to(dispreferred))
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def flat_term(template: SequenceStats, forget: SequenceStats, divergence: str = "kl") -> torch.Tensor:
    """FLAT forget term: the variational form of an f-divergence between the template (refusal)
    answer and the forget answer, maximised (so its negative is minimised); no reference model.

    With ``p̄(y|x) = exp(log π_θ(y|x)/|y|)`` (geometric-mean token probability, per sequence):

    * ``kl``: ``g*(v) = v``, ``f*(u) = exp(u − 1)`` → ``L = mean_i [−p̄(y_e,i) + exp(p̄(y_f,i) − 1)]``;
    * ``tv``: ``g*(v) = ½·tanh(v)``, ``f*(u) = u`` → ``L = mean_i [−½tanh(p̄(y_e,i)) + ½tanh(p̄(y_f,i))]``.

    Wang et al. 2024, "LLM Unlearning via Loss Adjustment with Only Forget Data" (FLAT). Using ``p̄`` as
    the score fed to the variational form is this package's choice (per-sequence, length-normalised).
    """
    p_e = (-template.mean_nll).exp()
    p_f = (-forget.mean_nll).exp()
    if divergence == "kl":
        return (-p_e + torch.exp(p_f - 1.0)).mean()
    if divergence == "tv":
        return (-0.5 * torch.tanh(p_e) + 0.5 * torch.tanh(p_f)).mean()
    raise ValueError(f"flat: divergence must be 'kl' or 'tv', got {divergence!r}")


def targeted_term(target: SequenceStats, forget: SequenceStats, ga_weight: float) -> torch.Tensor:
    """Targeted (TRU-style) forget term: ``mean_i NLL(t_i|x_i)/|t_i| − λ·mean_i NLL(y_i|x_i)/|y_i|``
    with ``t_i`` the target response for forget question ``x_i`` and λ = ``ga_weight``.

    After "targeted unlearning" as in TRU (Targeted Reasoning Unlearning) style methods: learn a response
    that states what is withheld, while ascending on the original answer.
    """
    return target.mean_nll.mean() - ga_weight * forget.mean_nll.mean()


def masked_sequence_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_i [ Σ_t m_it·‖h_it − g_it‖² / (H·Σ_t m_it) ]``: per-sequence mean squared error over its real
    tokens and the ``H`` hidden dims, then the mean over sequences.

    Args:
        hidden: ``[b, T, H]``; target: broadcastable to it (``[H]`` for a control vector, ``[b, T, H]``);
        mask: ``[b, T]`` (1 = real token).
    """
    m = mask.to(hidden.dtype)
    sq = (hidden - target.to(hidden.dtype)).pow(2).mean(-1)  # [b, T]
    return ((sq * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def per_sequence_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values ``[n]`` at the ``True`` entries of ``mask`` ``[b, T-1]`` → per-sequence means ``[b]``."""
    total = values.new_zeros(mask.shape).index_put((mask,), values).sum(1) if values.numel() else None
    counts = mask.sum(1).to(values.dtype).clamp(min=1)
    return (total if total is not None else values.new_zeros(mask.shape[0])) / counts
