"""Quantized (bitsandbytes, CPU) base weights with LoRA adapters under DeepSpeed: config checks, exact
GradCache gradients of an nf4 MiniLM on 2 ZeRO-2 ranks, and QLoRA unlearning of the embedded tiny Llama
on 2 ZeRO-3 ranks through the CLI (export merged into a plain model)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import NF4_STEPS
from multiproc import run_on_ranks

from dist_unlearn.config import ConfigError, config_from_dict
from dist_unlearn.config.schema import LoraSettings

GLOBAL_BATCH, WORLD, CHUNK = 8, 2, 2
LORA = LoraSettings(r=4, alpha=8)


# --- config -----------------------------------------------------------------------------------


def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return info.value.problems


def test_int8_with_zero3_is_refused_before_any_work() -> None:
    problems = _problems({"model": {"quantization": "int8", "lora": {"r": 8}}, "deepspeed": {"zero_stage": 3}})
    assert len(problems) == 1
    assert "8-bit base weights with ZeRO-3 are reported to train badly" in problems[0]
    assert "Fix: use model.quantization=nf4 or deepspeed.zero_stage=2" in problems[0]
    cfg = config_from_dict({"model": {"quantization": "int8", "lora": {"r": 8}}, "deepspeed": {"zero_stage": 2}})
    assert cfg.model.quantization == "int8" and cfg.model.lora.r == 8


def test_quantization_needs_lora_and_nested_keys_are_checked() -> None:
    (problem,) = _problems({"model": {"quantization": "nf4"}})
    assert "quantized base weights are frozen: set model.lora.r, e.g. model.lora.r=8" in problem
    (problem,) = _problems({"model": {"quantization": "nf4", "lora": {"r": 8, "rr": 8}}})
    assert problem.startswith("unknown key 'model.lora.rr'; did you mean 'model.lora.r'?")
    cfg = config_from_dict({"model": {"lora": {"r": 8, "targets": "q_proj, v_proj"}}})
    assert cfg.model.lora == LoraSettings(r=8, targets=["q_proj", "v_proj"])


# --- bitsandbytes' processor-dependent CPU path ---------------------------------------------------


def test_suite_runs_as_on_a_cpu_with_avx512_bf16() -> None:
    """The suite forces bitsandbytes' AVX512-BF16 decision on (tests/force_bnb_cpu_fastpath)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32, quant_storage=torch.float32)
    assert layer.support_avx512bf16_for_cpu is True


@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16])
def test_nf4_model_keeps_its_weight_layout_in_no_grad_forwards_and_saves(storage_dtype) -> None:
    """An inference-style forward (eval mode, no grad) of a model loaded by the project computes the
    same as a training-mode forward, leaves the 4-bit storage untouched and the state dict savable."""
    from dist_unlearn.models.encoders import encoder_path
    from dist_unlearn.models.loading import load_model_for_training

    model = load_model_for_training(encoder_path("embedded"), "encoder", storage_dtype, "eager", "nf4", LORA)
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    before = {id(m): m.weight.data.view(torch.uint8).clone() for m in layers}  # packed bytes (may hold NaN bits)
    queries, _ = _batches()
    model.eval()
    for m in layers:  # training mode for the 4-bit layers only (dropout stays off)
        m.train()
    with torch.no_grad():
        trained_mode = _encode(model, queries)
    model.eval()
    with torch.no_grad():
        inference_mode = _encode(model, queries)
    assert torch.equal(trained_mode, inference_mode)
    for m in layers:
        assert m.weight.data.dtype == storage_dtype and torch.equal(m.weight.data.view(torch.uint8), before[id(m)])
    state = model.state_dict()
    assert any(k.endswith("weight.quant_state.bitsandbytes__nf4") for k in state)


# --- GradCache on an nf4 encoder with LoRA: 2 ZeRO-2 ranks == one process ----------------------------


