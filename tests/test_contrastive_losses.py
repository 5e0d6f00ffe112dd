"""Contrastive losses: hand-written single-process references, tiled == full, and 2 gloo ranks with unequal
local batches whose rank-averaged parameter gradients equal the single-process gradient on the global batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from multiproc import run_on_ranks

from dist_unlearn.contrastive import (
    AUCLoss,
    DebiasedContrastiveLoss,
    DecoupledContrastiveLoss,
    InfoNCELoss,
    MatryoshkaLoss,
    SigmoidLoss,
    TiledInfoNCELoss,
)

IN_FEATURES, EMBED = 6, 8


# --- independent references: explicit per-pair formulas on the whole global batch -------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _lse(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.log(sum(torch.exp(v) for v in values))


def ref_infonce(Q, D, p, temperature=None, symmetric=False, margin=None):
    """Q [B, d], D [B, k, d]; query i's positive is D[i, 0]; candidates are all B*k docs."""
    t = p["log_inverse_temperature"].exp() if "log_inverse_temperature" in p else 1.0 / temperature
    q, docs = _unit(Q), _unit(D)
    B, k, _ = D.shape
    cand = docs.reshape(B * k, -1)
    rows = []
    for i in range(B):
        s = [torch.dot(q[i], cand[j]) for j in range(B * k)]
        pos = i * k
        keep = [s[j] for j in range(B * k) if j == pos or margin is None or not s[j] > s[pos] - margin]
        loss = -t * s[pos] + _lse([t * v for v in keep])
        if symmetric:
            s2 = [torch.dot(docs[i, 0], q[j]) for j in range(B)]
            keep2 = [s2[j] for j in range(B) if j == i or margin is None or not s2[j] > s2[i] - margin]
            loss = 0.5 * (loss + (-t * s2[i] + _lse([t * v for v in keep2])))
        rows.append(loss)
    return torch.stack(rows).mean()


def ref_sigmoid(Q, D, p):
    t, bias = p["log_scale"].exp(), p["bias"]
    q, docs = _unit(Q), _unit(D)
    B, k, _ = D.shape
    cand = docs.reshape(B * k, -1)
    total = 0.0
    for i in range(B):
        for j in range(B * k):
            z = 1.0 if j == i * k else -1.0
            total = total + torch.log1p(torch.exp(-z * (t * torch.dot(q[i], cand[j]) + bias)))
    return total / B


def _pairs(Q, D):
    q, docs = _unit(Q), _unit(D)
    B, k, _ = D.shape
    cand = docs.reshape(B * k, -1)
    for i in range(B):
        s = [torch.dot(q[i], cand[j]) for j in range(B * k)]
        yield s[i * k], [s[j] for j in range(B * k) if j != i * k]


def ref_decoupled(Q, D, p):
    t = p["log_inverse_temperature"].exp()
    return torch.stack([-t * pos + _lse([t * v for v in neg]) for pos, neg in _pairs(Q, D)]).mean()


def ref_debiased(Q, D, p, tau_plus):
    t = p["log_inverse_temperature"].exp()
    rows = []
    for pos, neg in _pairs(Q, D):
        m = len(neg)
        e_pos = torch.exp(t * pos)
        ng = (sum(torch.exp(t * v) for v in neg) - tau_plus * m * e_pos) / (1 - tau_plus)
        ng = torch.maximum(ng, m * torch.exp(-t))
        rows.append(-torch.log(e_pos / (e_pos + ng)))
    return torch.stack(rows).mean()


def ref_auc(Q, D, p):
    t = p["log_inverse_temperature"].exp()
    rows = [sum(torch.log1p(torch.exp(t * (v - pos))) for v in neg) / len(neg) for pos, neg in _pairs(Q, D)]
    return torch.stack(rows).mean()


def ref_matryoshka(Q, D, p, dims, weights):
    inner = {"log_inverse_temperature": p["base_loss.log_inverse_temperature"]}
    return sum(w * ref_infonce(Q[:, :m], D[..., :m], inner) for m, w in zip(dims, weights))


