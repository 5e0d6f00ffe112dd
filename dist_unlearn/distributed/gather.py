"""All-gather along dim 0 with autograd support and unequal per-rank sizes.

Forward
    Rank ``r`` holds ``x_r`` of shape ``[b_r, *rest]`` (``rest`` equal on all ranks, ``b_r`` may differ and
    may be 0). The sizes are exchanged first, every ``x_r`` is zero-padded to ``max_r b_r``, all-gathered and
    stripped again, so every rank gets ``X = cat([x_0, ..., x_{W-1}])`` of shape ``[sum_r b_r, *rest]`` in
    rank order. Rank ``r``'s rows sit at ``X[o_r : o_r + b_r]`` with ``o_r = sum_{s<r} b_s``.

Backward (gradient convention)
    Let rank ``s`` compute a loss ``L_s`` from its copy of ``X``, and let the objective be the **sum**
    ``L = sum_s L_s``. The incoming gradient on rank ``s`` is ``G_s = dL_s/dX``. Rank ``r`` receives

        dL/dx_r = ( sum_s G_s )[o_r : o_r + b_r]

    i.e. an all-reduce-sum of the incoming gradients followed by slicing out the own rows. This is the
    exact gradient of ``L`` with respect to ``x_r``: every copy of ``x_r`` (one per rank) contributes.
    If instead the objective is the rank **average** ``(1/W) sum_s L_s`` (what DDP and DeepSpeed produce when
    they average parameter gradients after each rank's ``backward``), the averaged parameter gradient is the
    gradient of that average; the losses in :mod:`dist_unlearn.contrastive` scale their per-rank value so
    that this average equals the single-process loss.

    Every rank must run backward through each gather exactly once and in the same order (the backward is a
    collective). With no initialised process group, or a group of one rank, the function is the identity.

See also CLIP's "local loss + gather with grad" (Radford et al. 2021; Cherti et al. 2023, OpenCLIP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_with_grad", "all_gather_with_sizes", "gather_sizes", "group_rank", "group_world_size"]


def _active(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def group_world_size(group: Any = None) -> int:
    """World size of ``group`` (1 without an initialised process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 without an initialised process group)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _comm_device(group: Any = None) -> torch.device:
    """Device for small bookkeeping tensors: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_sizes(n: int, group: Any = None, device: torch.device | str | None = None) -> list[int]:
    """All-gather one integer per rank.

    Args:
        n: this rank's value (typically its local batch size ``b_r``).
        group: process group (default: the world).
        device: device of the exchanged tensor; default CUDA under NCCL, else CPU.
    Returns:
        ``[b_0, ..., b_{W-1}]`` in rank order; ``[n]`` without a process group or with one rank.
    """
    if not _active(group):
        return [int(n)]
    dev = torch.device(device) if device is not None else _comm_device(group)
    mine = torch.tensor([int(n)], dtype=torch.long, device=dev)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(v.item()) for v in out]


class _AllGatherWithGrad(torch.autograd.Function):
    """``[b_r, ...]`` on each rank -> ``[sum_r b_r, ...]``; backward: all-reduce-sum, then own slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, sizes: list[int]) -> Tensor:
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.count = sizes[rank]
        longest = max(sizes)
        if longest == 0:
            return x.new_empty((0, *x.shape[1:]))
        padded = x.contiguous()
        if x.shape[0] < longest:
            padded = torch.cat([padded, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        total = grad.contiguous().clone()
        if total.numel() > 0:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.start : ctx.start + ctx.count], None, None


def all_gather_with_sizes(x: Tensor, group: Any = None) -> tuple[Tensor, list[int]]:
    """Like :func:`all_gather_with_grad`, also returning the per-rank sizes ``[b_0, ..., b_{W-1}]``.

    The offset of this rank's rows in the result is ``sum(sizes[:group_rank(group)])``.
    """
    if x.dim() == 0:
        raise ValueError("all_gather_with_grad needs a tensor with at least one dimension (gathered along dim 0)")
    if not _active(group):
        return x, [x.shape[0]]
    sizes = gather_sizes(x.shape[0], group, x.device)
    return _AllGatherWithGrad.apply(x, group, sizes), sizes


def all_gather_with_grad(x: Tensor, group: Any = None) -> Tensor:
    """Gather ``x`` from every rank of ``group`` along dim 0, differentiably; unequal sizes allowed.

    Args:
        x: ``[b_r, *rest]`` on rank ``r``; ``rest`` must be equal on all ranks, ``b_r >= 0`` may differ.
        group: process group (default: the world).
    Returns:
        ``[sum_r b_r, *rest]``, the rank-ordered concatenation. Backward returns to rank ``r`` the slice
        ``o_r : o_r + b_r`` of the all-reduce-**sum** of the incoming gradients (see the module docstring).
        Identity when no process group is initialised or the group has one rank.
    """
    return all_gather_with_sizes(x, group)[0]
