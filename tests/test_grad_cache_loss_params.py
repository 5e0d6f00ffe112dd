"""GradCache exact for every parameter: the loss's own parameters, empty ranks, repeated steps (issue 16).

Each distributed case runs on 2 gloo ranks (uneven local batches) and is compared with an independent
reference: ONE process that encodes the whole global batch with grad, computes the loss from an explicit
formula written here (learnable ``1/tau`` = ``exp(log_inverse_temperature)``; SigLIP's ``exp(log_scale)``
and ``bias``), calls ``backward`` once and applies the SGD step by hand. After one step the model's weights
AND the loss's parameters (temperature; scale and bias) must agree within 1e-5 relative, on every rank.
Before the fix the ranks kept their own share of the loss parameters' gradient (measured on this set-up:
InfoNCE ``d/d log(1/tau)`` 0.2526 and -0.4120 on the two ranks vs -0.0797 in one process; SigLIP
``d/d log t`` 0.2038 and -1.8855 vs -0.8408); now both ranks hold the one-process value.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import test_grad_cache_fp16 as fp16
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import counted_collectives, needs_two_gpus, run_on_ranks, to_cpu
from torch import Tensor, nn

from dist_unlearn.contrastive import GradCache, InfoNCELoss, MatryoshkaLoss, SigmoidLoss

IN_DIM, HIDDEN, OUT_DIM = 8, 16, 8
HARD = 1  # hard negatives per query: docs are [b * (1 + HARD), d], per query [positive, negative]
CHUNK = 2
LR = 0.5
TEMPERATURE = 0.07
TOL = 1e-5


def dtype_of(setup: str) -> torch.dtype:
    """DDP runs in float64 (exact to rounding). DeepSpeed ZeRO keeps float32 master weights, so its cases run in
    float32 against the float64 reference (in float32 a one-process temperature gradient is already ~7e-6 off)."""
    return torch.float64 if setup == "ddp" else torch.float32


# --- data, model, losses and the independent one-process reference ------------------------------


def make_encoder(dtype: torch.dtype = torch.float64) -> nn.Module:
    """Initialised in float32, then cast: the same weights in either dtype."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT_DIM)).to(dtype)