# name -> (loss factory, hard negatives h, dtype, reference(Q, D, params))
CASES = {
    "infonce": (lambda: InfoNCELoss(0.05), 2, torch.float64, lambda Q, D, p: ref_infonce(Q, D, p, 0.05)),
    "infonce_sym": (
        lambda: InfoNCELoss(0.05, symmetric=True),
        2,
        torch.float64,
        lambda Q, D, p: ref_infonce(Q, D, p, 0.05, symmetric=True),
    ),
    "infonce_learnable": (
        lambda: InfoNCELoss(0.07, learnable_temperature=True),
        2,
        torch.float64,
        ref_infonce,
    ),
    "infonce_margin": (
        lambda: InfoNCELoss(0.05, false_negative_margin=0.1),
        2,
        torch.float64,
        lambda Q, D, p: ref_infonce(Q, D, p, 0.05, margin=0.1),
    ),
    "infonce_all": (
        lambda: InfoNCELoss(0.05, learnable_temperature=True, symmetric=True, false_negative_margin=0.1),
        2,
        torch.float64,
        lambda Q, D, p: ref_infonce(Q, D, p, symmetric=True, margin=0.1),
    ),
    "infonce_fp32": (
        lambda: InfoNCELoss(0.05, learnable_temperature=True, symmetric=True),
        2,
        torch.float32,
        lambda Q, D, p: ref_infonce(Q, D, p, symmetric=True),
    ),
    "sigmoid": (lambda: SigmoidLoss(), 2, torch.float64, ref_sigmoid),
    "sigmoid_pos_only": (lambda: SigmoidLoss(init_scale=5.0, init_bias=-2.0), 0, torch.float64, ref_sigmoid),
    "decoupled": (lambda: DecoupledContrastiveLoss(0.1, learnable_temperature=True), 2, torch.float64, ref_decoupled),
    "debiased": (
        lambda: DebiasedContrastiveLoss(0.2, tau_plus=0.1, learnable_temperature=True),
        2,
        torch.float64,
        lambda Q, D, p: ref_debiased(Q, D, p, 0.1),
    ),
    "auc": (lambda: AUCLoss(0.1, learnable_temperature=True), 2, torch.float64, ref_auc),
    "matryoshka": (
        lambda: MatryoshkaLoss(InfoNCELoss(0.07, learnable_temperature=True), dims=(4, 8), weights=(1.0, 0.5)),
        2,
        torch.float64,
        lambda Q, D, p: ref_matryoshka(Q, D, p, (4, 8), (1.0, 0.5)),
    ),
    "tiled": (
        lambda: TiledInfoNCELoss(0.07, tile_size=5, learnable_temperature=True, false_negative_margin=0.1),
        2,
        torch.float64,
        lambda Q, D, p: ref_infonce(Q, D, p, margin=0.1),
    ),
    "tiled_fp32": (
        lambda: TiledInfoNCELoss(0.05, tile_size=4, learnable_temperature=True),
        2,
        torch.float32,
        ref_infonce,
    ),
}
SIZES = {"unequal": (3, 5), "empty_rank": (0, 4)}
EMPTY_RANK_CASES = ("infonce_all", "sigmoid", "debiased", "tiled")


