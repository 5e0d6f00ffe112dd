"""GradCache in float16 without DeepSpeed: loss scaling through a ``torch.amp.GradScaler`` and a float32 gradient
cache (issue 16).

Every case runs the encoder under ``torch.autocast("cpu", dtype=torch.float16)`` (float32 master weights, float16
matmuls) through GradCache with a scaler, takes one optimizer step through the scaler, and compares with an
independent float64 reference: the same model and loss on the whole batch in one forward, one backward, the SGD
step by hand. The model's update and the learnable temperature's must agree within ``TOL``.

``TOL`` = 5e-3 relative, about 10 float16 unit roundoffs (``u = 2^-11 = 4.9e-4``): autocast rounds the inputs,
weights and every activation of the 2-layer encoder to float16, and the backward rounds each incoming gradient
to float16 again, so an entry of the parameter gradient carries a few such relative errors (measured: 1.5e-3 at
64 rows). A float16 cache of ``∂L/∂R`` (the behaviour before) or no loss scaling at small gradients lands far
outside it; the cases below show both.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from multiproc import DEVICES
from torch import Tensor, nn

from dist_unlearn.contrastive import GradCache, InfoNCELoss

IN_DIM, HIDDEN, OUT_DIM = 8, 16, 8
CHUNK = 8
LR = 0.5
TEMPERATURE = 0.07
TOL = 5e-3
FP16 = torch.float16
SCALE = 2.0**10
"""The scaler's initial scale where the gradients are of order 1: ``S · ∂L/∂R`` stays below float16's largest
value, 65504 (at GradScaler's default 2^16 the first step here overflows and is skipped, as it should be)."""


def scaler(init_scale: float = SCALE, device: str = "cpu") -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device, init_scale=init_scale)


def make_encoder() -> nn.Module:
    """A float32 2-layer MLP (the same weights every call)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT_DIM))


def global_batch(rows: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Queries ``[rows, 8]`` and their positive documents ``[rows, 8]`` (a noisy copy of each query)."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(rows, IN_DIM, generator=gen)
    return queries, queries + 0.5 * torch.randn(rows, IN_DIM, generator=gen)


def make_loss() -> InfoNCELoss:
    return InfoNCELoss(TEMPERATURE, learnable_temperature=True)


def reference_grads(rows: int, weight: float = 1.0) -> dict[str, Tensor]:
    """float64, one process, whole batch: the gradient of every weight and of ``log(1/tau)`` (the SGD update is
    ``-LR`` times it)."""
    model, loss_fn = make_encoder().double(), make_loss().double()
    queries, docs = global_batch(rows)
    (weight * loss_fn(model(queries.double()), model(docs.double()))).backward()
    return {n: p.grad for n, p in [*model.named_parameters(), *loss_fn.named_parameters()]}


def reference_update(rows: int) -> dict[str, Tensor]:
    return {n: -LR * g for n, g in reference_grads(rows).items()}


def fp16_update(
    rows: int,
    scaler: torch.amp.GradScaler | None,
    weight: float = 1.0,
    half_cache: bool = False,
    sizes: tuple[int, ...] | None = None,
    rank: int = 0,
    chunk: int = CHUNK,
    device: str = "cpu",
) -> dict[str, Any]:
    """One GradCache step under float16 autocast and one SGD step (model and loss in one optimizer) through
    ``scaler`` (a plain ``optimizer.step()`` without one). ``half_cache``: the loss runs on float16 copies of the
    representations, so ``∂L/∂R`` is float16, as GradCache kept it before. ``sizes``: DDP over the ranks, each
    with its slice of the ``sum(sizes)`` rows. ``device``: where the model, loss and batch live (``cuda``: one
    GPU; under NCCL the rank's current device). Returns every parameter's update and unscaled gradient (``.grad``
    after ``scaler.step``), the scaler's scale and the dtypes of the representations the loss received."""
    model, loss_fn = make_encoder().to(device), make_loss().to(device)
    wrapped = nn.parallel.DistributedDataParallel(model) if sizes is not None else model
    before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *loss_fn.named_parameters()]}
    optimizer = torch.optim.SGD([{"params": model.parameters()}, {"params": loss_fn.parameters()}], lr=LR)
    seen: list[torch.dtype] = []

    def loss(q: Tensor, d: Tensor) -> Tensor:
        seen.append(q.dtype)
        if half_cache:
            q, d = q.half(), d.half()
        return weight * loss_fn(q, d)

    cache = GradCache(wrapped, chunk, loss, autocast_dtype=FP16, scaler=scaler, loss_parameters=loss_fn.parameters())
    queries, docs = (x.to(device) for x in global_batch(rows))
    if sizes is not None:
        start = sum(sizes[:rank])
        queries, docs = queries[start : start + sizes[rank]], docs[start : start + sizes[rank]]
    cache.step(queries, docs)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    after = dict([*model.named_parameters(), *loss_fn.named_parameters()])
    return {
        "update": {n: (after[n].detach() - before[n]).double().cpu() for n in before},
        "grad": {n: p.grad.double().cpu() for n, p in after.items()},
        "scale": scaler.get_scale() if scaler is not None else None,
        "loss_dtypes": seen,
    }


