"""The relearning attack on 2 gloo ranks, with evaluation partitioning the model: a trainable ZeRO-3 engine
(each rank 1/2 of the weights and of the AdamW state; the 3 rows of each step split 2 + 1 over the ranks)
ends with the weights and per-step losses of the one-process relearn of a whole fp32 copy, and its attack
result in ``evaluate_directory`` (forget and holdout scores, greedy answers) equals the one-process result.

Tolerance: both runs take the same AdamW steps (same lr schedule, clipping and rows) on the same fp32
weights; they differ only in how a step's gradient is summed (per rank, then averaged by DeepSpeed). Adam
divides each gradient element by its own magnitude, so an element whose gradient is near 0 turns that
rounding into an update of up to ``lr``; per weight tensor the difference between the two runs is at most
``1e-4`` of how far the relearn moved it (measured: 2.5e-5 at most), the losses agree to rel 1e-6, and the
scores of the attacked model to rel 1e-5."""

from __future__ import annotations

import math

import pytest
import torch
from multiproc import assert_nested_close, run_on_ranks

from dist_unlearn.data import generate_facts

STEPS, FRACTION, LR, MAX_LENGTH = 3, 0.5, 1e-3, 48


def _facts():
    return generate_facts(num_people=6, questions_per_person=1, forget_fraction=0.9, holdout_fraction=0.05, seed=3)


def _config(model_dir: str):
    from dist_unlearn.config import config_from_dict

    return config_from_dict(
        {
            "model": {"path": model_dir, "dtype": "fp32"},
            "data": {"max_length": MAX_LENGTH},
            "eval": {
                "attacks": ["relearn"],
                "relearn_steps": STEPS,
                "relearn_fraction": FRACTION,
                "relearn_lr": LR,
                "shard_weights": "true",
                "max_new_tokens": 4,
                "sampled_generations": 0,
            },
        }
    )


def _relearn(rank: int, world: int, model_dir: str) -> dict:
    """The relearn's losses and weights (gathered), what this rank held during it, and the attack's result
    in :func:`evaluate_directory` (which builds the relearned model through ``relearned_model``)."""
    import deepspeed

    from dist_unlearn.data import QADataset
    from dist_unlearn.eval.suite import evaluate_directory
    from dist_unlearn.models import inference
    from dist_unlearn.models.chunked_lm import unwrap_model
    from dist_unlearn.models.finetune import finetune, trainable_engine
    from dist_unlearn.models.inference import is_partitioned
    from dist_unlearn.models.loading import load_causal_lm, load_tokenizer

    inference.PERSISTENCE_THRESHOLD = 0  # every weight of the tiny model is partitioned, norms included

    def no_fallback(*_args):
        raise AssertionError("each rank should read its slices of the safetensors file, not transformers' path")

    inference._load_with_transformers_zero3 = no_fallback
    torch.manual_seed(1234 + rank)  # a different global RNG per rank must not change the relearn
    facts, tok = _facts(), load_tokenizer(model_dir)
    rows = facts.split("forget")[: math.ceil(FRACTION * len(facts.split("forget")))]
    if world > 1:
        model = trainable_engine(model_dir, "fp32", LR, STEPS)
    else:
        model = load_causal_lm(model_dir, torch.float32, "eager")
    losses = finetune(model, QADataset(rows, tok, MAX_LENGTH), tok.pad_token_id, STEPS, len(rows), LR, desc="relearn")
    assert is_partitioned(model) == (world > 1)
    params = list(model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    adam = 0
    if world > 1:  # the AdamW state this rank keeps: its partitions' moments
        adam = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in model.optimizer.optimizer.state.values())
    with deepspeed.zero.GatheredParameters(params, enabled=world > 1):
        weights = {name: p.detach().clone() for name, p in unwrap_model(model).named_parameters()}
    del model
    attack = evaluate_directory(_config(model_dir), model_dir, None, facts)["attacks"]["relearn"]
    return {"losses": losses, "weights": weights, "held": held, "adam": adam, "attack": attack}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from dist_unlearn.models import build_embedded_model

    model, tok = build_embedded_model(_facts().corpus(), vocab_size=300, hidden_size=32, num_layers=2, num_heads=2)
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_two_rank_zero3_relearn_equals_one_process(model_dir):
    from safetensors.torch import load_file

    forget = _facts().split("forget")
    assert math.ceil(FRACTION * len(forget)) == 3, "3 rows per step: split 2 + 1 over the ranks"
    single = _relearn(0, 1, model_dir)
    ranks = run_on_ranks(_relearn, 2, model_dir, timeout=300)
    saved = load_file(f"{model_dir}/model.safetensors")
    whole = single["held"]
    for r in ranks:
        assert r["losses"] == pytest.approx(single["losses"], rel=1e-6)
        assert r["held"] <= whole // 2 + 64, f"rank held {r['held']} of {whole} weights"
        assert 0 < r["adam"] <= 2 * (whole // 2 + 64), "AdamW moments of this rank's partitions only"
        moved = 0.0
        for name, weight in single["weights"].items():
            moved = max(moved, (weight - saved[name]).abs().max().item())
            rel = ((r["weights"][name] - weight).norm() / (weight - saved[name]).norm()).item()
            assert rel <= 1e-4, f"{name}: |w_2 − w_1| / |w_1 − w_0| = {rel:.1e}"
        assert moved > 1e-3, "the relearn moved the weights"
        assert_nested_close(r["attack"], single["attack"], "attack")
    forget_scores = single["attack"]["splits"]["forget"]
    assert forget_scores["count"] == len(forget) and "rouge" in forget_scores
