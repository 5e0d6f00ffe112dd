"""Per-rank batch sampling that is reproducible and independent of the number of workers.

Each data stream (forget, retain, ...) is an endless sequence of epochs; epoch ``e`` is a permutation
of the dataset drawn from a seed derived from ``(seed, stream name, e)``. Step ``s`` consumes the
global positions ``[s·G, (s+1)·G)`` of that sequence (``G`` the global batch) and rank ``r`` of ``W``
takes the contiguous slice ``[r·G/W, (r+1)·G/W)`` of it. Hence:

* ranks draw *different* examples at every step (no rank repeats another's retain batch);
* the union over ranks at step ``s`` is the same global batch for any ``W`` dividing ``G``, so a run
  on 1 or 2 workers sees the same data and follows the same loss curve;
* a run resumed at step ``s`` draws exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import torch

from dist_unlearn.distributed.seeding import derive_seed


class StepSampler:
    """Indices of one stream for one rank, addressable by step (see module docstring).

    Args:
        dataset_size: number of examples ``N`` in the stream (≥ 1).
        global_batch_size: ``G``, examples per step summed over ranks; must divide by ``world_size``.
        rank, world_size: this process's place.
        seed: run seed; ``stream`` names the stream so forget/retain get unrelated permutations.
    """

    def __init__(
        self, dataset_size: int, global_batch_size: int, rank: int, world_size: int, seed: int, stream: str
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"stream '{stream}' is empty: it needs at least one example")
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} does not divide over {world_size} workers")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.stream = stream
        self._epochs: dict[int, torch.Tensor] = {}

    def _epoch(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.stream, epoch))
            self._epochs = {epoch: torch.randperm(self.dataset_size, generator=gen)}
        return self._epochs[epoch]

    def global_indices(self, step: int) -> list[int]:
        """The ``G`` dataset indices of the global batch at ``step`` (all ranks together)."""
        start = step * self.global_batch_size
        out: list[int] = []
        for pos in range(start, start + self.global_batch_size):
            epoch, offset = divmod(pos, self.dataset_size)
            out.append(int(self._epoch(epoch)[offset]))
        return out

    def indices(self, step: int) -> list[int]:
        """This rank's ``G/W`` indices at ``step``."""
        if self.local_batch_size == 0:
            return []
        lo = self.rank * self.local_batch_size
        return self.global_indices(step)[lo : lo + self.local_batch_size]