def rel_error(got: dict[str, Tensor], want: dict[str, Tensor], names: list[str] | None = None) -> float:
    """max |got - want| / max |want| over the tensors ``names`` (default: all of ``want``)."""
    names = names if names is not None else list(want)
    scale = max(want[n].abs().max().item() for n in names)
    return max((got[n] - want[n]).abs().max().item() for n in names) / scale


MODEL = [n for n, _ in make_encoder().named_parameters()]
TAU = ["log_inverse_temperature"]


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_with_loss_scaling_matches_fp32(device):
    """One step with a GradScaler: the weights' and the temperature's updates equal float64's within TOL (on CUDA
    the float16 matmuls accumulate in float32, as on the CPU: the same bound)."""
    want = reference_update(64)
    got = fp16_update(64, scaler(device=device), device=device)
    assert got["scale"] == SCALE  # no overflow: the step was taken (measured on the CPU: 1.5e-3 and 6.0e-4)
    assert rel_error(got["update"], want, MODEL) < TOL
    assert rel_error(got["update"], want, TAU) < TOL


def test_loss_scaling_keeps_small_gradients():
    """A loss weighted by 1e-6 (its ``∂L/∂R`` as small as a mean over ~10^8 rows would make it): without a scaler
    the float16 backward rounds the gradients to subnormals and zeros; with GradScaler's default 2^16 they match
    float64 within TOL. Gradients (unscaled by ``scaler.step``) are compared, not updates: an update of ~1e-7
    is itself rounded by the float32 weights it is added to."""
    want = reference_grads(64, weight=1e-6)
    scaled = fp16_update(64, scaler(2.0**16), weight=1e-6)["grad"]
    unscaled = fp16_update(64, None, weight=1e-6)["grad"]
    assert rel_error(scaled, want, MODEL) < TOL  # measured 1.6e-3
    assert rel_error(unscaled, want, MODEL) > 20 * TOL  # measured 0.70
    # The temperature's gradient is computed in float32 either way; with the scaler it is multiplied by S and
    # unscaled by 1/S (exact for a power of two).
    assert rel_error(scaled, want, TAU) < TOL
    assert torch.equal(scaled[TAU[0]], unscaled[TAU[0]])


