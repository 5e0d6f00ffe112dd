"""Retrieval metrics of an encoder: recall@k and MRR of queries against a passage corpus.

With cosine scores ``S = norm(Q) · norm(P)ᵀ`` and ``rank_i`` the 1-based position of query ``i``'s
relevant passage when its row is sorted descending: ``recall@k = mean_i [rank_i ≤ k]`` and
``MRR = mean_i 1/rank_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dist_unlearn.data.retrieval import RetrievalEvalSet
from dist_unlearn.distributed.sharded import sharded_map
from dist_unlearn.eval.modes import eval_mode
from dist_unlearn.models.encoders import encode_batch, tokenize


@torch.no_grad()
def embed_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    pooling: str = "mean",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """L2-normalised embeddings ``[N, d]`` of ``texts``, computed sharded over ranks (collective)."""

    def score(indices: Sequence[int]) -> torch.Tensor:
        batch = tokenize(tokenizer, [texts[i] for i in indices], max_length, device)
        return F.normalize(encode_batch(model, batch, pooling).float(), dim=-1)

    with eval_mode(model):
        return sharded_map(len(texts), batch_size, score, device=device)


def retrieval_metrics(
    queries: torch.Tensor, passages: torch.Tensor, relevant: Sequence[int], ks: Sequence[int] = (1, 10)
) -> dict[str, float]:
    """recall@k for each ``k`` and MRR (see module docstring); inputs ``[Nq, d]``, ``[Np, d]``."""
    scores = queries @ passages.T
    target = torch.as_tensor(list(relevant))
    positive = scores[torch.arange(len(target)), target]
    rank = 1 + (scores > positive.unsqueeze(1)).sum(1)
    out = {f"recall@{k}": float((rank <= k).float().mean()) for k in ks}
    out["mrr"] = float((1.0 / rank.float()).mean())
    return out


def evaluate_retrieval(
    model: Any,
    tokenizer: Any,
    eval_set: RetrievalEvalSet,
    max_length: int,
    pooling: str = "mean",
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Embed ``eval_set`` with ``model`` and return :func:`retrieval_metrics` (collective)."""
    q = embed_texts(model, tokenizer, eval_set.queries, max_length, pooling, device=device)
    p = embed_texts(model, tokenizer, eval_set.passages, max_length, pooling, device=device)
    return retrieval_metrics(q, p, eval_set.relevant)
