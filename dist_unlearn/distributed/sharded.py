"""Score a dataset sharded over ranks and gather the per-example results in dataset order.

Rank ``r`` of ``W`` scores the examples ``r, r+W, r+2W, ...``. Every rank runs the same number of
batches (the last ones padded by repeating an index and dropping it afterwards), because under
ZeRO-3 each forward gathers parameters collectively and all ranks must take part. The gathered
result equals what one process scoring the whole dataset returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from dist_unlearn.distributed.env import get_rank, get_world_size


def sharded_map(
    num_examples: int,
    batch_size: int,
    score_batch: Callable[[Sequence[int]], torch.Tensor],
    device: torch.device | str = "cpu",
    collective: bool = True,
) -> torch.Tensor:
    """Apply ``score_batch`` to this rank's share of ``range(num_examples)`` and all-gather.

    Args:
        num_examples: dataset size ``N``.
        batch_size: examples per call on each rank.
        score_batch: maps a list of ``k`` dataset indices to a float tensor ``[k, m]`` (no grad).
        device: where the collective runs (``cuda`` with NCCL, ``cpu`` with gloo).
        collective: ``False`` scores everything in this process, even inside a process group (work
            that one rank does alone while the others wait, e.g. preparing the embedded models).
    Returns:
        ``[N, m]`` float tensor on CPU, row ``i`` the score of example ``i``.
    """
    rank, world = (get_rank(), get_world_size()) if collective else (0, 1)
    mine = list(range(rank, num_examples, world))
    per_rank = -(-num_examples // world)  # ceil
    num_batches = -(-per_rank // batch_size) if per_rank else 0
    padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    rows: list[torch.Tensor] = []
    for b in range(num_batches):
        rows.append(score_batch(padded[b * batch_size : (b + 1) * batch_size]).detach().float())
    local = torch.cat(rows) if rows else torch.zeros(0, 1)
    if world == 1:
        return local[:num_examples].cpu()
    local = local.to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    out = torch.empty(num_examples, local.size(1))
    for r, part in enumerate(gathered):
        count = len(range(r, num_examples, world))
        out[r::world] = part[:count].cpu()
    return out
