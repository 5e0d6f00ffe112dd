#!/usr/bin/env python
"""Entry script for your own launch scripts: ``torchrun``, the ``deepspeed`` launcher, or ``srun``
with one task per GPU. Every process runs ``dist-unlearn run CONFIG [key=value ...] ray.enabled=false``
as one rank of the job (no Ray)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        launchers/torchrun_entry.py CONFIG [key=value ...]
    deepspeed --hostfile hosts launchers/torchrun_entry.py CONFIG [key=value ...]
    srun --ntasks-per-node 8 python launchers/torchrun_entry.py CONFIG [key=value ...]

The ``deepspeed`` launcher appends ``--local_rank=N``: it becomes ``LOCAL_RANK``. Under ``srun``
alone (no ``RANK`` in the environment) the rank, world size and local rank come from
``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``, and the rendezvous is the first node of
``SLURM_JOB_NODELIST`` on port ``MASTER_PORT`` (default 29500 + job id % 10000).

Exit codes are those of ``dist-unlearn run``: 0 done, 2 invalid config, 75 stopped on request after
a checkpoint (run the same command again to resume).
"""

from __future__ import annotations

import os
import re
import sys


def split_launcher_args(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove ``--local_rank=N`` / ``--local-rank N`` (added by launchers); returns (rest, local rank)."""
    rest: list[str] = []
    local_rank = None
    items = iter(argv)
    for item in items:
        name, sep, value = item.partition("=")
        if name in ("--local_rank", "--local-rank"):
            local_rank = value if sep else next(items, None)
            continue
        rest.append(item)
    return rest, local_rank


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``gpu[07-08,12],cpu1`` -> ``gpu07``."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])


def slurm_rank_environment(env: dict[str, str]) -> dict[str, str]:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` from Slurm's task variables."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR", first_host(env["SLURM_JOB_NODELIST"])),
        "MASTER_PORT": env.get("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000)),
    }


def main(argv: list[str]) -> int:
    args, local_rank = split_launcher_args(argv)
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    os.environ.update(slurm_rank_environment(dict(os.environ)))
    from dist_unlearn.cli import main as cli_main

    return cli_main(["run", *args, "ray.enabled=false"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