def _global_batch(n: int, h: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xq = torch.randn(n, IN_FEATURES, generator=gen, dtype=torch.float64)
    xd = torch.randn(n, 1 + h, IN_FEATURES, generator=gen, dtype=torch.float64)
    xd[:, 0] = xd[:, 0] + 1.5 * xq  # positives correlate with their query
    return xq.to(dtype), xd.to(dtype)


def _encoder(dtype: torch.dtype) -> torch.nn.Linear:
    torch.manual_seed(123)
    return torch.nn.Linear(IN_FEATURES, EMBED).to(dtype)


def _run_case(name: str, sizes: tuple[int, ...], rank: int | None) -> dict:
    """Encode this rank's slice (or everything when ``rank`` is None), loss.backward(); grads by name."""
    factory, h, dtype, _ = CASES[name]
    xq, xd = _global_batch(sum(sizes), h, dtype)
    if rank is not None:
        start = sum(sizes[:rank])
        xq, xd = xq[start : start + sizes[rank]], xd[start : start + sizes[rank]]
    enc, loss_fn = _encoder(dtype), factory().to(dtype)
    docs = enc(xd) if h else enc(xd[:, 0])  # h == 0: docs [b, d]
    loss = loss_fn(enc(xq), docs)
    loss.backward()
    grads = {f"enc.{n}": p.grad.clone() for n, p in enc.named_parameters()}
    grads.update({n: p.grad.clone() for n, p in loss_fn.named_parameters()})
    return {"loss": loss.detach(), "global": loss_fn.last_global_loss, "grads": grads}


def _rank_work(rank: int, world_size: int) -> dict:
    out = {}
    for name in CASES:
        out[name, "unequal"] = _run_case(name, SIZES["unequal"], rank)
    for name in EMPTY_RANK_CASES:
        out[name, "empty_rank"] = _run_case(name, SIZES["empty_rank"], rank)
    return out


def _reference(name: str, sizes: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """The explicit formula on the whole global batch in float64 and its gradients (encoder + loss params)."""
    factory, h, dtype, ref = CASES[name]
    xq, xd = _global_batch(sum(sizes), h, dtype)
    enc = _encoder(dtype).double()
    params = {n: p.detach().double().clone().requires_grad_(True) for n, p in factory().named_parameters()}
    Q, D = enc(xq.double()), enc(xd.double())
    value = ref(Q, D, params)
    names = [f"enc.{n}" for n, _ in enc.named_parameters()] + list(params)
    tensors = list(enc.parameters()) + list(params.values())
    return value.detach(), dict(zip(names, torch.autograd.grad(value, tensors)))


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    assert err <= tol * scale + 1e-12, f"{what}: relative error {err / max(scale, 1e-300):.3e} > {tol}"


@pytest.fixture(scope="module")
def two_rank_results() -> list[dict]:
    return run_on_ranks(_rank_work, 2, timeout=150)


ALL_RUNS = [(n, "unequal") for n in CASES] + [(n, "empty_rank") for n in EMPTY_RANK_CASES]


@pytest.mark.parametrize("name,sizes_key", ALL_RUNS, ids=[f"{n}-{s}" for n, s in ALL_RUNS])
def test_two_ranks_match_single_process(two_rank_results, name, sizes_key):
    sizes = SIZES[sizes_key]
    tol = 1e-5 if CASES[name][2] == torch.float32 else 1e-8
    ref_value, ref_grads = _reference(name, sizes)
    runs = [res[name, sizes_key] for res in two_rank_results]
    world = len(runs)
    # Mean of the per-rank (W-scaled) losses is the global mean; every rank logs the true global mean.
    _assert_rel(sum(r["loss"] for r in runs) / world, ref_value, tol, "mean of rank losses")
    for r in runs:
        _assert_rel(r["global"], ref_value, tol, "last_global_loss")
    assert set(runs[0]["grads"]) == set(ref_grads)
    for key, expected in ref_grads.items():
        averaged = sum(r["grads"][key] for r in runs) / world  # what DDP / DeepSpeed do
        _assert_rel(averaged, expected, tol, f"{name} grad {key}")
    # One process running the module on the whole batch agrees as well.
    single = _run_case(name, sizes, None)
    _assert_rel(single["loss"], ref_value, tol, "single-process value")
    for key, expected in ref_grads.items():
        _assert_rel(single["grads"][key], expected, tol, f"{name} single-process grad {key}")


def test_margin_cases_mask_something():
    """The false-negative margin in the cases above masks some, but not all, candidates."""
    xq, xd = _global_batch(sum(SIZES["unequal"]), 2, torch.float64)
    enc = _encoder(torch.float64)
    q, d = _unit(enc(xq)).detach(), _unit(enc(xd)).reshape(-1, EMBED).detach()
    scores = q @ d.T
    labels = torch.arange(q.shape[0]) * 3
    masked = scores > scores.gather(1, labels[:, None]) - 0.1
    masked[torch.arange(q.shape[0]), labels] = False
    assert 0 < int(masked.sum()) < masked.numel() - q.shape[0]


# --- single-process checks --------------------------------------------------------------------------------------


def _random_inputs(b=5, h=2, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=gen, dtype=dtype)
    docs = torch.randn(b, 1 + h, d, generator=gen, dtype=dtype)
    docs[:, 0] += q
    return q.requires_grad_(True), docs.requires_grad_(True)


def test_infonce_equals_explicit_cross_entropy():
    q, docs = _random_inputs()
    loss = InfoNCELoss(temperature=0.05)(q, docs)
    # Explicit: logits = cos(q_i, d_j) / tau over all 15 docs, target = 3 i.
    qn, dn = F.normalize(q, dim=-1), F.normalize(docs.reshape(-1, 8), dim=-1)
    logits = qn @ dn.T / 0.05
    expected = -(logits[torch.arange(5), torch.arange(5) * 3] - torch.logsumexp(logits, dim=1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    # Flattened doc layout [b*(1+h), d] is the same input.
    torch.testing.assert_close(InfoNCELoss(0.05)(q, docs.reshape(-1, 8)), expected, rtol=1e-12, atol=1e-12)
    # No hard negatives: docs [b, d], labels 0..b-1.
    pos = docs[:, 0]
    logits = qn @ F.normalize(pos, dim=-1).T / 0.05
    torch.testing.assert_close(InfoNCELoss(0.05)(q, pos), F.cross_entropy(logits, torch.arange(5)))


def test_options_without_process_group_agree():
    q, docs = _random_inputs()
    base = InfoNCELoss(0.05)(q, docs)
    torch.testing.assert_close(InfoNCELoss(0.05, cross_rank=False)(q, docs), base)
    torch.testing.assert_close(InfoNCELoss(0.05, reduction="local_mean")(q, docs), base)
    loss = InfoNCELoss(0.05)
    loss(q, docs)
    torch.testing.assert_close(loss.last_global_loss, base.detach())
    # normalize=False on unit inputs == normalize=True.
    qn, dn = F.normalize(q, dim=-1), F.normalize(docs, dim=-1)
    torch.testing.assert_close(InfoNCELoss(0.05, normalize=False)(qn, dn), base)


def test_learnable_temperature_is_clamped():
    loss = InfoNCELoss(temperature=0.001, learnable_temperature=True, max_inverse_temperature=100.0)
    assert isinstance(loss.log_inverse_temperature, torch.nn.Parameter)
    assert loss.inverse_temperature().item() == pytest.approx(100.0)
    assert "log_inverse_temperature" not in dict(InfoNCELoss(0.05).named_parameters())


@pytest.mark.parametrize("tile", [1, 4, 5, 7, 15, 64])
@pytest.mark.parametrize("margin", [None, 0.2])
def test_tiled_equals_full(tile, margin):
    q, docs = _random_inputs(b=5, h=2)  # N = 15 docs; tiles 4 and 7 do not divide it
    full_fn = InfoNCELoss(0.05, learnable_temperature=True, false_negative_margin=margin).double()
    tiled_fn = TiledInfoNCELoss(0.05, tile_size=tile, learnable_temperature=True, false_negative_margin=margin)
    tiled_fn = tiled_fn.double()
    full = full_fn(q, docs)
    g_full = torch.autograd.grad(full, [q, docs, full_fn.log_inverse_temperature])
    tiled = tiled_fn(q, docs)
    g_tiled = torch.autograd.grad(tiled, [q, docs, tiled_fn.log_inverse_temperature])
    torch.testing.assert_close(tiled, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_tiled, g_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_tiled_fp32_and_gradcheck():
    from dist_unlearn.contrastive.tiled import tiled_cross_entropy

    q, docs = _random_inputs(b=4, h=1, dtype=torch.float32, seed=3)
    full = InfoNCELoss(0.05)(q, docs)
    tiled = TiledInfoNCELoss(0.05, tile_size=3)(q, docs)
    torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-6)
    # Gradcheck of the raw autograd.Function (q, k and t) in float64, including a masked case.
    gen = torch.Generator().manual_seed(1)
    qq = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    kk = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 6])
    for margin in (None, 0.5):
        assert torch.autograd.gradcheck(
            lambda a, b, c, m=margin: tiled_cross_entropy(a, b, labels, c, 3, m), (qq, kk, t)
        )


def test_bad_inputs_raise():
    q, docs = _random_inputs()
    with pytest.raises(ValueError, match="multiple"):
        InfoNCELoss()(q, docs.reshape(-1, 8)[:-1])
    with pytest.raises(ValueError, match="docs must be"):
        InfoNCELoss()(q, docs[:3])
    with pytest.raises(ValueError, match="exceed"):
        MatryoshkaLoss(InfoNCELoss(), dims=(4, 16))(q, docs)
    with pytest.raises(ValueError, match="reduction"):
        InfoNCELoss(reduction="mean")
    with pytest.raises(ValueError, match="tile_size"):
        TiledInfoNCELoss(tile_size=0)
    assert math.isfinite(DebiasedContrastiveLoss()(q, docs).item())


def test_bf16_inputs_reduce_in_float32():
    q, docs = _random_inputs(b=6, h=2, d=16, seed=5)
    q, docs = q.detach().bfloat16(), docs.detach().bfloat16()
    ref = InfoNCELoss(0.05)(q.double(), docs.double()).item()  # same rounded inputs, float64 math
    for loss_fn in (InfoNCELoss(0.05), TiledInfoNCELoss(0.05, tile_size=4)):
        loss = loss_fn(q, docs)
        assert loss.dtype == torch.float32 and loss_fn.last_global_loss.dtype == torch.float32
        assert loss.item() == pytest.approx(loss_fn.last_global_loss.item(), rel=1e-6)
        assert loss.item() == pytest.approx(ref, abs=0.01)  # bf16 scores carry ~2^-8 relative error


# --- clamping after the step, fixed temperatures as given (issue 16) ---------------------------------------------


@pytest.mark.parametrize("tiled", [False, True], ids=["infonce", "tiled"])
def test_temperature_at_the_bound_still_gets_its_gradient(tiled):
    """The clamp is not in forward: at log(1/tau) = log(max) the gradient is the true one, not 0 (CLIP clamps
    the parameter after the optimizer step: clamp_parameters_)."""
    q, docs = _random_inputs()
    cls = TiledInfoNCELoss if tiled else InfoNCELoss
    loss_fn = cls(temperature=0.001, learnable_temperature=True, max_inverse_temperature=100.0).double()
    assert loss_fn.log_inverse_temperature.item() == pytest.approx(math.log(100.0))  # starts at the bound
    loss_fn(q, docs).backward()
    p = {"log_inverse_temperature": loss_fn.log_inverse_temperature.detach().clone().requires_grad_()}
    ref_infonce(q.detach(), docs.detach(), p).backward()
    got = loss_fn.log_inverse_temperature.grad.item()
    assert got != 0.0
    assert got == pytest.approx(p["log_inverse_temperature"].grad.item(), rel=1e-10)
    # A step past the bound is clamped back by clamp_parameters_ (in place: the same Parameter object).
    param = loss_fn.log_inverse_temperature
    with torch.no_grad():
        param.add_(0.5)
    assert loss_fn.inverse_temperature().item() == pytest.approx(100.0 * math.exp(0.5))  # forward: unclamped
    assert loss_fn.clamp_parameters_() is loss_fn
    assert loss_fn.log_inverse_temperature is param and param.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        param.fill_(math.log(20.0))
    loss_fn.clamp_parameters_()
    assert param.item() == pytest.approx(math.log(20.0))  # inside the bound: untouched


def test_clamp_parameters_on_every_loss():
    """Every loss has clamp_parameters_ (a training loop calls it after each step); Matryoshka clamps its base."""
    base = InfoNCELoss(0.05, learnable_temperature=True, max_inverse_temperature=30.0)
    with torch.no_grad():
        base.log_inverse_temperature.fill_(5.0)
    MatryoshkaLoss(base, dims=(4, 8)).clamp_parameters_()
    assert base.log_inverse_temperature.item() == pytest.approx(math.log(30.0))
    siglip = SigmoidLoss(init_scale=1000.0, init_bias=-50.0)
    siglip.clamp_parameters_()  # SigLIP's scale and bias are not clamped
    assert siglip.log_scale.item() == pytest.approx(math.log(1000.0)) and siglip.bias.item() == -50.0
    for loss_fn in (InfoNCELoss(0.05), DecoupledContrastiveLoss(), DebiasedContrastiveLoss(), AUCLoss()):
        assert loss_fn.clamp_parameters_() is loss_fn


def test_fixed_temperature_is_used_as_given():
    """A fixed tau below 1 / max_inverse_temperature is no longer raised silently; invalid ones are refused."""
    q, docs = _random_inputs()
    qn, dn = F.normalize(q, dim=-1), F.normalize(docs.reshape(-1, 8), dim=-1)
    for tau in (0.001, 0.005, 0.05):
        loss = InfoNCELoss(temperature=tau)(q, docs)
        logits = qn @ dn.T / tau
        expected = F.cross_entropy(logits, torch.arange(5) * 3)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        assert InfoNCELoss(temperature=tau).inverse_temperature().item() == pytest.approx(1.0 / tau, rel=1e-12)
    for bad in (0.0, -0.05, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            InfoNCELoss(temperature=bad)
    with pytest.raises(ValueError, match="max_inverse_temperature must be > 0"):
        InfoNCELoss(max_inverse_temperature=0.0)
