"""Tiled (memory-efficient, exact) InfoNCE: log-sum-exp over column tiles, probabilities recomputed in backward.

For ``b`` local queries and ``N`` gathered docs, plain InfoNCE materialises ``[b, N]`` logits (and autograd
keeps them). Here the forward walks over column tiles of ``T`` docs with a running max ``m`` and running sum
``s`` (the streaming log-sum-exp of Milakov & Gimelshein 2018, as in FlashAttention, Dao et al. 2022):

    m' = max(m, max_j z_ij),   s' = s exp(m - m') + sum_j exp(z_ij - m'),   lse_i = m + log s

and keeps only ``(q, k, labels, lse)``. The backward recomputes each tile's ``p_ij = exp(z_ij - lse_i)`` and
accumulates, with ``g_i`` the incoming gradient of row ``i`` and ``t = 1/tau``,

    dq_i = t sum_j g_i (p_ij - [j = p(i)]) k_j,   dk_j = t sum_i g_i (p_ij - [j = p(i)]) q_i,
    dt   = sum_ij g_i (p_ij - [j = p(i)]) s_ij.

Extra memory is ``O(b T)`` instead of ``O(b N)``; the result equals :class:`~dist_unlearn.contrastive.InfoNCELoss`
(query -> doc direction) up to floating-point rounding. For fp16/bf16 inputs the tile matmuls run in the
input dtype and everything after them (running max/sum, lse, gradients) in float32; the positive's score is read
from the same tile matmul as the log-sum-exp so that both carry the same rounding.
The idea at scale: Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for
Contrastive Loss" (Inf-CL).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dist_unlearn.contrastive.losses import Reduction, _TemperatureLoss, flatten_docs, float32_for_half

__all__ = ["TiledInfoNCELoss", "tiled_cross_entropy"]


def _tile_logits(
    q: Tensor, k_tile: Tensor, start: int, labels: Tensor, mask_ref: Tensor, t: Tensor, margin: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """One column tile: scores ``s [b, T]``, logits ``t s`` (false negatives ``-inf``) and the bool ``[b, T]``
    marking each row's positive (if it falls in this tile). ``mask_ref [b]``: positive scores for the mask."""
    scores = (q @ k_tile.T).to(mask_ref.dtype)
    is_pos = labels[:, None] == torch.arange(start, start + k_tile.shape[0], device=labels.device)[None, :]
    logits = scores * t
    if margin is not None:
        mask = (scores > (mask_ref - margin)[:, None]) & ~is_pos
        logits = logits.masked_fill(mask, -math.inf)
    return scores, logits, is_pos


