"""all_gather_with_grad on spawned gloo ranks vs a single-process reference (unequal per-rank sizes): the forward, the
reduce-scatter backward, and sizes declared in advance (no size exchange)."""

from __future__ import annotations

import pytest
import torch
from multiproc import counted_collectives, needs_two_gpus, run_on_ranks, to_cpu

from dist_unlearn.distributed.gather import (
    all_gather_with_grad,
    all_gather_with_sizes,
    gather_sizes,
    known_row_counts,
    row_counts,
    same_row_counts,
)

FEATURES = (2, 3)


def _global_input(sizes: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(sizes), *FEATURES, generator=gen, dtype=torch.float64)


def _rank_objective(gathered: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """A nonlinear, rank-specific scalar f_r(X) of the whole gathered tensor."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    weights = torch.randn(gathered.shape, generator=gen, dtype=gathered.dtype).to(gathered.device)
    return (weights * gathered).pow(2).sum() + (rank + 1.0) * torch.sin(gathered * weights).sum()


def _work(rank: int, world_size: int, cases: list[tuple[int, ...]], device: str = "cpu") -> dict:
    """Every check on this rank, its tensors on ``device`` (``cuda``: the rank's GPU under NCCL), returned on the
    CPU."""
    import torch.distributed as dist

    out: dict = {"cases": []}
    for seed, sizes in enumerate(cases):
        full = _global_input(sizes, seed).to(device)
        start = sum(sizes[:rank])
        results = {}
        # sizes exchanged by the gather; declared for the tensor; declared for its source (same_row_counts)
        for how in ("exchanged", "declared", "derived"):
            leaf = full[start : start + sizes[rank]].clone().requires_grad_(True)
            declared = [] if how == "exchanged" else [(leaf, sizes)]
            with counted_collectives() as counts, known_row_counts(declared):
                x = same_row_counts(leaf * 1.0, leaf) if how == "derived" else leaf
                gathered, got_sizes = all_gather_with_sizes(x)
                _rank_objective(gathered, rank, seed).backward()
            results[how] = {
                "gathered": gathered.detach(),
                "grad": leaf.grad.clone(),
                "sizes": got_sizes,
                "counts": dict(counts),
            }
        out["cases"].append(results)
    out["gather_sizes"] = gather_sizes(10 * rank + 7)
    out["gather_size_lists"] = gather_sizes([rank, 10 + rank, 20 + rank])
    x = torch.zeros(rank + 1, 2, device=device)
    out["outside"] = row_counts(x)  # None: nothing declared
    try:
        all_gather_with_sizes(x, sizes=[5, 5])
        out["bad_sizes"] = "accepted"
    except ValueError as exc:
        out["bad_sizes"] = str(exc)
    # Groups of one rank: the gather is the identity and so is its gradient.
    singles = [dist.new_group([r]) for r in range(world_size)]
    x = torch.arange(6.0, dtype=torch.float64, device=device).reshape(3, 2).add(rank).requires_grad_(True)
    y = all_gather_with_grad(x, group=singles[rank])
    (y * 3.0).sum().backward()
    out["single"] = (torch.equal(y.detach(), x.detach()), x.grad.clone())
    return to_cpu(out)


def _check(world_size: int, cases: list[tuple[int, ...]], backend: str = "gloo") -> None:
    """``cases`` on ``world_size`` ranks vs one process; ``backend="nccl"``: rank r's tensors on ``cuda:r``."""
    device = "cuda" if backend == "nccl" else "cpu"
    results = run_on_ranks(_work, world_size, cases, device, backend=backend)
    for seed, sizes in enumerate(cases):
        full = _global_input(sizes, seed).requires_grad_(True)
        total = sum(_rank_objective(full, r, seed) for r in range(world_size))
        (ref_grad,) = torch.autograd.grad(total, full)
        for rank, res in enumerate(results):
            for how, case in res["cases"][seed].items():
                assert case["sizes"] == list(sizes)
                torch.testing.assert_close(case["gathered"], full.detach(), rtol=0, atol=0)
                start = sum(sizes[:rank])
                expected = ref_grad[start : start + sizes[rank]]
                assert case["grad"].shape == expected.shape
                torch.testing.assert_close(case["grad"], expected, rtol=1e-12, atol=1e-12)
                # one gather of the data, its backward one reduce-scatter (no all-reduce); sizes exchanged
                # only when not declared
                counts = case["counts"]
                assert counts.get("size_exchange", 0) == (how == "exchanged"), (how, counts)
                data_gathers = sum(v for k, v in counts.items() if k.startswith("all_gather")) - (how == "exchanged")
                assert data_gathers == 1, (how, counts)
                assert sum(v for k, v in counts.items() if k.startswith("reduce_scatter")) == 1, (how, counts)
                assert "all_reduce" not in counts, (how, counts)
    for rank, res in enumerate(results):
        assert res["gather_sizes"] == [10 * r + 7 for r in range(world_size)]
        assert res["gather_size_lists"] == [[r, 10 + r, 20 + r] for r in range(world_size)]
        assert res["outside"] is None
        assert f"do not fit a tensor of {rank + 1} rows on rank {rank}" in res["bad_sizes"]
        same, grad = res["single"]
        assert same
        torch.testing.assert_close(grad, torch.full((3, 2), 3.0, dtype=torch.float64))


def test_two_ranks_unequal_and_empty():
    _check(2, [(3, 1), (0, 2), (2, 2)])


@needs_two_gpus
def test_cuda_nccl_two_ranks_unequal_and_empty():
    """The same checks over NCCL (float64 on the GPUs: exact to rounding, the same 1e-12)."""
    _check(2, [(3, 1), (0, 2), (2, 2)], backend="nccl")


def test_three_ranks_unequal():
    _check(3, [(3, 1, 2), (1, 0, 4)])


def test_identity_without_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    x = torch.randn(4, 3, requires_grad=True)
    y = all_gather_with_grad(x)
    assert y is x
    assert gather_sizes(5) == [5]
    with pytest.raises(ValueError, match="at least one dimension"):
        all_gather_with_grad(torch.tensor(1.0))
