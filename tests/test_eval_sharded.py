"""The evaluation suite on 2 gloo ranks, with the model's weights ZeRO-3-partitioned over them (each rank
1/2 of the weights; examples and generations sharded too), gives the numbers and texts of one process
holding the whole model, in fp32 and in bf16; its token statistics equal a plain full-logits computation.

Tolerance: the partitioned forward runs on the very weights of the whole model (gathered, bit for bit),
so the only differences are the batches' compositions and padding (rank ``r`` scores examples
``r, r+2, ...``): fp32 agrees to rounding (rel 1e-5), and bf16 agrees to the same tolerance because the
scores are accumulated in fp32 from the same bf16 logits (the test shows it; a loose bf16 bound would hide
a wrong partition just as well as it hides rounding)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from multiproc import assert_nested_close, run_on_ranks

from dist_unlearn.data import QADataset, collate_qa, generate_facts
from dist_unlearn.eval.suite import EvalSettings, evaluate_model

SETTINGS = EvalSettings(sampled_generations=2, max_new_tokens=5, max_length=48, batch_size=3, shard_weights="true")
DTYPES = ("fp32", "bf16")
DTYPE_SETTINGS = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16", "generate": False}}
"""bf16 without generation (the fp32 run covers generation from partitioned weights), to keep the test short."""


def _facts():
    return generate_facts(num_people=6, questions_per_person=2, forget_fraction=0.34, holdout_fraction=0.34, seed=3)


def _evaluate(rank: int, world: int, model_dir: str) -> dict:
    """The suite's result per dtype, the model loaded as evaluation loads it (partitioned when world > 1)."""
    from dist_unlearn.eval.suite import load_for_eval
    from dist_unlearn.models import inference
    from dist_unlearn.models.inference import is_partitioned
    from dist_unlearn.models.loading import load_tokenizer

    inference.PERSISTENCE_THRESHOLD = 0  # every weight of the tiny model is gathered for each forward

    def no_fallback(*_args):
        raise AssertionError("each rank should read its slices of the safetensors file, not transformers' path")

    inference._load_with_transformers_zero3 = no_fallback

    torch.manual_seed(1234 + rank)  # a different global RNG per rank must not change sampled answers
    tok = load_tokenizer(model_dir)
    out = {}
    for dtype in DTYPES:
        settings = dataclasses.replace(SETTINGS, **DTYPE_SETTINGS[dtype])
        model = load_for_eval(model_dir, settings)
        assert is_partitioned(model) == (world > 1)
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
        dtypes = {(p.ds_tensor if hasattr(p, "ds_tensor") else p).dtype for p in model.parameters()}
        out[dtype] = {"result": evaluate_model(model, tok, _facts(), settings), "held": held, "dtypes": dtypes}
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from dist_unlearn.models import build_embedded_model

    model, tok = build_embedded_model(_facts().corpus(), vocab_size=300, hidden_size=32, num_layers=2, num_heads=2)
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_two_ranks_partitioned_equal_one_process(model_dir):
    from dist_unlearn.models.inference import DTYPES as TORCH_DTYPES

    singles = _evaluate(0, 1, model_dir)
    ranks = run_on_ranks(_evaluate, 2, model_dir, timeout=300)
    for dtype in DTYPES:
        single = singles[dtype]["result"]
        assert_nested_close(ranks[0][dtype]["result"], ranks[1][dtype]["result"])
        assert_nested_close(single, ranks[0][dtype]["result"])
        whole = singles[dtype]["held"]
        assert all(r[dtype]["held"] <= whole // 2 + 200 for r in ranks), "each rank holds about half the weights"
        assert all(r[dtype]["dtypes"] == {TORCH_DTYPES[dtype]} for r in (singles, *ranks))
    single = singles["fp32"]["result"]
    forget = single["splits"]["forget"]
    assert set(single["mia_auc"]) == {"loss", "zlib", "min_k", "min_k_pp"}
    assert 0 <= forget["sampled_leak"] <= forget["sampled_leak_upper95"] <= 1
    assert len(single["per_example"]["forget_truth_ratio"]) == forget["count"]


def test_token_statistics_equal_full_logits(model_dir):
    from dist_unlearn.eval.mia import score_answers
    from dist_unlearn.models.loading import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(model_dir, attn_implementation="eager"), load_tokenizer(model_dir)
    items = _facts().split("forget")
    ds = QADataset(items, tok, 48)
    rows = score_answers(model, ds, tok.pad_token_id, k=0.5, batch_size=2)
    batch = collate_qa(list(ds), tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    for i in range(len(ds)):
        target = batch["labels"][i, 1:]
        pos = target.ne(-100)
        tok_lp = logp[i, pos].gather(-1, target[pos].unsqueeze(-1)).squeeze(-1)
        p = logp[i, pos].exp()
        mu = (p * logp[i, pos]).sum(-1)
        sd = ((p * (logp[i, pos] - mu.unsqueeze(-1)) ** 2).sum(-1)).sqrt()
        count = math.ceil(0.5 * int(pos.sum()))
        assert float(rows[i, 0]) == pytest.approx(float(tok_lp.sum()), abs=1e-4)
        assert float(rows[i, 1]) == int(pos.sum())
        assert float(rows[i, 3]) == pytest.approx(float(tok_lp.sort().values[:count].mean()), abs=1e-4)
        z = (tok_lp - mu) / sd
        assert float(rows[i, 4]) == pytest.approx(float(z.sort().values[:count].mean()), abs=1e-3)


def test_auto_partitions_large_models_only(tmp_path, monkeypatch):
    """``eval.shard_weights=auto`` partitions a model whose weight files reach the threshold (and a hub name,
    whose size is unknown before loading); ``true`` / ``false`` decide for every model."""
    from dist_unlearn.eval import suite

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    monkeypatch.setattr(suite, "SHARD_WEIGHTS_AUTO_BYTES", 1001)
    assert not suite.partitions(str(tmp_path), "auto")
    assert suite.partitions(str(tmp_path), "true") and not suite.partitions("org/name", "false")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    assert suite.partitions(str(tmp_path), "auto")
    assert suite.partitions("org/name", "auto")


@pytest.mark.parametrize("loader", ["eval", "training"])
def test_loaded_head_gets_a_contiguous_input(model_dir, loader):
    """``logits_to_keep=1`` hands the head a strided ``[b, 1, H]`` view; the loaders' pre-hook (evaluation's
    and training's) copies it to a contiguous tensor (a strided bf16 input made torch's CPU matmul copy the
    weight once per row), with the logits unchanged."""
    from dist_unlearn.eval.suite import load_for_eval
    from dist_unlearn.models.loading import load_model_for_training

    if loader == "eval":
        model = load_for_eval(model_dir, dataclasses.replace(SETTINGS, dtype="bf16"))
    else:
        model = load_model_for_training(model_dir, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    ids = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits
        hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert len(seen) == 1 and seen[0].shape == (2, 1, hidden.shape[-1]) and seen[0].is_contiguous()
    assert torch.equal(logits, torch.nn.functional.linear(hidden[:, -1:].contiguous(), head.weight))