def _nf4_minilm() -> torch.nn.Module:
    """The bundled MiniLM, nf4 base + LoRA, dropout off, adapters set to seeded non-zero values (so
    that every adapter weight gets a non-zero gradient)."""
    from dist_unlearn.models.encoders import encoder_path
    from dist_unlearn.models.loading import load_model_for_training

    model = load_model_for_training(encoder_path("embedded"), "encoder", torch.float32, "eager", "nf4", LORA)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


def _batches() -> tuple[dict, dict]:
    from transformers import AutoTokenizer

    from dist_unlearn.models.encoders import encoder_path, tokenize

    tok = AutoTokenizer.from_pretrained(encoder_path("embedded"))
    people = ["Ada", "Bram", "Cleo", "Dara", "Eli", "Fenna", "Gus", "Hale"][:GLOBAL_BATCH]
    queries = tokenize(tok, [f"Where was {p} born?" for p in people], 24)
    docs = tokenize(tok, [f"{p} was born in the town number {i}." for i, p in enumerate(people)], 24)
    return queries, docs


def _encode(module, chunk):
    from dist_unlearn.models.encoders import encode_batch

    return encode_batch(module, chunk, "mean")


def _grad_cache_rank(rank: int, world: int, queries: dict, docs: dict) -> dict[str, torch.Tensor]:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from dist_unlearn.contrastive import GradCache, InfoNCELoss
    from dist_unlearn.engine.ds_config import build_deepspeed_config

    os.environ["LOCAL_RANK"] = str(rank)
    model = _nf4_minilm()
    per_rank = GLOBAL_BATCH // world
    config = build_deepspeed_config(zero_stage=2, micro_batch_size=per_rank, world_size=world, lr=1e-3)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=config,
        dist_init_required=False,
    )
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    mine = [{k: v[rows] for k, v in batch.items()} for batch in (queries, docs)]
    GradCache(engine, CHUNK, InfoNCELoss(temperature=0.05, cross_rank=True), encode=_encode).step(*mine)
    return {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_nf4_lora_grad_cache_two_zero2_ranks_equal_one_process() -> None:
    from dist_unlearn.contrastive import InfoNCELoss

    queries, docs = _batches()
    model = _nf4_minilm()
    loss = InfoNCELoss(temperature=0.05, cross_rank=False)(_encode(model, queries), _encode(model, docs))
    loss.backward()
    reference = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert reference and all("lora_" in n for n in reference)
    assert {type(m).__name__ for m in model.modules()} >= {"Linear4bit"}

    ranks = run_on_ranks(_grad_cache_rank, WORLD, queries, docs, timeout=300)
    for grads in ranks:
        assert grads.keys() == reference.keys()
        for name, ref in reference.items():
            assert float(ref.norm()) > 0, name
            rel = float((grads[name] - ref).norm() / ref.norm())
            assert rel < 1e-4, (name, rel)


# --- QLoRA unlearning end to end: nf4 tiny Llama, ZeRO-3, 2 torchrun ranks ---------------------------


@pytest.mark.slow
def test_nf4_lora_unlearning_zero3_two_ranks_through_the_cli(nf4_torchrun_run, small_target) -> None:
    run_dir = nf4_torchrun_run / "grad_diff"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == 3
    before, after = metrics["before"]["forget"], metrics["after"]["forget"]
    assert after["nll"] > before["nll"] and after["prob"] < before["prob"], (before, after)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, NF4_STEPS + 1))

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run_dir / "model"
    config = json.loads((export / "config.json").read_text())
    assert "quantization_config" not in config
    assert (export / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    assert model(**tok("Question: hi", return_tensors="pt")).logits.shape[-1] == len(tok)
    assert not any("lora" in name for name, _ in model.named_parameters())
    # the adapters were merged into the attention projections; everything else is the base
    exported = load_file(str(export / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(small_target).state_dict()
    changed = {k for k in exported if not torch.equal(exported[k], base[k].to(exported[k].dtype))}
    assert changed and all(k.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for k in changed), changed
