"""Process-group helpers that work the same under Ray Train, torchrun, the deepspeed launcher or one process.

Ray Train and torchrun both export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; Ray also creates the process group itself. :func:`init_distributed` therefore only
creates a group when none exists, and in a plain single process it creates a one-rank gloo group on
loopback so that DeepSpeed and the collectives below behave identically everywhere.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_backend() -> str:
    """``nccl`` when CUDA devices are visible, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory communication op in this process.

    On a CPU, DeepSpeed's communication backend compiles a C++ extension (``deepspeed_shm_comm``) the
    first time a process group is set up, and loads it in every process afterwards. The op only serves
    DeepSpeed-Inference's ``inference_all_reduce``, which training never calls (it falls back to
    ``torch.distributed.all_reduce``); building it costs about a minute of CPU on first use, prints a
    line per process, and a build killed half-way leaves a lock file on which every later process waits.
    DeepSpeed keeps its op-compatibility table as one module-level dict meant to be edited, so marking
    the op incompatible there is enough. No effect when DeepSpeed is not installed or already set up.
    """
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# DeepSpeed's ZeRO and bf16 optimizers import this module in their constructors only to check whether the
# optimizer is Muon; its kernels are decorated with ``torch.compile`` at import
_DEEPSPEED_MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_deepspeed_muon_uncompiled(ds_config: Mapping[str, Any]) -> None:
    """Import DeepSpeed's Muon module with TorchDynamo off, unless ``ds_config`` selects a Muon optimizer.

    DeepSpeed's ZeRO-1/2/3 and bf16 optimizers import ``deepspeed.runtime.zero.muon`` when they are built,
    to test ``isinstance(optimizer, MuonWithAuxAdam)``. That module decorates its Newton-Schulz kernels with
    ``torch.compile``, and the first ``torch.compile`` of a process loads TorchInductor: seconds of CPU in
    every process that builds an engine, for kernels only a Muon optimizer calls. With
    ``TORCHDYNAMO_DISABLE=1`` set during the import, ``torch.compile`` returns the kernels unchanged (the
    variable is read when decorating; it is restored afterwards, so later ``torch.compile`` calls of the
    process behave as usual). When the config's optimizer is Muon the module is left to DeepSpeed, compiled.
    No effect when the module is already imported or DeepSpeed is not installed.
    """
    optimizer = str((ds_config.get("optimizer") or {}).get("type", ""))
    if _DEEPSPEED_MUON_MODULE in sys.modules or "muon" in optimizer.lower():
        return
    previous = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        importlib.import_module(_DEEPSPEED_MUON_MODULE)
    except ImportError:
        pass
    finally:
        if previous is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = previous


def initialize_deepspeed(model: torch.nn.Module, ds_config: dict[str, Any], **kwargs: Any) -> Any:
    """``deepspeed.initialize(model=model, config=ds_config, dist_init_required=False, **kwargs)`` in a process
    group that already exists; returns the engine. Every engine of the package is built here (see
    :func:`import_deepspeed_muon_uncompiled` for what it saves)."""
    import deepspeed

    import_deepspeed_muon_uncompiled(ds_config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False, **kwargs)
    return engine


def init_distributed(backend: str | None = None) -> None:
    """Create the default process group unless one exists (DeepSpeed's CPU shm op is skipped, see
    :func:`skip_deepspeed_shm_op`).

    Reads ``RANK``/``WORLD_SIZE`` from the environment; without them this is a single process and a
    one-rank group on a free loopback port is created.
    """
    skip_deepspeed_shm_op()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(
            {
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
            }
        )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    _forget_deepspeed_world_group()


def _forget_deepspeed_world_group() -> None:
    """Drop DeepSpeed's cached clone of an earlier default group.

    DeepSpeed clones the default group once per process (``deepspeed.utils.groups._WORLD_GROUP``) and reuses
    the clone ever after. When that group has been destroyed (a run that ended with
    :func:`destroy_process_group`, then another run in the same process: a notebook, a script calling the
    runner twice), the next ``deepspeed.initialize`` fails with "Group ... is not registered". A newly
    created default group makes any earlier clone stale, so it is cleared here and DeepSpeed clones the new
    group on first use. Imports nothing: no effect before DeepSpeed is imported.
    """
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and getattr(groups, "_WORLD_GROUP", None) is not None:
        groups._WORLD_GROUP = None


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    """Tear the group down (avoids intermittent SIGABRT at interpreter exit with gloo)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average each value over all ranks (collective; every rank must pass the same keys). With more than
    one rank the result's keys are sorted (one float64 all-reduce of the values in key order)."""
    if get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))