def global_batch(rows: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Queries ``[rows, 8]`` and docs ``[rows * (1 + HARD), 8]`` (per query: a noisy copy, then a random one).

    Made in float32, then cast: the same values in either dtype."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(rows, IN_DIM, generator=gen)
    docs = torch.randn(rows, 1 + HARD, IN_DIM, generator=gen)
    docs[:, 0] = queries + 0.5 * docs[:, 0]
    return queries.to(dtype), docs.reshape(-1, IN_DIM).to(dtype)


def shard(
    sizes: tuple[int, ...], rank: int, seed: int = 1, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    queries, docs = global_batch(sum(sizes), seed, dtype)
    start, rows = sum(sizes[:rank]), sizes[rank]
    return queries[start : start + rows], docs[start * (1 + HARD) : (start + rows) * (1 + HARD)]


LOSSES = {
    "infonce": lambda: InfoNCELoss(TEMPERATURE, learnable_temperature=True),
    "siglip": lambda: SigmoidLoss(init_scale=10.0, init_bias=-10.0, learnable=True),
}


def reference_loss(name: str, q: Tensor, d: Tensor, params: dict[str, Tensor]) -> Tensor:
    """The loss on the whole global batch from its formula (mean over the B queries)."""
    k = d.shape[0] // q.shape[0]
    scores = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
    positives = torch.arange(q.shape[0]) * k
    if name == "infonce":
        return F.cross_entropy(scores * params["log_inverse_temperature"].exp(), positives)
    signs = -torch.ones_like(scores)
    signs[torch.arange(q.shape[0]), positives] = 1.0
    logits = scores * params["log_scale"].exp() + params["bias"]
    return -F.logsigmoid(signs * logits).sum(dim=1).mean()


def initial_loss_params(name: str) -> dict[str, Tensor]:
    return {n: p.detach().double().clone() for n, p in LOSSES[name]().named_parameters()}


def reference(name: str, batches: list[tuple[Tensor, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """One process: the summed gradients of the loss on each whole global batch, and the SGD step by hand."""
    model = make_encoder()
    params = {n: p.clone().requires_grad_() for n, p in initial_loss_params(name).items()}
    for queries, docs in batches:
        reference_loss(name, model(queries), model(docs), params).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss_grads = {n: p.grad.clone() for n, p in params.items()}
    weights = {n: (p - LR * p.grad).detach() for n, p in model.named_parameters()}
    loss_params = {n: (p - LR * p.grad).detach() for n, p in params.items()}
    return {"grads": grads, "loss_grads": loss_grads, "weights": weights, "loss_params": loss_params}


def rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """max |got - want| / max |want| over every tensor (same names required)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    scale = max(w.abs().max().item() for w in want.values())
    return max((got[n].double() - want[n].double()).abs().max().item() for n in want) / scale


# --- the distributed cases (run in spawned gloo ranks) --------------------------------------------


def ds_config(stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # this DeepSpeed clips at 1.0 unless told otherwise
    }


def wrap(setup: str, model: nn.Module) -> tuple[Any, Any]:
    """``(wrapped model, its optimizer)``: DDP + torch SGD, or a DeepSpeed engine around torch SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    if setup == "ddp":
        return nn.parallel.DistributedDataParallel(model), optimizer
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(int(setup.removeprefix("zero"))), dist_init_required=False
    )
    return engine, engine


def full_weights(wrapped: Any) -> dict[str, Tensor]:
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return {n: p.detach().clone() for n, p in wrapped.module.named_parameters()}
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().double() for n, p in wrapped.module.named_parameters()}


def full_grads(wrapped: Any) -> dict[str, Tensor]:
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return {n: p.grad.detach().clone() for n, p in wrapped.module.named_parameters()}
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).detach().double() for n, p in wrapped.module.named_parameters()}


def one_step(rank: int, setup: str, name: str, sizes: tuple[int, ...], device: str = "cpu") -> dict[str, Any]:
    """GradCache.step on this rank's shard, then the optimizer steps (model and loss) and the clamp. ``device``:
    where the model, loss and shard live (``cuda``: the rank's current GPU under NCCL); tensors come back there."""
    dtype = dtype_of(setup)
    wrapped, optimizer = wrap(setup, make_encoder(dtype).to(device))
    loss_fn = LOSSES[name]().to(dtype).to(device)
    loss_optimizer = torch.optim.SGD(loss_fn.parameters(), lr=LR)
    cache = GradCache(wrapped, CHUNK, loss_fn, check_replay=True)
    cache.step(*(x.to(device) for x in shard(sizes, rank, dtype=dtype)))
    out = {
        "grads": full_grads(wrapped),
        "loss_grads": {n: p.grad.clone() for n, p in loss_fn.named_parameters()},
        "mode": cache.ds_accumulation or cache.kind,
    }
    optimizer.step()
    loss_optimizer.step()
    loss_fn.clamp_parameters_()
    out["weights"] = full_weights(wrapped)
    out["loss_params"] = {n: p.detach().clone() for n, p in loss_fn.named_parameters()}
    return out


def ddp_accumulates(rank: int, name: str, sizes: tuple[int, ...]) -> dict[str, Any]:
    """Two GradCache.step calls (two different global batches) before one optimizer step, under DDP."""
    wrapped, _ = wrap("ddp", make_encoder())
    loss_fn = LOSSES[name]().double()
    cache = GradCache(wrapped, CHUNK, loss_fn)
    cache.step(*shard(sizes, rank, seed=1))
    cache.step(*shard(sizes, rank, seed=2))
    return {"grads": full_grads(wrapped), "loss_grads": {n: p.grad.clone() for n, p in loss_fn.named_parameters()}}


def repeated_step_refusal(rank: int, stage: int) -> str:
    """The error for a second GradCache.step before engine.step() (a second GradCache on the same engine too)."""
    engine, _ = wrap(f"zero{stage}", make_encoder(torch.float32))
    batch = shard((3, 2), rank, dtype=torch.float32)
    GradCache(engine, CHUNK, InfoNCELoss(TEMPERATURE)).step(*batch)
    try:
        GradCache(engine, CHUNK, InfoNCELoss(TEMPERATURE)).step(*batch)
        message = "not refused"
    except RuntimeError as exc:
        message = str(exc)
    engine.step()
    GradCache(engine, CHUNK, InfoNCELoss(TEMPERATURE)).step(*batch)  # accepted again after engine.step()
    return message


UNEVEN, EMPTY = (5, 3), (0, 4)
STEP_CASES: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "ddp-infonce": ("ddp", "infonce", UNEVEN),
    "ddp-siglip": ("ddp", "siglip", UNEVEN),
    "zero2-infonce": ("zero2", "infonce", UNEVEN),
    "zero2-siglip": ("zero2", "siglip", UNEVEN),
    "zero3-infonce": ("zero3", "infonce", UNEVEN),
    "zero3-siglip": ("zero3", "siglip", UNEVEN),
    "ddp-empty-rank": ("ddp", "infonce", EMPTY),
    "zero2-empty-rank": ("zero2", "siglip", EMPTY),
    "zero3-empty-rank": ("zero3", "infonce", EMPTY),
}
REFUSAL_STAGES = (1, 2, 3)


