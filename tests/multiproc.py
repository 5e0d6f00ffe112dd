"""Run a function on N ranks (spawned processes on localhost; gloo, or NCCL on GPUs) and collect the results.

Usage (the function must be importable by module path, i.e. defined at module level)::

    from multiproc import run_on_ranks

    def work(rank: int, world_size: int, scale: float) -> dict:
        ...  # torch.distributed is initialised (gloo); return something picklable

    results = run_on_ranks(work, 2, 3.0)  # [result_of_rank_0, result_of_rank_1]
    results = run_on_ranks(work, 2, 3.0, backend="nccl")  # rank r on cuda:r (needs 2 GPUs)

Each rank runs with ``torch.set_num_threads(1)``; results travel through ``torch.save`` files in a
temporary directory (tensors are fine). An exception on any rank is re-raised in the parent with the
rank's traceback.

:data:`DEVICES` parametrizes a test over ``cpu`` and ``cuda`` (skipped without a GPU); :data:`needs_two_gpus`
skips an NCCL test on fewer than 2 GPUs; :func:`to_cpu` moves a rank's result off its device.

:func:`counted_collectives` counts the ``torch.distributed`` collectives a block calls (e.g. to check that a step
exchanges sizes once).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_unlearn.distributed.env import import_deepspeed_muon_uncompiled, skip_deepspeed_shm_op

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none available)")
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"NCCL needs one CUDA device per rank: 2 ranks need 2 GPUs, found {torch.cuda.device_count()}",
)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
"""``@pytest.mark.parametrize("device", DEVICES)``: the test on the CPU and, where a GPU is present, on CUDA."""


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return value


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple, backend: str
) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        skip_deepspeed_shm_op()  # as the product's workers do: no JIT build of an op training never uses
        import_deepspeed_muon_uncompiled({})  # and no TorchInductor load for the Muon kernels (engines built here)
        if backend == "nccl":
            torch.cuda.set_device(rank)  # NCCL needs one device per rank; the current one is the rank's
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report every failure to the parent, then fail this process
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, backend: str = "gloo"
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results by rank.

    Args:
        fn: module-level function; ``torch.distributed`` is initialised when it runs.
        world_size: number of ranks (processes).
        args: extra picklable arguments passed to every rank.
        timeout: seconds to wait for all ranks before failing.
        backend: ``"gloo"`` (CPU), or ``"nccl"``: rank ``r`` runs with ``torch.cuda.set_device(r)``, so it needs
            ``world_size`` CUDA devices; ``fn`` puts its tensors on ``cuda:r`` and returns them on the CPU.
    Returns:
        ``[fn(0, ...), ..., fn(world_size - 1, ...)]``.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), out_dir, args, backend),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout} s")
        except Exception as exc:
            errors = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"rank{rank}.pt")
                if os.path.exists(path):
                    record = torch.load(path, weights_only=False)
                    if not record["ok"]:
                        errors.append(f"--- rank {rank} ---\n{record['error']}")
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise RuntimeError("\n".join(errors) or str(exc)) from exc
        results = []
        for rank in range(world_size):
            record = torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
            if not record["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{record['error']}")
            results.append(record["result"])
        return results


COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
)
"""``torch.distributed`` functions that :func:`counted_collectives` counts (those that exist in this torch)."""


def _tensors(values: Any) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from _tensors(value)


@contextlib.contextmanager
def counted_collectives() -> Iterator[Counter]:
    """Count the calls of ``torch.distributed``'s collectives (:data:`COLLECTIVES`) made within the block.

    Yields a ``Counter`` filled as the block runs: one count per outermost call by function name (a deprecated
    name that forwards to its successor counts once), plus ``"size_exchange"`` for every all-gather or all-reduce
    of integer tensors (the per-rank size and chunk-count exchanges; data and losses are floating point).
    """
    counts: Counter = Counter()
    depth = [0]
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0:
                counts[name] += 1
                tensors = list(_tensors([*args, *kwargs.values()]))
                if name.startswith(("all_gather", "all_reduce")) and tensors and not tensors[0].is_floating_point():
                    counts["size_exchange"] += 1
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def assert_nested_close(a: Any, b: Any, path: str = "result") -> None:
    """``a`` and ``b`` (nested dicts and lists of what ranks return) are equal, floats within 1e-5 relative
    (1e-6 absolute); ``path`` names the first difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_nested_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
