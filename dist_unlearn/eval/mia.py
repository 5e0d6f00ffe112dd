"""Per-example token statistics of answers and the membership-inference scores built from them.

One chunked pass over the answer tokens (:func:`dist_unlearn.models.chunked_lm.token_values`, never the
full ``[b·T, V]`` logits) yields per token ``t`` with target ``y_t`` and next-token distribution ``p``:

* ``log p(y_t)`` and the teacher-forced argmax hit;
* ``μ_t = Σ_v p_v log p_v`` and ``σ_t = sqrt(Σ_v p_v (log p_v)² − μ_t²)`` (mean/std of the log-probs
  under the model's own distribution), for Min-K%++.

Scores per example (higher = "more likely a member"):

* LOSS (Yeom et al., 2018): ``(1/|y|) Σ_t log p(y_t)``;
* zlib (Carlini et al., 2021, "Extracting Training Data from Large Language Models", arXiv:2012.07805,
  Sec. 5.1; the same score in MUSE and open-unlearning): the text's log-perplexity, i.e. its *mean*
  token NLL ``−(1/|y|) Σ_t log p(y_t)``, divided by the length in bytes of the zlib-compressed UTF-8
  text; negated here so that higher = member: ``(1/|y|) Σ_t log p(y_t) / zlib_bytes(answer text)``;
* Min-K% (Shi et al., 2024, arXiv:2310.16789): mean of the ``⌈k·|y|⌉`` lowest ``log p(y_t)``;
* Min-K%++ (Zhang et al., 2024, arXiv:2404.02936): the same over ``z_t = (log p(y_t) − μ_t)/σ_t``;
* MUSE's Min-40% (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation", arXiv:2407.06460,
  the attack of its PrivLeak): Min-K% with ``k = 0.4`` over ``int(0.4·|y|)`` tokens (rounded down, as
  the Min-K% and MUSE reference code do; at least one token), column ``min_k_40``.

The Min-K% / Min-K%++ columns use ``eval.min_k`` (the project's default 0.2) and ``⌈k·|y|⌉`` tokens;
only ``min_k_40`` is MUSE's attack.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

from dist_unlearn.data.qa import QADataset, collate_qa
from dist_unlearn.distributed.sharded import sharded_map
from dist_unlearn.eval.metrics import extraction_strength
from dist_unlearn.eval.modes import eval_mode
from dist_unlearn.models.chunked_lm import (
    forward_hidden,
    output_head,
    scatter_per_sequence,
    scored_positions,
    token_values,
)

TOKEN_COLUMNS = ("logprob", "hit", "mu", "sigma")
MUSE_MIN_K = 0.4
"""MUSE's Min-K% fraction for PrivLeak (its ``forget_holdout_Min-40%`` AUC)."""
SCORE_COLUMNS = ("logprob", "num_tokens", "num_correct", "min_k", "min_k_pp", "extraction_strength", "min_k_40")
"""Columns of :func:`score_answers`'s rows."""


def token_stats_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per token ``[log p(y), 1{argmax = y}, μ, σ]`` from logits ``[c, V]`` and targets ``[c]`` → ``[c, 4]``."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    target_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    hit = (logits.argmax(-1) == target).float()
    return torch.stack([target_logp, hit, mu, var.clamp(min=0).sqrt()], dim=-1)


def lowest_mean(values: torch.Tensor, k: float, round_down: bool = False) -> float:
    """Mean of the ``⌈k·n⌉`` (``round_down``: ``int(k·n)``) smallest of ``values`` ``[n]`` (at least one)."""
    n = values.numel()
    count = max(1, int(k * n) if round_down else math.ceil(k * n))
    return float(values.sort().values[:count].mean())


@torch.no_grad()
def answer_token_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stats [b, T-1, 4], mask [b, T-1])``: :data:`TOKEN_COLUMNS` at every scored answer token."""
    mask, targets = scored_positions(batch["labels"])
    hidden = forward_hidden(model, batch).final[:, :-1][mask]
    per_token = token_values(token_stats_fn, output_head(model), hidden, targets)
    return scatter_per_sequence(per_token.float(), mask), mask


def scores_from_token_stats(stats: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """Rows of :data:`SCORE_COLUMNS` ``[b, 7]`` from :func:`answer_token_stats` output."""
    rows = []
    es = extraction_strength(stats[..., 1].cpu().numpy(), mask.cpu().numpy())
    for i in range(stats.shape[0]):
        s = stats[i][mask[i]]
        logp, hit, mu, sigma = s.unbind(-1)
        z = (logp - mu) / sigma.clamp(min=1e-6)
        n = int(mask[i].sum())
        min_k, min_k_pp = lowest_mean(logp, k), lowest_mean(z, k)
        muse = lowest_mean(logp, MUSE_MIN_K, round_down=True)
        rows.append([float(logp.sum()), n, float(hit.sum()), min_k, min_k_pp, float(es[i]), muse])
    return torch.tensor(rows, dtype=torch.float64)


@torch.no_grad()
def score_answers(
    model: torch.nn.Module,
    dataset: QADataset,
    pad_token_id: int,
    k: float = 0.2,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-example ``[N, 7]`` rows of :data:`SCORE_COLUMNS`, sharded over ranks (collective)."""

    def score(indices: Sequence[int]) -> torch.Tensor:
        batch = collate_qa([dataset[i] for i in indices], pad_token_id)
        batch = {key: v.to(device) for key, v in batch.items()}
        stats, mask = answer_token_stats(model, batch)
        return scores_from_token_stats(stats, mask, k)

    with eval_mode(model):
        return sharded_map(len(dataset), batch_size, score, device=device).double()


def zlib_bytes(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (Carlini et al.'s zlib entropy)."""
    return len(zlib.compress(text.encode("utf-8")))


def mia_scores(rows: torch.Tensor, answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """The attack scores per example (higher = member) from :func:`score_answers` rows.

    ``zlib`` is the mean token log-prob (minus the log-perplexity) over the zlib byte length of the
    answer text (Carlini et al., 2021), not the summed log-prob.
    """
    logprob, num_tokens = rows[:, 0], rows[:, 1].clamp(min=1)
    zlen = torch.tensor([zlib_bytes(a) for a in answers], dtype=torch.float64)
    mean_logprob = logprob / num_tokens
    return {
        "loss": mean_logprob,
        "zlib": mean_logprob / zlen,
        "min_k": rows[:, 3],
        "min_k_pp": rows[:, 4],
        "min_k_40": rows[:, 6],
    }