def loss_inside_the_model(rank: int, world: int) -> str:
    """The error for a loss module whose parameters are also inside the DDP-wrapped model."""
    loss_fn = InfoNCELoss(TEMPERATURE, learnable_temperature=True)
    holder = nn.ModuleDict({"encoder": make_encoder(), "loss": loss_fn})
    ddp = nn.parallel.DistributedDataParallel(holder)
    try:
        GradCache(ddp, CHUNK, loss_fn, encode=lambda m, x: m.module["encoder"](x))
    except ValueError as exc:
        return str(exc)
    return "not refused"


def loss_in_a_function(rank: int) -> dict[str, Any]:
    """A learnable loss called from a plain function: refused unless its parameters are listed, then exact."""
    wrapped, _ = wrap("ddp", make_encoder())
    loss_module = LOSSES["siglip"]().double()

    def loss_fn(q: Tensor, d: Tensor) -> Tensor:
        return loss_module(q, d)

    batch = shard(UNEVEN, rank)
    try:
        GradCache(wrapped, CHUNK, loss_fn).step(*batch)
        message = "not refused"
    except ValueError as exc:
        message = str(exc)
    wrapped.zero_grad(set_to_none=True)
    GradCache(wrapped, CHUNK, loss_fn, loss_parameters=loss_module.parameters()).step(*batch)
    return {"message": message, "loss_grads": {n: p.grad.clone() for n, p in loss_module.named_parameters()}}


JOB_TAU_LR = 0.05  # the contrastive job's contrastive.temperature_lr in these cases
JOB_SEEDS = (1, 2)  # two steps: AdamW's second update depends on the gradients' sizes, not only their signs


def job_temperature(rank: int, sizes: tuple[int, ...], cached: bool) -> list[float]:
    """The contrastive job's learnable temperature on a ZeRO-2 engine: per step GradCache (``chunk_size > 0``) or
    the job's plain backward (``chunk_size = 0``), ``engine.step()``, then the job's AdamW stepper and clamp.
    Returns ``log(1/τ)`` after each step."""
    from dist_unlearn.config.schema import ContrastiveConfig
    from dist_unlearn.contrastive.loss_params import (
        LossParameterStepper,
        backward_without_cache,
        build_contrastive_loss,
    )

    engine, _ = wrap("zero2", make_encoder(torch.float32))
    loss_fn = build_contrastive_loss(ContrastiveConfig(temperature=TEMPERATURE, learn_temperature=True))
    stepper = LossParameterStepper(loss_fn, JOB_TAU_LR)
    cache = GradCache(engine, CHUNK, loss_fn)
    values = []
    for seed in JOB_SEEDS:
        queries, docs = shard(sizes, rank, seed=seed, dtype=torch.float32)
        if cached:
            cache.step(queries, docs)
        else:
            backward_without_cache(engine, loss_fn(engine(queries), engine(docs)), stepper)
        engine.step()
        stepper.step()
        values.append(loss_fn.log_inverse_temperature.item())
    return values


def job_temperature_reference(sizes: tuple[int, ...]) -> list[float]:
    """One process, float64: the whole global batch, SGD on the model, the job's stepper on the temperature."""
    from dist_unlearn.config.schema import ContrastiveConfig
    from dist_unlearn.contrastive.loss_params import LossParameterStepper, build_contrastive_loss

    model = make_encoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = build_contrastive_loss(ContrastiveConfig(temperature=TEMPERATURE, learn_temperature=True)).double()
    stepper = LossParameterStepper(loss_fn, JOB_TAU_LR)
    values = []
    for seed in JOB_SEEDS:
        queries, docs = global_batch(sum(sizes), seed)
        loss_fn(model(queries), model(docs)).backward()
        optimizer.step()
        optimizer.zero_grad()
        stepper.step()
        values.append(loss_fn.log_inverse_temperature.item())
    return values


