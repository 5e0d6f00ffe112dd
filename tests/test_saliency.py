"""Saliency mask (SalUn-style): the global top-x% threshold, its ZeRO-3 partitioned form on 2 ranks
against a single-process computation, and training that leaves every weight outside the mask untouched."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from multiproc import run_on_ranks

from dist_unlearn.unlearning.saliency import forget_saliency_mask, global_kth_largest, rank_share

FRACTION = 0.1


def _model_and_forget():
    """The same seeded tiny Llama and forget examples in every process."""
    from dist_unlearn.data import QADataset, generate_facts
    from dist_unlearn.models import build_embedded_model

    facts = generate_facts(num_people=8, questions_per_person=2, forget_fraction=0.25, seed=1)
    torch.manual_seed(0)
    model, tok = build_embedded_model(facts.corpus(), vocab_size=400, hidden_size=32, num_layers=2, num_heads=2)
    items = list(QADataset(facts.split("forget"), tok, 48))
    assert len(items) == 4
    return model, items, tok.pad_token_id


def test_global_kth_largest_matches_sort() -> None:
    values = torch.rand(1000) * torch.logspace(-8, 2, 1000)
    ordered = values.sort(descending=True).values
    for k in (1, 7, 500, 1000):
        assert global_kth_largest(values, k, partitioned=False) == float(ordered[k - 1])
    with pytest.raises(ValueError, match="k must be"):
        global_kth_largest(values, 0, partitioned=False)


def _independent_mask(fraction: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Top-⌈x·P⌉ of |∇ mean_i NLL_i/|y_i|| by a plain sort over all parameters (no saliency code)."""
    from dist_unlearn.data import collate_qa
    from dist_unlearn.models.logprobs import sequence_stats

    model, items, pad = _model_and_forget()
    batch = collate_qa(items, pad)
    stats = sequence_stats(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    stats.mean_nll.mean().backward()
    grads = {n: p.grad.abs() for n, p in model.named_parameters()}
    flat = torch.cat([g.reshape(-1) for g in grads.values()])
    k = math.ceil(fraction * flat.numel())
    threshold = float(flat.sort(descending=True).values[k - 1])
    return {n: g >= threshold for n, g in grads.items()}, grads, threshold


def test_single_process_mask_equals_independent_sort() -> None:
    from dist_unlearn.data import collate_qa

    expected, _, threshold = _independent_mask(FRACTION)
    model, items, pad = _model_and_forget()
    mask = forget_saliency_mask(model, collate_qa(items, pad), len(items), FRACTION)
    assert mask.threshold == pytest.approx(threshold, rel=1e-5)
    got = mask.full_masks()
    mismatched = sum(int((got[n] != expected[n]).sum()) for n in expected)
    assert mismatched <= 2  # only float-rounding ties at τ may differ
    assert mask.selected == math.ceil(FRACTION * mask.total)
    assert all(p.grad is None for p in model.parameters())  # gradients cleared after the mask


def _ddp_mask(rank: int, world_size: int) -> dict:
    """The run's mask (:func:`saliency_mask_for_run`) of the tiny Llama wrapped in DDP, and the forget
    rows this rank put through the model for it."""
    from dist_unlearn.unlearning.saliency import saliency_mask_for_run

    model, items, pad = _model_and_forget()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rows = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: rows.append(len(kw["input_ids"])), with_kwargs=True)
    mask = saliency_mask_for_run(ddp, items, pad, FRACTION)
    handle.remove()
    return {
        "masks": mask.full_masks(),
        "rows": sum(rows),
        "grads_cleared": all(p.grad is None for p in model.parameters()),
    }


def _masked_training(rank: int, world_size: int, stage: int, steps: int) -> dict:
    """ZeRO-``stage`` engine (partitioning forced), mask from this rank's forget share, ``steps`` masked
    GA steps; returns the whole mask and the whole parameters before/after (and, in the same process
    group, :func:`_ddp_mask`)."""
    import deepspeed

    from dist_unlearn.data import collate_qa
    from dist_unlearn.engine.ds_config import build_deepspeed_config
    from dist_unlearn.unlearning import get_objective

    os.environ["LOCAL_RANK"] = str(rank)
    model, items, pad = _model_and_forget()
    share = collate_qa(rank_share(items, rank, world_size), pad)
    config = build_deepspeed_config(
        zero_stage=stage, micro_batch_size=len(share["labels"]), world_size=world_size, lr=1e-2
    )
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config, dist_init_required=False
    )

    def full_params() -> dict[str, torch.Tensor]:
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
            return {n: p.detach().clone() for n, p in params}

    before = full_params()
    mask = forget_saliency_mask(engine, share, len(items), FRACTION)
    masks = mask.full_masks()
    objective = get_objective("ga")
    first_grads = None
    for _ in range(steps):
        engine.backward(objective(engine, share).loss)
        if first_grads is None:  # the saliency backward must not leak into the first step
            first_grads = {
                n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
            }
        mask.apply(engine)
        engine.step()
    after = full_params()
    out = {
        "first_grads": first_grads,
        "masks": masks,
        "before": before,
        "after": after,
        "selected": mask.selected,
        "total": mask.total,
    }
    engine.destroy()
    out["ddp"] = _ddp_mask(rank, world_size)
    return out


