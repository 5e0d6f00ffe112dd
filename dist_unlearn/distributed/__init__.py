"""Rank/world helpers, process-group set-up and seeding. Never imports Ray."""

from dist_unlearn.distributed.env import (
    barrier,
    destroy_process_group,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from dist_unlearn.distributed.gather import all_gather_with_grad, all_gather_with_sizes, gather_sizes
from dist_unlearn.distributed.seeding import rank_seed, seed_everything

__all__ = [
    "all_gather_with_grad",
    "all_gather_with_sizes",
    "gather_sizes",
    "barrier",
    "destroy_process_group",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "rank_seed",
    "seed_everything",
]