COUNTED_DIMS = (4, 8)
"""Matryoshka prefixes of the counted step: each gathers the docs and (symmetric) the queries, so 4 gathers."""


def collectives_of_one_step(rank: int) -> dict[str, int]:
    """The ``torch.distributed`` calls of one GradCache step under DDP (uneven ranks): a symmetric InfoNCE with a
    learnable temperature inside a 2-prefix Matryoshka loss, i.e. 4 differentiable gathers. DDP's own gradient
    all-reduce runs in its C++ reducer and is not counted."""
    wrapped, _ = wrap("ddp", make_encoder())
    base = InfoNCELoss(TEMPERATURE, learnable_temperature=True, symmetric=True).double()
    loss_fn = MatryoshkaLoss(base, dims=COUNTED_DIMS)
    cache = GradCache(wrapped, CHUNK, loss_fn)
    batch = shard(UNEVEN, rank)
    with counted_collectives() as counts:
        cache.step(*batch)
    return dict(counts)


def all_cases(rank: int, world: int) -> dict[str, Any]:
    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(world)})  # for DeepSpeed
    out: dict[str, Any] = {}
    for case, (setup, name, sizes) in STEP_CASES.items():
        out[case] = one_step(rank, setup, name, sizes)
        dist.barrier()
    out["ddp-accumulate"] = ddp_accumulates(rank, "infonce", UNEVEN)
    for stage in REFUSAL_STAGES:
        out[f"refusal-zero{stage}"] = repeated_step_refusal(rank, stage)
        dist.barrier()
    for cached in (True, False):
        out[f"job-temperature-{'cached' if cached else 'plain'}"] = job_temperature(rank, UNEVEN, cached)
        dist.barrier()
    out["collectives"] = collectives_of_one_step(rank)
    out["inside-model"] = loss_inside_the_model(rank, world)
    out["function"] = loss_in_a_function(rank)
    out["fp16"] = fp16.fp16_on_ranks(rank, world)  # fp16 GradCache with loss scaling (test_grad_cache_fp16.py)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    pytest.importorskip("deepspeed")
    return run_on_ranks(all_cases, 2, timeout=400)


NCCL_CASES = [case for case, (setup, _, _) in STEP_CASES.items() if setup == "ddp"]


def nccl_cases(rank: int, world: int) -> dict[str, Any]:
    """On each of 2 NCCL ranks (rank r on ``cuda:r``): the DDP cases of :data:`STEP_CASES` and the DDP float16
    step with loss scaling of ``test_grad_cache_fp16.py``, everything returned on the CPU."""
    out: dict[str, Any] = {}
    for case in NCCL_CASES:
        out[case] = one_step(rank, *STEP_CASES[case], device="cuda")
        dist.barrier()
    out["fp16"] = fp16.fp16_update(
        sum(fp16.SIZES), fp16.scaler(device="cuda"), sizes=fp16.SIZES, rank=rank, device="cuda"
    )
    return to_cpu(out)


@pytest.fixture(scope="module")
def two_nccl_ranks() -> list[dict[str, Any]]:
    return run_on_ranks(nccl_cases, 2, timeout=400, backend="nccl")


def check_one_step(two_ranks: list[dict[str, Any]], case: str) -> None:
    """Both ranks' gradients, weights and loss parameters after ``case``'s step equal the one-process reference
    within TOL, and the loss parameters are bitwise equal on the two ranks."""
    setup, name, sizes = STEP_CASES[case]
    want = reference(name, [global_batch(sum(sizes))])
    initial = {n: p.detach().clone() for n, p in make_encoder().named_parameters()}
    initial_loss = initial_loss_params(name)
    for rank, results in enumerate(two_ranks):
        got = results[case]
        assert got["mode"] == {"ddp": "ddp", "zero2": "coalesce", "zero3": "direct"}[setup]
        for key in ("grads", "loss_grads", "weights", "loss_params"):
            err = rel_error(got[key], want[key])
            # A loss parameter's gradient is a sum with much cancellation (measured in float32: 4e-6 relative,
            # the one-process float32 value itself is 7e-6 off); without the averaging it is off by O(1).
            tol = 5 * TOL if key == "loss_grads" and dtype_of(setup) == torch.float32 else TOL
            assert err < tol, f"{case} rank {rank}: {key} relative error {err:.2e}"
        # The updates themselves (weights - initial) agree too, not only the weights they are added to.
        for key, start in (("weights", initial), ("loss_params", initial_loss)):
            moved = {n: got[key][n] - start[n] for n in start}
            want_moved = {n: want[key][n] - start[n] for n in start}
            err = rel_error(moved, want_moved)
            # a loss parameter's SGD update is -LR times its gradient: the same float32 tolerance as that gradient
            tol = 5 * TOL if key == "loss_params" and dtype_of(setup) == torch.float32 else TOL
            assert err < tol, f"{case} rank {rank}: {key} update relative error {err:.2e}"
    for key in ("loss_grads", "loss_params"):  # bitwise identical on the ranks: they cannot drift apart
        for n, value in two_ranks[0][case][key].items():
            assert torch.equal(value, two_ranks[1][case][key][n]), f"{case}: {key} {n} differs between ranks"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_one_step_matches_one_process_including_loss_parameters(two_ranks, case):
    check_one_step(two_ranks, case)


