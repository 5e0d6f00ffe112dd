"""All-gather along dim 0 with autograd support and unequal per-rank sizes.

Forward
    Rank ``r`` holds ``x_r`` of shape ``[b_r, *rest]`` (``rest`` equal on all ranks, ``b_r`` may differ and
    may be 0). The sizes ``[b_0, ..., b_{W-1}]`` are exchanged first (unless already known, see below), every
    ``x_r`` is zero-padded to ``m = max_r b_r`` rows, all-gathered into one ``[W * m, *rest]`` buffer and
    stripped again, so every rank gets ``X = cat([x_0, ..., x_{W-1}])`` of shape ``[sum_r b_r, *rest]`` in rank
    order. Rank ``r``'s rows sit at ``X[o_r : o_r + b_r]`` with ``o_r = sum_{s<r} b_s``.

Backward (gradient convention)
    Let rank ``s`` compute a loss ``L_s`` from its copy of ``X``, and let the objective be the **sum**
    ``L = sum_s L_s``. The incoming gradient on rank ``s`` is ``G_s = dL_s/dX``. Rank ``r`` receives

        dL/dx_r = ( sum_s G_s )[o_r : o_r + b_r]

    the exact gradient of ``L`` with respect to ``x_r``: every copy of ``x_r`` (one per rank) contributes. It is
    computed as a **reduce-scatter**: each rank lays its ``G_s`` out as ``W`` blocks of ``m`` rows (block ``r``
    holds rows ``o_r : o_r + b_r``, zero-padded), the blocks are summed across ranks and rank ``r`` keeps block
    ``r``, then its first ``b_r`` rows. Each rank receives ``m`` rows instead of the whole ``sum_s G_s`` that an
    all-reduce followed by slicing would give it (half the traffic of a ring all-reduce for equal sizes; NCCL
    runs it as one ring reduce-scatter). Gloo supports the same call (torch >= 2.3); it runs it as an all-reduce
    of the padded buffer followed by a slice, so on CPU the two cost the same.
    If instead the objective is the rank **average** ``(1/W) sum_s L_s`` (what DDP and DeepSpeed produce when
    they average parameter gradients after each rank's ``backward``), the averaged parameter gradient is the
    gradient of that average; the losses in :mod:`dist_unlearn.contrastive` scale their per-rank value so
    that this average equals the single-process loss.

    Every rank must run backward through each gather exactly once and in the same order (the backward is a
    collective). With no initialised process group, or a group of one rank, the function is the identity.

Known sizes
    A caller that already exchanged the per-rank row counts (GradCache does, once per step, for every input)
    declares them with :func:`known_row_counts`; inside that block a gather of a declared tensor, or of one
    derived from it by :func:`same_row_counts` (normalised, sliced along the features), skips the size exchange.
    The look-up is by tensor identity, so every rank takes the same branch as long as every rank runs the
    same code.

See also CLIP's "local loss + gather with grad" (Radford et al. 2021; Cherti et al. 2023, OpenCLIP).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_with_grad",
    "all_gather_with_sizes",
    "gather_sizes",
    "group_rank",
    "group_world_size",
    "known_row_counts",
    "row_counts",
    "same_row_counts",
]


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


def _all_gather_into(output: Tensor, tensor: Tensor, group: Any = None) -> None:
    """``output [W * n, ...]`` <- every rank's ``tensor [n, ...]`` in rank order (one collective)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(output, tensor, group=group)