@functools.cache
def _two_rank_results() -> list[dict]:
    """One 2-rank spawn for the module: ZeRO-3 masked training, then the DDP mask."""
    return run_on_ranks(_masked_training, 2, 3, 3, timeout=300)


def test_zero3_mask_on_two_ranks_equals_single_process_and_freezes_the_rest() -> None:
    expected, grads, threshold = _independent_mask(FRACTION)
    r0, r1 = _two_rank_results()
    total = sum(g.numel() for g in grads.values())
    assert r0["total"] == total and r0["selected"] == r1["selected"] == math.ceil(FRACTION * total)
    for name, want in expected.items():
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        differ = r0["masks"][name] != want
        # a mismatch is allowed only for a float-rounding tie at the threshold
        assert torch.allclose(grads[name][differ], torch.full_like(grads[name][differ], threshold), rtol=1e-4), name
    mismatched = sum(int((r0["masks"][n] != expected[n]).sum()) for n in expected)
    assert mismatched <= 2
    for name, grad in grads.items():  # GA gradient = −(forget NLL gradient), saliency pass cleared
        torch.testing.assert_close(r0["first_grads"][name].abs(), grad, rtol=1e-4, atol=1e-7, msg=name)
    moved = 0
    for name, mask in r0["masks"].items():
        delta = r0["after"][name] - r0["before"][name]
        assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask])), f"{name} changed outside the mask"
        moved += int((delta[mask] != 0).sum())
    assert moved > 0.9 * r0["selected"]  # the salient weights did train


def test_ddp_mask_scores_each_rank_share_and_equals_single_process() -> None:
    """Under DDP (the HF Trainer's path without DeepSpeed) each rank puts only its share of the forget set
    through the model (2 of 4 examples) and DDP's all-reduce averages the gradients, so both ranks hold
    exactly the mask one process computes from all 4 examples (from the same 2-rank spawn as the ZeRO-3
    test above, whose results are cached)."""
    from dist_unlearn.data import collate_qa

    model, items, pad = _model_and_forget()
    expected = forget_saliency_mask(model, collate_qa(items, pad), len(items), FRACTION).full_masks()
    for rank, result in enumerate(_two_rank_results()):
        ddp = result["ddp"]
        assert ddp["rows"] == len(rank_share(items, rank, 2)) == 2, rank
        assert ddp["grads_cleared"], rank
        assert ddp["masks"].keys() == expected.keys()  # names of the module inside DDP
        for name, mask in expected.items():
            assert torch.equal(ddp["masks"][name], mask), (rank, name)


def test_lora_a_with_zero_gradient_is_not_ranked_and_warned() -> None:
    """PEFT starts LoRA with lora_B = 0, so every lora_A gradient is exactly 0: those tensors are left out
    of the ranking (kept trainable, with a warning); the mask over the rest equals a plain sort."""
    from dist_unlearn.data import collate_qa
    from dist_unlearn.models.logprobs import sequence_stats
    from dist_unlearn.models.lora import add_lora

    def lora_model():
        model, items, pad = _model_and_forget()
        torch.manual_seed(1)
        return add_lora(model, "causal_lm", r=4), items, pad

    # independent: gradients by a plain backward, then a sort over the tensors whose gradient is not all zero
    model, items, pad = lora_model()
    batch = collate_qa(items, pad)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    sequence_stats(out.logits, batch["labels"]).mean_nll.mean().backward()
    grads = {n: p.grad.abs() for n, p in model.named_parameters() if p.requires_grad}
    a_names = [n for n in grads if "lora_A" in n]
    assert a_names and all(float(grads[n].max()) == 0.0 for n in a_names)  # the structural zero
    b = {n: g for n, g in grads.items() if n not in a_names}
    assert all(float(g.max()) > 0 for g in b.values())
    flat = torch.cat([g.reshape(-1) for g in b.values()])
    k = math.ceil(FRACTION * flat.numel())
    threshold = float(flat.sort(descending=True).values[k - 1])

    model, items, pad = lora_model()
    with pytest.warns(UserWarning, match="identically zero forget gradient.*lora_B = 0.*lora_A"):
        mask = forget_saliency_mask(model, collate_qa(items, pad), len(items), FRACTION)
    got = mask.full_masks()
    assert set(got) == set(grads)
    assert set(mask.unranked) == set(a_names)
    assert all(bool(got[n].all()) for n in a_names)  # not masked out: the old rule dropped every one of them
    assert mask.threshold == pytest.approx(threshold, rel=1e-5)
    mismatched = sum(int((got[n] != (g >= threshold)).sum()) for n, g in b.items())
    assert mismatched <= 2  # only float-rounding ties at τ may differ
    a_weights = sum(grads[n].numel() for n in a_names)
    assert mask.ranked == flat.numel() and mask.total == flat.numel() + a_weights
    assert mask.selected - a_weights == pytest.approx(k, abs=2)


def test_all_zero_gradient_is_refused() -> None:
    from dist_unlearn.unlearning.saliency import SaliencyMask

    layer = torch.nn.Linear(3, 2)
    (layer(torch.ones(1, 3)) * 0).sum().backward()
    with pytest.raises(ValueError, match="zero for every trainable weight"):
        SaliencyMask.from_gradients(layer, 0.5)