@pytest.mark.slow
@needs_two_gpus
@pytest.mark.parametrize("case", NCCL_CASES)
def test_cuda_nccl_one_step_matches_one_process(two_nccl_ranks, case):
    """The DDP cases on 2 GPUs over NCCL, float64 as on gloo: the same reference, the same TOL."""
    check_one_step(two_nccl_ranks, case)


@pytest.mark.slow
def test_ddp_repeated_steps_accumulate_exactly(two_ranks):
    want = reference("infonce", [global_batch(sum(UNEVEN), seed=1), global_batch(sum(UNEVEN), seed=2)])
    for results in two_ranks:
        got = results["ddp-accumulate"]
        assert rel_error(got["grads"], want["grads"]) < TOL
        assert rel_error(got["loss_grads"], want["loss_grads"]) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("stage", REFUSAL_STAGES)
def test_second_step_before_engine_step_is_refused(two_ranks, stage):
    for results in two_ranks:
        message = results[f"refusal-zero{stage}"]
        assert "called again before engine.step()" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("path", ["cached", "plain"])
def test_job_temperature_after_two_steps_matches_one_process(two_ranks, path):
    """The job's learned τ (GradCache or ``chunk_size=0``, ZeRO-2, its AdamW stepper) equals one process's on the
    whole global batch, and is bitwise equal on both ranks: they cannot drift apart."""
    want = job_temperature_reference(UNEVEN)
    got = [results[f"job-temperature-{path}"] for results in two_ranks]
    assert got[0] == got[1]
    start = math.log(1.0 / TEMPERATURE)
    moved, want_moved = [v - start for v in got[0]], [w - start for w in want]
    assert moved == pytest.approx(want_moved, rel=10 * TOL, abs=0.0)  # float32 ranks vs the float64 reference
    assert abs(moved[0]) > 0.5 * JOB_TAU_LR and abs(moved[1] - moved[0]) > 0.5 * JOB_TAU_LR  # both steps moved τ


