"""Robustness options (``method.robust``): the sharpness-aware unlearning step against a hand-computed
reference, on LoRA, and on 2 ZeRO-3 ranks against one process; SURE's saliency fraction and learning
rate; config errors that name the field."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from multiproc import run_on_ranks

from dist_unlearn.unlearning import UnlearnBatch, get_objective
from dist_unlearn.unlearning.robust import SharpnessAware, robust_plan
from dist_unlearn.unlearning.saliency import forget_saliency_mask, rank_share

RHO = 0.05
LR = 1.0  # SGD step of the ZeRO-3 test: θ − g, far from θ + δ − g if the weights were not restored


def _model_and_data():
    """The same seeded tiny Llama, 4 forget and 4 retain examples in every process."""
    from dist_unlearn.data import QADataset, generate_facts
    from dist_unlearn.models import build_embedded_model

    facts = generate_facts(num_people=8, questions_per_person=2, forget_fraction=0.25, seed=1)
    torch.manual_seed(0)
    model, tok = build_embedded_model(facts.corpus(), vocab_size=400, hidden_size=32, num_layers=2, num_heads=2)
    forget = list(QADataset(facts.split("forget"), tok, 48))
    retain = list(QADataset(facts.split("retain"), tok, 48))[:4]
    assert len(forget) == 4 and len(retain) == 4
    return model, forget, retain, tok.pad_token_id


def _mean_nll(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """mean_i NLL(y_i|x_i)/|y_i| from plain logits (no project code beyond the model)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1), reduction="none"
    ).view(labels.shape)
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def _hand_sam_grad_diff(model, fb, rb, rho: float) -> dict[str, torch.Tensor]:
    """GradDiff (L_f = −NLL_f, L_r = NLL_r, γ = α = 1) under SAM by plain autograd:
    g = ∇L_f(θ), δ = ρ·g/‖g‖, result = ∇L_f(θ+δ) + ∇L_r(θ)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(-_mean_nll(model, fb), params)
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
    shifted = copy.deepcopy(model)
    shifted_params = [p for p in shifted.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, x in zip(shifted_params, g, strict=True):
            p += rho * x / norm
    g_f = torch.autograd.grad(-_mean_nll(shifted, fb), shifted_params)
    g_r = torch.autograd.grad(_mean_nll(model, rb), params)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: a + b for n, a, b in zip(names, g_f, g_r, strict=True)}


def test_sam_gradient_equals_hand_computed_reference_and_restores_weights() -> None:
    from dist_unlearn.data import collate_qa

    model, forget, retain, pad = _model_and_data()
    fb, rb = collate_qa(forget, pad), collate_qa(retain, pad)
    expected = _hand_sam_grad_diff(model, fb, rb, RHO)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    out = SharpnessAware(RHO).backward(model, get_objective("grad_diff"), UnlearnBatch(forget=fb, retain=rb))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} not restored exactly"
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert out.logs["forget_loss_perturbed"] > out.logs["forget_loss"]  # δ ascends the forget loss
    assert out.loss.item() == pytest.approx(out.logs["forget_loss_perturbed"] + out.logs["retain_loss"])


@pytest.mark.parametrize("name", ["npo", "simnpo_gd"])
def test_sam_composes_with_other_objectives(name: str) -> None:
    """Any objective: the SAM gradient is its own forget gradient at θ + ρ·g/‖g‖ plus its retain gradient at θ."""
    from dist_unlearn.data import collate_qa

    model, forget, retain, pad = _model_and_data()
    batch = UnlearnBatch(forget=collate_qa(forget, pad), retain=collate_qa(retain, pad))
    ref = torch.tensor([-20.0, -25.0, -18.0, -30.0])  # log π_ref of the forget answers (npo)
    objective = get_objective(name, retain_weight=0.5)
    forget_only = get_objective(name, retain_weight=0.0)
    reference = ref if objective.needs_reference else None

    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(forget_only(model, batch, reference=reference).loss, params)
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, x in zip(shifted.parameters(), g, strict=True):
            p += RHO * x / norm
    expected = [
        a.clone()
        for a in torch.autograd.grad(forget_only(shifted, batch, reference=reference).loss, shifted.parameters())
    ]
    if objective.uses_retain:
        retain_only = get_objective(name, forget_weight=0.0, retain_weight=0.5)
        for e, r in zip(expected, torch.autograd.grad(retain_only(model, batch, reference=reference).loss, params)):
            e += r

    SharpnessAware(RHO).backward(model, objective, batch, reference)
    for (n, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7, msg=n)


def test_sam_with_lora_perturbs_and_updates_adapters_only() -> None:
    from dist_unlearn.data import collate_qa
    from dist_unlearn.models.lora import add_lora

    model, forget, retain, pad = _model_and_data()
    torch.manual_seed(1)
    model = add_lora(model, "causal_lm", r=4)
    with torch.no_grad():  # a non-zero B so that every adapter weight has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    seen: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(lambda m, a: seen.append({n: p.detach().clone() for n, p in m.named_parameters()}))

    batch = UnlearnBatch(forget=collate_qa(forget, pad), retain=collate_qa(retain, pad))
    SharpnessAware(RHO).backward(model, get_objective("grad_diff"), batch)
    assert len(seen) == 3  # forget at θ, forget at θ + δ, retain at θ
    perturbed = seen[1]
    for n in theta:
        if n not in trainable:
            assert torch.equal(perturbed[n], theta[n]), f"frozen {n} was perturbed"
    radius = math.sqrt(sum(float(((perturbed[n] - theta[n]).double() ** 2).sum()) for n in trainable))
    assert radius == pytest.approx(RHO, rel=1e-4)  # ‖δ‖ = ρ over the adapters
    assert all(torch.equal(seen[2][n], theta[n]) for n in theta)  # restored before the retain pass

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    optimizer.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), theta[n])
        assert changed == (n in trainable), n


def _sam_steps(rank: int, world_size: int, persistence: int, stages: tuple[int, ...]) -> dict:
    """Per ZeRO stage: an engine (ZeRO-3: small parameters kept whole when ``persistence`` > their size),
    this rank's half of the global batch, one SAM GradDiff step with SGD; whole gradients before the
    step, whole weights after."""
    import deepspeed

    from dist_unlearn.data import collate_qa
    from dist_unlearn.engine.ds_config import build_deepspeed_config

    os.environ["LOCAL_RANK"] = str(rank)
    results = {}
    for stage in stages:
        model, forget, retain, pad = _model_and_data()
        fb = collate_qa(rank_share(forget, rank, world_size), pad)
        rb = collate_qa(rank_share(retain, rank, world_size), pad)
        config = build_deepspeed_config(
            zero_stage=stage, micro_batch_size=len(fb["labels"]), world_size=world_size, lr=LR, grad_clip=0.0
        )
        config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
        del config["optimizer"]  # plain SGD: the step shows the restored weights without Adam's 0/0 sensitivity
        config["zero_allow_untested_optimizer"] = True
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config, dist_init_required=False
        )
        params = list(engine.module.named_parameters())
        persistent = sorted(n for n, p in params if getattr(p, "ds_persist", False))
        batch = UnlearnBatch(forget=fb, retain=rb)
        out = SharpnessAware(RHO).backward(engine, get_objective("grad_diff"), batch)
        grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in params}
        engine.step()
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
            after = {n: p.detach().clone() for n, p in params}
        engine.destroy()
        results[stage] = {"grads": grads, "after": after, "persistent": persistent, "loss": out.logs["loss"]}
    return results


def test_zero_stages_on_two_ranks_equal_one_process() -> None:
    """ZeRO-3 (with partitioned and persistent whole parameters), ZeRO-2 and ZeRO-0 on 2 ranks: the SAM
    gradient and the weights after one SGD step equal one process on the global batch."""
    from dist_unlearn.data import collate_qa

    model, forget, retain, pad = _model_and_data()
    batch = UnlearnBatch(forget=collate_qa(forget, pad), retain=collate_qa(retain, pad))
    out = SharpnessAware(RHO).backward(model, get_objective("grad_diff"), batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=LR).step()

    # 64: the 32-wide norm weights stay whole on every rank (persistent), the matrices are partitioned
    r0, r1 = run_on_ranks(_sam_steps, 2, 64, (3, 2, 0), timeout=600)
    assert r0[3]["persistent"] and len(r0[3]["persistent"]) < len(grads)
    for stage in (3, 2, 0):
        assert r0[stage]["loss"] + r1[stage]["loss"] == pytest.approx(2 * out.logs["loss"], rel=1e-5)
        for name, p in model.named_parameters():
            got = r0[stage]
            torch.testing.assert_close(got["grads"][name], grads[name], rtol=1e-5, atol=1e-6, msg=f"{stage} {name}")
            torch.testing.assert_close(got["after"][name], p.detach(), rtol=1e-5, atol=1e-6, msg=f"{stage} {name}")
            assert torch.equal(got["after"][name], r1[stage]["after"][name]), f"{stage} {name}"


def test_sure_trains_only_the_salient_fraction_at_the_multiplied_lr() -> None:
    from dist_unlearn.config import config_from_dict
    from dist_unlearn.config.loader import apply_overrides
    from dist_unlearn.data import collate_qa

    cfg = config_from_dict(apply_overrides({}, ["method.robust=sure", "train.lr=1e-4"]))
    plan = robust_plan(cfg)
    assert plan.sam is None and plan.saliency == 0.1 and plan.lr == pytest.approx(1e-3)
    cfg = config_from_dict(apply_overrides({}, ["method.robust=sure", "method.robust.fraction=0.05", "train.lr=1e-4"]))
    assert robust_plan(cfg).saliency == 0.05
    cfg = config_from_dict(apply_overrides({}, ["train.lr=1e-4", "method.saliency=0.3"]))
    assert (robust_plan(cfg).saliency, robust_plan(cfg).lr) == (0.3, 1e-4)  # none: as configured

    model, forget, retain, pad = _model_and_data()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    fb, rb = collate_qa(forget, pad), collate_qa(retain, pad)
    mask = forget_saliency_mask(model, fb, len(forget), plan.saliency)
    masks = mask.full_masks()
    assert mask.selected == math.ceil(0.1 * mask.total)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0)
    get_objective("grad_diff")(model, UnlearnBatch(forget=fb, retain=rb)).loss.backward()
    mask.apply(model)
    optimizer.step()
    moved, largest = 0, 0.0
    for n, p in model.named_parameters():
        delta = (p.detach() - theta[n]).abs()
        assert torch.equal(delta[~masks[n]], torch.zeros_like(delta[~masks[n]])), f"{n} changed outside the mask"
        moved += int((delta[masks[n]] > 0).sum())
        largest = max(largest, float(delta.max()))
    assert moved > 0.9 * mask.selected
    # Adam's first step moves a weight by lr·|g|/(|g|+ε) ≈ lr: the multiplied rate, not train.lr
    assert largest == pytest.approx(plan.lr, rel=1e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.robust=sam", "method.robust.rho=0"], "method.robust.rho: must be > 0"),
        (["method.robust.rho=-1"], "method.robust.rho: must be > 0"),
        (["method.robust=smooth"], "method.robust.name: 'smooth' is not one of none, sam, sure"),
        (["method.robust=sure", "method.robust.fraction=1"], "method.robust.fraction: must be > 0.0 and < 1.0"),
        (["method.robust=sure", "method.robust.fraction=null"], "method.robust.fraction: expected"),
        (["method.robust=sure", "method.robust.lr_multiplier=0.5"], "method.robust.lr_multiplier: must be >= 1.0"),
        (["method.robust=sure", "method.saliency=0.5"], "method.saliency=0.5 with method.robust=sure"),
        (["method.robust=sure", "train.weight_decay=0.01"], "method.robust=sure with train.weight_decay=0.01"),
        (["method.robust=sam", "job.kind=continual", "model.lora.r=4", "deepspeed.zero_stage=2"], "job.kind=continual"),
        (["method.robust.rh=0.1"], "unknown key 'method.robust.rh'; did you mean 'method.robust.rho'"),
    ],
)
def test_bad_robust_settings_are_refused_naming_the_field(overrides: list[str], message: str) -> None:
    from dist_unlearn.config import ConfigError, config_from_dict
    from dist_unlearn.config.loader import apply_overrides

    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides({}, overrides))
    assert message in str(info.value)
    assert len(info.value.problems) == 1, info.value.problems


def test_sam_radius_is_checked_in_code_too() -> None:
    with pytest.raises(ValueError, match="method.robust.rho"):
        SharpnessAware(0.0)


def test_hf_trainer_sam_step_equals_the_shared_function(tmp_path) -> None:
    """``UnlearningTrainer(robust="sam")`` (plain Trainer path, SGD, no clipping): one step moves the weights
    by −lr × the SAM gradient of the same batch, computed by :class:`SharpnessAware` on a copy."""
    from transformers import TrainingArguments

    from dist_unlearn.integrations.hf import UnlearningTrainer

    model, forget, retain, pad = _model_and_data()
    reference_model = copy.deepcopy(model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=forget,
        retain_dataset=retain,
        objective="grad_diff",
        pad_token_id=pad,
        robust=SharpnessAware(RHO),
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None),
    )
    batch = trainer.unlearn_batches.batch(0, "cpu")
    trainer.train()

    SharpnessAware(RHO).backward(reference_model, get_objective("grad_diff"), batch)
    for (n, p), (_, q) in zip(model.named_parameters(), reference_model.named_parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach() - 0.5 * q.grad, rtol=1e-5, atol=1e-6, msg=n)
    logged = [row for row in trainer.state.log_history if "forget_loss_perturbed" in row]
    assert logged, trainer.state.log_history


def test_hf_trainer_refuses_sure_and_unknown_robust_naming_the_argument(tmp_path) -> None:
    from transformers import TrainingArguments

    from dist_unlearn.integrations.hf import UnlearningTrainer

    model, forget, retain, pad = _model_and_data()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    for robust, message in (("sure", r"robust: 'sure' .* Fix: .*SaliencyCallback"), ("smooth", "robust: expected")):
        with pytest.raises(ValueError, match=message):
            UnlearningTrainer(
                model, args, forget_dataset=forget, retain_dataset=retain, objective="grad_diff", robust=robust
            )
    assert not (tmp_path / "out").exists()
