"""all_gather_with_grad on spawned gloo ranks vs a single-process reference (unequal per-rank sizes)."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_on_ranks

from dist_unlearn.distributed.gather import all_gather_with_grad, all_gather_with_sizes, gather_sizes

FEATURES = (2, 3)


def _global_input(sizes: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(sizes), *FEATURES, generator=gen, dtype=torch.float64)


def _rank_objective(gathered: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """A nonlinear, rank-specific scalar f_r(X) of the whole gathered tensor."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    weights = torch.randn(gathered.shape, generator=gen, dtype=gathered.dtype)
    return (weights * gathered).pow(2).sum() + (rank + 1.0) * torch.sin(gathered * weights).sum()


def _work(rank: int, world_size: int, cases: list[tuple[int, ...]]) -> dict:
    import torch.distributed as dist

    out: dict = {"cases": []}
    for seed, sizes in enumerate(cases):
        full = _global_input(sizes, seed)
        start = sum(sizes[:rank])
        x = full[start : start + sizes[rank]].clone().requires_grad_(True)
        gathered, got_sizes = all_gather_with_sizes(x)
        _rank_objective(gathered, rank, seed).backward()
        out["cases"].append({"gathered": gathered.detach(), "grad": x.grad.clone(), "sizes": got_sizes})
    out["gather_sizes"] = gather_sizes(10 * rank + 7)
    # Groups of one rank: the gather is the identity and so is its gradient.
    singles = [dist.new_group([r]) for r in range(world_size)]
    x = torch.arange(6.0, dtype=torch.float64).reshape(3, 2).add(rank).requires_grad_(True)
    y = all_gather_with_grad(x, group=singles[rank])
    (y * 3.0).sum().backward()
    out["single"] = (torch.equal(y.detach(), x.detach()), x.grad.clone())
    return out


def _check(world_size: int, cases: list[tuple[int, ...]]) -> None:
    results = run_on_ranks(_work, world_size, cases)
    for seed, sizes in enumerate(cases):
        full = _global_input(sizes, seed).requires_grad_(True)
        total = sum(_rank_objective(full, r, seed) for r in range(world_size))
        (ref_grad,) = torch.autograd.grad(total, full)
        for rank, res in enumerate(results):
            case = res["cases"][seed]
            assert case["sizes"] == list(sizes)
            torch.testing.assert_close(case["gathered"], full.detach(), rtol=0, atol=0)
            start = sum(sizes[:rank])
            expected = ref_grad[start : start + sizes[rank]]
            assert case["grad"].shape == expected.shape
            torch.testing.assert_close(case["grad"], expected, rtol=1e-12, atol=1e-12)
    for res in results:
        assert res["gather_sizes"] == [10 * r + 7 for r in range(world_size)]
        same, grad = res["single"]
        assert same
        torch.testing.assert_close(grad, torch.full((3, 2), 3.0, dtype=torch.float64))


def test_two_ranks_unequal_and_empty():
    _check(2, [(3, 1), (0, 2), (2, 2)])


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