@pytest.mark.slow
def test_one_size_exchange_per_step_and_reduce_scatter_backward(two_ranks):
    """One GradCache step exchanges sizes once (the chunk and row counts of every input, in one all-gather), and
    the loss's gathers reuse those row counts; each gather's backward is one reduce-scatter, no all-reduce.

    Before: 5 size exchanges in this step (an all-reduce of the chunk counts, then one all-gather of sizes per
    gather) and 8 all-reduces (4 of them the gathers' backwards)."""
    gathers = 2 * len(COUNTED_DIMS)  # docs and queries per prefix
    for results in two_ranks:
        counts = results["collectives"]
        assert counts["size_exchange"] == 1, counts
        gathered = sum(counts.get(name, 0) for name in ("all_gather", "all_gather_into_tensor", "all_gather_single"))
        assert gathered == 1 + gathers, counts  # the size exchange, then the data
        scattered = sum(counts.get(n, 0) for n in ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"))
        assert scattered == gathers, counts
        # the loss value's statistics once per prefix, and the temperature's gradient average once per step
        assert counts["all_reduce"] == len(COUNTED_DIMS) + 1, counts


@pytest.mark.slow
def test_loss_parameters_inside_the_wrapped_model_are_refused(two_ranks):
    """DDP/DeepSpeed cannot reduce gradients produced outside the model's backward: refuse the set-up."""
    for results in two_ranks:
        assert "also parameters of the wrapped model" in results["inside-model"]


@pytest.mark.slow
def test_undeclared_loss_parameters_are_refused_or_listed(two_ranks):
    want = reference("siglip", [global_batch(sum(UNEVEN))])
    for results in two_ranks:
        got = results["function"]
        assert "loss_parameters=" in got["message"], got["message"]
        assert rel_error(got["loss_grads"], want["loss_grads"]) < TOL


# --- single process -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_fp16_with_loss_scaling_matches_one_process_fp32(two_ranks):
    """DDP on 2 ranks (uneven slices): the same updates as float64 on the whole batch within TOL, and the
    temperature bitwise equal on both ranks."""
    check_ddp_fp16(two_ranks)


@pytest.mark.slow
@needs_two_gpus
def test_cuda_nccl_ddp_fp16_with_loss_scaling_matches_one_process_fp32(two_nccl_ranks):
    """The same on 2 GPUs over NCCL (float16 matmuls accumulate in float32 there too: the same fp16.TOL)."""
    check_ddp_fp16(two_nccl_ranks)


def check_ddp_fp16(two_ranks: list[dict[str, Any]]) -> None:
    """Each rank's fp16 DDP update equals float64's on the whole batch within fp16.TOL; the temperature's update
    is bitwise equal on the ranks."""
    want = fp16.reference_update(sum(fp16.SIZES))
    for got in (out["fp16"] for out in two_ranks):
        assert got["scale"] == fp16.SCALE
        assert fp16.rel_error(got["update"], want, fp16.MODEL) < fp16.TOL
        assert fp16.rel_error(got["update"], want, fp16.TAU) < fp16.TOL
    first, second = (out["fp16"]["update"][fp16.TAU[0]] for out in two_ranks)
    assert torch.equal(first, second)


@pytest.mark.slow
def test_scaler_with_a_deepspeed_engine_is_refused(two_ranks):
    """DeepSpeed fp16 owns loss scaling (and cannot run on a CPU: DeepSpeed's CPU accelerator has no fp16)."""
    for got in (out["fp16"] for out in two_ranks):
        assert "cannot be used with a DeepSpeed engine" in got["deepspeed"], got["deepspeed"]
        assert '"fp16": {"enabled": true}' in got["deepspeed"]


def test_plain_module_loss_parameters_get_the_full_batch_gradient():
    """One process: the loss parameters' gradient through GradCache equals the plain backward's, and an
    existing ``.grad`` is added to, not replaced."""
    queries, docs = global_batch(7)
    for name in LOSSES:
        want = reference(name, [(queries, docs)])
        model, loss_fn = make_encoder(), LOSSES[name]().double()
        for p in loss_fn.parameters():
            p.grad = torch.ones_like(p)
        GradCache(model, CHUNK, loss_fn).step(queries, docs)
        got = {n: p.grad - 1.0 for n, p in loss_fn.named_parameters()}
        assert rel_error(got, want["loss_grads"]) < TOL
        assert rel_error({n: p.grad for n, p in model.named_parameters()}, want["grads"]) < TOL


def test_temperature_at_the_clamp_keeps_its_gradient():
    """At the bound the learnable temperature still gets its true gradient; the clamp acts after the step."""
    queries, docs = global_batch(6)
    model = make_encoder()
    loss_fn = InfoNCELoss(0.001, learnable_temperature=True, max_inverse_temperature=100.0).double()
    assert loss_fn.log_inverse_temperature.item() == pytest.approx(math.log(100.0))  # starts at the bound
    GradCache(model, CHUNK, loss_fn).step(queries, docs)
    grad = loss_fn.log_inverse_temperature.grad
    params = {"log_inverse_temperature": loss_fn.log_inverse_temperature.detach().clone().requires_grad_()}
    reference_loss("infonce", model(queries), model(docs), params).backward()
    assert grad.item() != 0.0
    assert grad.item() == pytest.approx(params["log_inverse_temperature"].grad.item(), rel=1e-10)
    # An optimizer step past the bound is undone by clamp_parameters_; one below it is kept.
    with torch.no_grad():
        loss_fn.log_inverse_temperature.fill_(math.log(100.0) + 0.3)
    loss_fn.clamp_parameters_()
    assert loss_fn.log_inverse_temperature.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        loss_fn.log_inverse_temperature.fill_(math.log(50.0))
    loss_fn.clamp_parameters_()
    assert loss_fn.log_inverse_temperature.item() == pytest.approx(math.log(50.0))
