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