class _TiledCrossEntropy(torch.autograd.Function):
    """Per-row ``lse_i(t q_i K^T) - t q_i . k_{labels_i}`` computed over column tiles; see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, labels: Tensor, t: Tensor, tile_size: int, margin: float | None
    ) -> Tensor:
        acc = float32_for_half(q.dtype)
        t_val = t.detach().to(acc)
        # Positive scores for the false-negative mask, rounded like a matmul output in the input dtype.
        mask_ref = (q.to(acc) * k[labels].to(acc)).sum(dim=1).to(q.dtype).to(acc)
        # The positive's score is read from the same tile matmul as the log-sum-exp, so rounding is consistent.
        positive = torch.zeros(q.shape[0], dtype=acc, device=q.device)
        run_max = torch.full((q.shape[0],), -math.inf, dtype=acc, device=q.device)
        run_sum = torch.zeros_like(run_max)
        for start in range(0, k.shape[0], tile_size):
            scores, logits, is_pos = _tile_logits(
                q, k[start : start + tile_size], start, labels, mask_ref, t_val, margin
            )
            positive += torch.where(is_pos, scores, torch.zeros_like(scores)).sum(dim=1)
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            ref = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            run_sum = run_sum * torch.exp(run_max - ref) + torch.exp(logits - ref[:, None]).sum(dim=1)
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        ctx.save_for_backward(q, k, labels, t, lse, positive, mask_ref)
        ctx.tile_size, ctx.margin = tile_size, margin
        return lse - t_val * positive  # [b] in float32 at least

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, Tensor | None, None, None]:
        q, k, labels, t, lse, positive, mask_ref = ctx.saved_tensors
        acc = lse.dtype
        t_val = t.detach().to(acc)
        g = grad.to(acc)
        qa = q.to(acc)
        grad_q = torch.zeros_like(qa)
        grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
        grad_t = torch.zeros((), dtype=acc, device=q.device)
        for start in range(0, k.shape[0], ctx.tile_size):
            k_tile = k[start : start + ctx.tile_size]
            scores, logits, _ = _tile_logits(q, k_tile, start, labels, mask_ref, t_val, ctx.margin)
            weights = torch.exp(logits - lse[:, None]) * g[:, None]  # g_i p_ij, 0 where masked
            grad_q += t_val * (weights @ k_tile.to(acc))
            grad_k[start : start + k_tile.shape[0]] = t_val * (weights.T @ qa)
            grad_t += (weights * scores).sum()
        # The "- [j = p(i)]" term.
        k_pos = k[labels].to(acc)
        grad_q -= t_val * g[:, None] * k_pos
        grad_k.index_add_(0, labels, -t_val * g[:, None] * qa)
        grad_t -= (g * positive).sum()
        return (
            grad_q.to(q.dtype) if ctx.needs_input_grad[0] else None,
            grad_k.to(k.dtype) if ctx.needs_input_grad[1] else None,
            None,
            grad_t.to(t.dtype).reshape(t.shape) if ctx.needs_input_grad[3] else None,
            None,
            None,
        )


def tiled_cross_entropy(
    q: Tensor, k: Tensor, labels: Tensor, inverse_temperature: Tensor, tile_size: int, margin: float | None = None
) -> Tensor:
    """Per-row cross-entropy of logits ``t q K^T`` against ``labels``, tiled over columns of ``K``.

    Args:
        q: ``[b, d]``; k: ``[N, d]``; labels: ``[b]`` long in ``[0, N)``; inverse_temperature: 0-dim ``t``.
        tile_size: columns per tile ``T``.
        margin: optional false-negative margin (as :func:`~dist_unlearn.contrastive.losses.false_negative_mask`).
    Returns:
        ``[b]`` row losses ``log sum_j exp(t q_i . k_j) - t q_i . k_{labels_i}`` (float32 for half inputs);
        differentiable in ``q``,
        ``k`` and ``t`` with memory ``O(b T)``.
    """
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    return _TiledCrossEntropy.apply(q, k, labels, inverse_temperature, int(tile_size), margin)


class TiledInfoNCELoss(_TemperatureLoss):
    """Query -> doc InfoNCE (same layout, labels, masking and gradient convention as
    :class:`~dist_unlearn.contrastive.InfoNCELoss`, ``symmetric=False``) computed over column tiles.

        l_i = -t s_{i,p(i)} + log sum_{j not masked} exp(t s_ij),   j over all N gathered docs

    Exact, with loss memory ``O(b * tile_size)`` instead of ``O(b * N)``. Gradients flow to the queries, to
    the gathered docs (and through :func:`~dist_unlearn.distributed.all_gather_with_grad` to each rank's own
    docs) and to a learnable temperature (global-mean convention: rank average = single-process gradient).

    Args:
        temperature, learnable_temperature, max_inverse_temperature, cross_rank, false_negative_margin,
        normalize, reduction, group: as :class:`~dist_unlearn.contrastive.InfoNCELoss`.
        tile_size: docs per column tile.

    Shapes: ``forward(queries [b, d], docs [b, 1+h, d] | [b*(1+h), d]) -> 0-dim``.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        tile_size: int = 1024,
        learnable_temperature: bool = False,
        max_inverse_temperature: float = 100.0,
        cross_rank: bool = True,
        false_negative_margin: float | None = None,
        normalize: bool = True,
        reduction: Reduction = "global_mean",
        group: Any = None,
    ) -> None:
        super().__init__(
            temperature,
            learnable_temperature,
            max_inverse_temperature,
            cross_rank=cross_rank,
            reduction=reduction,
            normalize=normalize,
            group=group,
        )
        if tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.tile_size = tile_size
        self.false_negative_margin = false_negative_margin

    def forward(self, queries: Tensor, docs: Tensor) -> Tensor:
        flat, k = flatten_docs(queries, docs)
        q, d = self._prep(queries), self._prep(flat)
        cols, offset = self._columns(d)
        labels = offset + torch.arange(q.shape[0], device=q.device) * k
        t = self.inverse_temperature(q)
        rows = tiled_cross_entropy(q, cols, labels, t, self.tile_size, self.false_negative_margin)
        return self._reduce(rows)