def test_loss_parameters_are_scaled_like_the_model_and_unscale_exactly():
    """After ``step`` the temperature's gradient is S times its unscaled value; ``scaler.unscale_`` gives back
    exactly the gradient GradCache produces without a scaler."""
    queries, docs = global_batch(32)
    grads = []
    for grad_scaler in (None, scaler()):
        model, loss_fn = make_encoder(), make_loss()
        GradCache(model, CHUNK, loss_fn, autocast_dtype=FP16, scaler=grad_scaler).step(queries, docs)
        grads.append(loss_fn.log_inverse_temperature.grad.clone())
        if grad_scaler is not None:
            assert torch.equal(grads[1], grads[0] * SCALE)
            optimizer = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=LR)
            grad_scaler.unscale_(optimizer)
            assert torch.equal(loss_fn.log_inverse_temperature.grad, grads[0])


def test_the_cache_is_float32_and_a_float16_cache_is_worse():
    """The loss sees float32 representations (so ``∂L/∂R`` is float32) while the encoder runs in float16; a
    float16 cache (the loss on float16 copies: GradCache before) is off by far more at 512 rows."""
    rows = 512
    want = reference_update(rows)
    fp32_cache = fp16_update(rows, scaler(), chunk=128)
    half_cache = fp16_update(rows, scaler(), half_cache=True, chunk=128)
    assert fp32_cache["loss_dtypes"] == [torch.float32]
    fp32_errors = [rel_error(fp32_cache["update"], want, names) for names in (MODEL, TAU)]
    half_errors = [rel_error(half_cache["update"], want, names) for names in (MODEL, TAU)]
    assert max(fp32_errors) < TOL
    # measured: weights 4.5e-4 vs 3.1e-3, temperature 2.4e-5 vs 1.3e-2
    assert half_errors[0] > 3 * fp32_errors[0] and half_errors[1] > 30 * fp32_errors[1]


def test_overflow_skips_the_step_and_lowers_the_scale():
    """With a scale of 2^40 the float16 backward overflows: the step is skipped for the model and the temperature
    alike (one optimizer, one inf check) and the scale is halved."""
    got = fp16_update(64, scaler(2.0**40))
    assert got["scale"] == 2.0**39
    assert all(not u.any() for u in got["update"].values())


def test_bad_scaler_is_refused():
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        GradCache(make_encoder(), CHUNK, make_loss(), scaler=2.0**16)


# --- 2 gloo ranks: DDP, and the refusal under DeepSpeed -------------------------------------------
# Run inside the 2-rank spawn of test_grad_cache_loss_params.py (one process start-up for both files);
# the tests that read the results are there.

SIZES = (40, 24)


def fp16_on_ranks(rank: int, world: int) -> dict[str, Any]:
    """On each of 2 gloo ranks: the DDP fp16 update of :func:`fp16_update` on uneven slices, and what
    ``GradCache(engine, ..., scaler=...)`` says for a DeepSpeed engine."""
    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(world)})  # for DeepSpeed
    out = fp16_update(sum(SIZES), scaler(), sizes=SIZES, rank=rank)
    dist.barrier()
    import deepspeed

    model = make_encoder()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    try:
        GradCache(engine, CHUNK, make_loss(), scaler=scaler())
        out["deepspeed"] = "accepted"
    except ValueError as exc:
        out["deepspeed"] = str(exc)
    return out


def test_loss_parameter_stepper_skips_with_the_model():
    """After a step DeepSpeed skipped (fp16 overflow), the loss's parameters do not move and their gradient is
    cleared (GradCache adds to an existing ``.grad``, so a stale one would leak into the next step)."""
    from dist_unlearn.contrastive.loss_params import LossParameterStepper

    loss_fn = make_loss()
    stepper = LossParameterStepper(loss_fn, lr=0.1)
    start = loss_fn.log_inverse_temperature.detach().clone()
    loss_fn.log_inverse_temperature.grad = torch.ones(())
    stepper.step(skipped=True)
    assert torch.equal(loss_fn.log_inverse_temperature.detach(), start)
    assert loss_fn.log_inverse_temperature.grad is None
    loss_fn.log_inverse_temperature.grad = torch.ones(())
    stepper.step()
    assert not torch.equal(loss_fn.log_inverse_temperature.detach(), start)