def _reduce_scatter(output: Tensor, tensor: Tensor, group: Any = None) -> None:
    """``output [n, ...]`` <- block ``rank`` of the sum over ranks of ``tensor [W * n, ...]`` (one collective)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13
    scatter(output, tensor, op=dist.ReduceOp.SUM, group=group)


def gather_sizes(n: int | Sequence[int], group: Any = None, device: torch.device | str | None = None) -> list[Any]:
    """All-gather one integer (or one fixed-length list of integers) per rank, in one collective.

    Args:
        n: this rank's value (typically its local batch size ``b_r``), or a list of ``k`` values (the same
            ``k`` on every rank).
        group: process group (default: the world).
        device: device of the exchanged tensor; default CUDA under NCCL, else CPU.
    Returns:
        ``[b_0, ..., b_{W-1}]`` in rank order (for a list: ``[[n_0...], ..., [n_{W-1}...]]``); ``[n]`` without a
        process group or with one rank.
    """
    many = not isinstance(n, int)
    values = [int(v) for v in n] if many else [int(n)]  # type: ignore[union-attr]
    if not _active(group):
        return [values] if many else values
    dev = torch.device(device) if device is not None else _comm_device(group)
    mine = torch.tensor(values, dtype=torch.long, device=dev)
    out = mine.new_empty(dist.get_world_size(group) * len(values))
    _all_gather_into(out, mine, group)
    rows = out.reshape(-1, len(values)).tolist()
    return [[int(v) for v in row] for row in rows] if many else [int(row[0]) for row in rows]


# --- per-rank row counts known in advance ---------------------------------------------------------

_KNOWN: contextvars.ContextVar[dict[int, tuple[weakref.ref, Any, list[int]]] | None] = contextvars.ContextVar(
    "dist_unlearn_known_row_counts", default=None
)
"""id(tensor) -> (weak reference to it, its process group, its per-rank row counts), inside :func:`known_row_counts`."""


def _same_group(a: Any, b: Any) -> bool:
    world = dist.group.WORLD
    return (a if a is not None else world) is (b if b is not None else world)


@contextlib.contextmanager
def known_row_counts(pairs: Iterable[tuple[Tensor, Sequence[int]]], group: Any = None) -> Iterator[None]:
    """Declare the per-rank row counts of some tensors, so that gathering them needs no size exchange.

    Args:
        pairs: ``(x, [b_0, ..., b_{W-1}])`` with ``x`` ``[b_rank, ...]`` this rank's tensor and the row counts of
            its counterparts on every rank of ``group`` (e.g. from one :func:`gather_sizes` of all of them).
        group: the process group those counts belong to (default: the world).
    Raises:
        ValueError: a count list does not have one entry per rank, or disagrees with ``x.shape[0]``.

    Inside the block, :func:`row_counts` returns the declared counts of these very tensor objects (and of
    tensors registered with :func:`same_row_counts`), and :func:`all_gather_with_sizes` uses them.
    """
    table = dict(_KNOWN.get() or {})
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        for x, counts in pairs:
            counts = [int(c) for c in counts]
            if len(counts) != world or counts[rank] != x.shape[0]:
                raise ValueError(
                    f"known_row_counts: counts {counts} do not fit a tensor of {x.shape[0]} rows on rank {rank} "
                    f"of {world}"
                )
            table[id(x)] = (weakref.ref(x), group, counts)
    token = _KNOWN.set(table)
    try:
        yield
    finally:
        _KNOWN.reset(token)


def row_counts(x: Tensor, group: Any = None) -> list[int] | None:
    """The per-rank row counts of ``x`` declared by an enclosing :func:`known_row_counts` for ``group``, else None."""
    entry = (_KNOWN.get() or {}).get(id(x))
    if entry is None or entry[0]() is not x or not _same_group(entry[1], group):
        return None
    return list(entry[2])


def same_row_counts(derived: Tensor, source: Tensor) -> Tensor:
    """Register ``derived`` as having the per-rank row counts of ``source`` (if those are known); returns ``derived``.

    For a tensor computed row by row from ``source`` (normalised, a slice of its features): on every rank it has
    as many rows as ``source``. A no-op outside :func:`known_row_counts` or when the row counts differ here.
    """
    table = _KNOWN.get()
    entry = table.get(id(source)) if table is not None else None
    if entry is not None and entry[0]() is source and derived.shape[0] == source.shape[0]:
        table[id(derived)] = (weakref.ref(derived), entry[1], entry[2])  # type: ignore[index]
    return derived


# --- the differentiable gather ----------------------------------------------------------------------


class _AllGatherWithGrad(torch.autograd.Function):
    """``[b_r, ...]`` on each rank -> ``[sum_r b_r, ...]``; backward: reduce-scatter of the padded blocks."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, sizes: list[int]) -> Tensor:
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.sizes = sizes
        ctx.rank = rank
        longest = max(sizes)
        if longest == 0:
            return x.new_empty((0, *x.shape[1:]))
        padded = x.contiguous()
        if x.shape[0] < longest:
            padded = torch.cat([padded, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
        out = padded.new_empty((len(sizes) * longest, *x.shape[1:]))
        _all_gather_into(out, padded, group)
        if all(size == longest for size in sizes):
            return out
        blocks = out.view(len(sizes), longest, *x.shape[1:])
        return torch.cat([block[:size] for block, size in zip(blocks, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        sizes, rank = ctx.sizes, ctx.rank
        longest = max(sizes)
        rest = grad.shape[1:]
        if longest == 0:
            return grad.new_zeros((0, *rest)), None, None
        if all(size == longest for size in sizes):
            blocks = grad.contiguous()
        else:
            blocks = grad.new_zeros((len(sizes) * longest, *rest))
            start = 0
            for r, size in enumerate(sizes):
                blocks[r * longest : r * longest + size] = grad[start : start + size]
                start += size
        mine = grad.new_empty((longest, *rest))
        _reduce_scatter(mine, blocks, ctx.group)
        return mine[: sizes[rank]], None, None


def all_gather_with_sizes(x: Tensor, group: Any = None, sizes: Sequence[int] | None = None) -> tuple[Tensor, list[int]]:
    """Like :func:`all_gather_with_grad`, also returning the per-rank sizes ``[b_0, ..., b_{W-1}]``.

    Args:
        x: ``[b_r, *rest]`` on rank ``r``.
        group: process group (default: the world).
        sizes: the per-rank row counts if the caller knows them (every rank must then pass them); default: those
            declared for ``x`` by :func:`known_row_counts`, else exchanged here (one small all-gather).
    Returns:
        ``(gathered [sum_r b_r, *rest], sizes)``. The offset of this rank's rows in the result is
        ``sum(sizes[:group_rank(group)])``.
    """
    if x.dim() == 0:
        raise ValueError("all_gather_with_grad needs a tensor with at least one dimension (gathered along dim 0)")
    if not _active(group):
        return x, [x.shape[0]]
    if sizes is None:
        sizes = row_counts(x, group)
    if sizes is None:
        sizes = gather_sizes(x.shape[0], group, x.device)
    else:
        sizes = [int(s) for s in sizes]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if len(sizes) != world or sizes[rank] != x.shape[0]:
            raise ValueError(f"sizes {sizes} do not fit a tensor of {x.shape[0]} rows on rank {rank} of {world}")
    return _AllGatherWithGrad.apply(x, group, sizes), sizes


def all_gather_with_grad(x: Tensor, group: Any = None) -> Tensor:
    """Gather ``x`` from every rank of ``group`` along dim 0, differentiably; unequal sizes allowed.

    Args:
        x: ``[b_r, *rest]`` on rank ``r``; ``rest`` must be equal on all ranks, ``b_r >= 0`` may differ.
        group: process group (default: the world).
    Returns:
        ``[sum_r b_r, *rest]``, the rank-ordered concatenation. Backward returns to rank ``r`` the slice
        ``o_r : o_r + b_r`` of the **sum** over ranks of the incoming gradients, by a reduce-scatter (see the
        module docstring). Identity when no process group is initialised or the group has one rank.
    """
    return all_gather_with_sizes(x, group)[0]
