"""``SentenceTransformerTrainer`` + ``GradCacheInfoNCELoss``: one SGD step on 2 ranks equals one process.

Two CPU ranks (``torchrun``, gloo) each run sentence-transformers' own Trainer on half of an 8-row global batch
(anchor, positive, hard negative) with mini-batches of 3 rows, under DeepSpeed ZeRO-2, ZeRO-3 and DDP, with a
learnable temperature. The reference is independent of the code under test: ONE process encodes the whole global
batch with grad, computes InfoNCE from its formula (cosine scores times ``exp(log(1/tau))``, cross-entropy against
each anchor's positive among all 16 candidates), calls ``backward`` once and applies the SGD step by hand. After
the step every weight of the model AND the temperature must agree within 1e-5 relative on every rank.

The module is also the script that ``torchrun`` runs (``python -m torch.distributed.run ... THIS_FILE OUT``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

sentence_transformers = pytest.importorskip("sentence_transformers")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HIDDEN = 16
LR = 0.5
TEMPERATURE = 0.1
MINI_BATCH = 3
PER_RANK = 4  # 2 ranks x 4 rows = the 8-row global batch
TOL = 1e-5
BOUND = 10.1  # max 1/tau for the clamp case: the start (1/0.1 = 10) is below it, step 1 takes it above
UPDATE_TOL = 1e-3  # of the update lr * grad itself, in float32 (the weights are compared at TOL)
SETUPS = ("ddp", "zero2", "zero3")  # DDP first: TrainingArguments(deepspeed=...) leaves process-wide state

ANCHORS = [
    "the cat sat on the mat",
    "a dog barked at night",
    "rain fell over the town",
    "she plays the violin",
    "the market opens at nine",
    "he fixed the old bicycle",
    "snow covered the mountain",
    "they sailed across the bay",
]
POSITIVES = [
    "a cat was sitting on a mat",
    "at night the dog was barking",
    "the town got a lot of rain",
    "the violin is her instrument",
    "trading starts at nine",
    "the bicycle was repaired by him",
    "the peak was white with snow",
    "their boat crossed the bay",
]
NEGATIVES = [
    "stock prices fell sharply",
    "the violin was out of tune",
    "a cat chased a mouse",
    "the mountain road was closed",
    "he sold his car",
    "rain is forecast for monday",
    "they stayed at home",
    "the dog slept all day",
]


# --- the model: a 2-layer BERT built from a config, with all-MiniLM-L6-v2's tokenizer -------------------------


def make_model_dir(path: Path) -> Path:
    """A tiny BERT (random, seeded, dropout 0) and the packaged tokenizer, saved for sentence-transformers."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dist_unlearn.models.encoders import encoder_path

    tokenizer = AutoTokenizer.from_pretrained(encoder_path("embedded"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_model(path: Path) -> Any:
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(path), max_seq_length=32)
    return SentenceTransformer(modules=[transformer, models.Pooling(HIDDEN, "mean")], device="cpu")


def full_weights(model: Any, engine: Any = None) -> dict[str, torch.Tensor]:
    """Every parameter of the SentenceTransformer (whole tensors, float64), gathered from ZeRO partitions."""
    if engine is not None and hasattr(engine, "zero_optimization_stage"):
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().double().clone() for n, p in model.named_parameters()}
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


# --- the independent one-process reference ------------------------------------------------------------


def reference(model_dir: Path, steps: int = 1, bound: float | None = None) -> dict[str, torch.Tensor]:
    """The whole global batch in one process: InfoNCE from its formula, one backward, SGD by hand (per step; with
    ``bound``, ``log(1/tau)`` is clamped at ``log(bound)`` after every step but the last, as CLIP does)."""
    import torch.nn.functional as F

    from dist_unlearn.integrations.sentence_transformers import TEMPERATURE_KEY

    model = load_model(model_dir)
    model.train()
    log_t = torch.tensor(-torch.log(torch.tensor(TEMPERATURE)).item(), requires_grad=True)

    def embed(texts: list[str]) -> torch.Tensor:
        features = model.preprocess(texts)
        return model(features)["sentence_embedding"]

    losses = []
    for step in range(steps):
        q, p, n = embed(ANCHORS), embed(POSITIVES), embed(NEGATIVES)
        docs = torch.stack([p, n], dim=1).reshape(-1, HIDDEN)  # per anchor [positive, negative]
        scores = F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T
        loss = F.cross_entropy(scores * log_t.exp(), torch.arange(len(ANCHORS)) * 2)
        loss.backward()
        losses.append(loss.detach().double())
        with torch.no_grad():  # parameters without a gradient (BERT's pooler: unused by mean pooling) do not move
            for w in [*model.parameters(), log_t]:
                if w.grad is not None:
                    w -= LR * w.grad
                    w.grad = None
            if bound is not None and step < steps - 1:
                log_t.clamp_(max=math.log(bound))
    out = {n: w.detach().double().clone() for n, w in model.named_parameters()}
    out[TEMPERATURE_KEY] = log_t.detach().double().clone()
    out["__loss__"] = losses[0]
    return out


# --- what each rank runs ----------------------------------------------------------------------------------


def ds_config(stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


def train_one_step(
    setup: str,
    model_dir: Path,
    out_dir: Path,
    per_device: int = PER_RANK,
    accumulation: int = 1,
    steps: int = 1,
    bound: float = 100.0,
) -> dict[str, Any]:
    """sentence-transformers' Trainer, our loss, one SGD step on this rank's rows; the weights afterwards."""
    from accelerate.state import AcceleratorState, PartialState
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from dist_unlearn.integrations.sentence_transformers import TEMPERATURE_KEY, GradCacheInfoNCELoss

    AcceleratorState._reset_state(True)  # a fresh accelerate state per set-up (one process runs several)
    PartialState._reset_state()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    model = load_model(model_dir)
    loss = GradCacheInfoNCELoss(
        model,
        mini_batch_size=MINI_BATCH,
        temperature=TEMPERATURE,
        learnable_temperature=True,
        max_inverse_temperature=bound,
        check_replay=True,
    )
    data = Dataset.from_dict({"anchor": ANCHORS, "positive": POSITIVES, "negative": NEGATIVES})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / setup),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        deepspeed=ds_config(int(setup.removeprefix("zero"))) if setup.startswith("zero") else None,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    engine = trainer.model_wrapped if setup.startswith("zero") else None
    weights = full_weights(model, engine)
    kind = type(trainer.model_wrapped).__name__
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    del trainer
    return {"weights": weights, "wrapper": kind, "logged_loss": logged, "seconds": seconds, "key": TEMPERATURE_KEY}


def main(out_dir: str) -> None:
    """torchrun entry: every set-up on this rank, results to OUT/rank<R>.pt."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(out_dir)
    results = {setup: train_one_step(setup, out / "model", out) for setup in SETUPS}
    # 2 steps with the temperature bound just above its start: after step 1 it is past the bound, and the clamp
    # at step 2's start must act on ZeRO's fp32 master copy (ZeRO-3: its partitions) and on the working copy
    for setup in ("zero2", "zero3"):
        results[f"{setup}-clamp"] = train_one_step(setup, out / "model", out, steps=2, bound=BOUND)
    torch.save(results, out / f"rank{int(os.environ['RANK'])}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the tests ------------------------------------------------------------------------------------------------


def rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    scale = max(w.abs().max().item() for w in want.values())
    return max((got[n] - want[n]).abs().max().item() for n in want) / scale


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("st_trainer")
    make_model_dir(out / "model")
    # the suite's PYTHONPATH stays on it (tests/force_bnb_cpu_fastpath: no JIT build of DeepSpeed's shm op)
    path = os.pathsep.join((str(REPO), os.environ["PYTHONPATH"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    start = time.perf_counter()
    run = subprocess.run([*command, __file__, str(out)], capture_output=True, text=True, env=env, cwd=out, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    initial = full_weights(load_model(out / "model"))
    initial[ranks[0]["zero2"]["key"]] = -torch.log(torch.tensor(TEMPERATURE, dtype=torch.float64))
    return {
        "model_dir": out / "model",
        "ranks": ranks,
        "reference": reference(out / "model"),
        "initial": initial,
        "seconds": time.perf_counter() - start,
    }


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_one_trainer_step_on_two_ranks_equals_one_process(two_ranks, setup):
    want = two_ranks["reference"]
    initial = two_ranks["initial"]
    for rank, results in enumerate(two_ranks["ranks"]):
        got = results[setup]
        assert got["wrapper"] == ("DeepSpeedEngine" if setup.startswith("zero") else "DistributedDataParallel")
        key = got["key"]
        weights = {n: w for n, w in want.items() if n != "__loss__"}
        assert set(got["weights"]) == set(weights)  # the temperature is one of the model's parameters
        err = rel_error(got["weights"], weights)
        assert err < TOL, f"{setup} rank {rank}: weights relative error {err:.2e}"
        t_err = abs(got["weights"][key] - weights[key]).item() / abs(weights[key]).item()
        assert t_err < TOL, f"{setup} rank {rank}: temperature relative error {t_err:.2e}"
        # the updates themselves agree too (not only the weights they are added to), temperature included
        moved = {n: got["weights"][n] - initial[n] for n in initial}
        want_moved = {n: weights[n] - initial[n] for n in initial}
        err = rel_error(moved, want_moved)
        assert err < UPDATE_TOL, f"{setup} rank {rank}: update relative error {err:.2e}"
        # the Trainer logs the true global-batch loss (the mean of the ranks' scaled losses)
        assert got["logged_loss"][0] == pytest.approx(want["__loss__"].item(), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["zero2", "zero3"])
def test_temperature_clamp_acts_on_the_zero_master_copy(two_ranks, setup):
    """Two steps with the bound crossed after step 1: the clamp (CLIP's, after the optimizer step) reaches ZeRO's
    fp32 master copy (ZeRO-3: partitions), so step 2 starts from log(bound), as one process with the clamp does."""
    want = reference(two_ranks["model_dir"], steps=2, bound=BOUND)
    without = reference(two_ranks["model_dir"], steps=2)
    for rank, results in enumerate(two_ranks["ranks"]):
        got = results[f"{setup}-clamp"]
        key = got["key"]
        weights = {n: w for n, w in want.items() if n != "__loss__"}
        assert rel_error(got["weights"], weights) < TOL, f"rank {rank}"
        t_err = abs(got["weights"][key] - weights[key]).item() / abs(weights[key]).item()
        assert t_err < TOL, f"rank {rank}: temperature relative error {t_err:.2e}"
    # the bound mattered: without the clamp the temperature ends elsewhere
    assert abs(without[key] - want[key]).item() > 100 * TOL * abs(want[key]).item()


# --- one process (no launcher) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny_bert") / "model")


def test_one_process_trainer_equals_the_formula(model_dir, tmp_path):
    """No wrapper (the Trainer's plain module): the same step as the formula on the whole batch."""
    got = train_one_step("plain", model_dir, tmp_path, per_device=len(ANCHORS))
    assert got["wrapper"] == "SentenceTransformer"
    want = reference(model_dir)
    weights = {n: w for n, w in want.items() if n != "__loss__"}
    assert rel_error(got["weights"], weights) < TOL
    key = got["key"]
    assert abs(got["weights"][key] - weights[key]).item() / abs(weights[key]).item() < TOL


def test_bad_input_is_refused_with_the_argument_and_the_fix(model_dir, tmp_path):
    from dist_unlearn.integrations.sentence_transformers import GradCacheInfoNCELoss

    model = load_model(model_dir)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="mini_batch_size must be a positive int"):
            GradCacheInfoNCELoss(model, mini_batch_size=bad)
    GradCacheInfoNCELoss(model, learnable_temperature=True)
    with pytest.raises(ValueError, match="already carries the learnable temperature"):
        GradCacheInfoNCELoss(model, learnable_temperature=True)
    # gradient accumulation: refused at the first training step, before any gradient exists
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2: .* Fix: gradient_accumulation_steps=1"):
        train_one_step("plain", model_dir, tmp_path, per_device=4, accumulation=2)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_exported_encoder_loads_in_sentence_transformers_with_the_same_embeddings(model_dir, tmp_path, pooling):
    """The contrastive job's export (HF model + tokenizer, then write_sentence_transformers_files) is a
    sentence-transformers model whose embeddings are the project's encoder's (encode_batch)."""
    import shutil

    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from dist_unlearn.models.encoders import encode_batch, tokenize
    from dist_unlearn.models.st_format import write_sentence_transformers_files

    exported = tmp_path / "model"
    shutil.copytree(model_dir, exported)  # what export_hf_model writes: save_pretrained output and the tokenizer
    written = write_sentence_transformers_files(exported, HIDDEN, pooling, max_seq_length=32)
    assert {p.name for p in written} >= {"modules.json", "sentence_bert_config.json"}
    loaded = SentenceTransformer(str(exported), device="cpu")
    got = loaded.encode(ANCHORS + NEGATIVES, convert_to_tensor=True, batch_size=5)
    encoder, tokenizer = AutoModel.from_pretrained(exported).eval(), AutoTokenizer.from_pretrained(exported)
    with torch.no_grad():
        want = encode_batch(encoder, tokenize(tokenizer, ANCHORS + NEGATIVES, 32), pooling)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert loaded.similarity_fn_name == "cosine"
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'cls'"):
        write_sentence_transformers_files(exported, HIDDEN, "max")


if __name__ == "__main__":
    main(sys.argv[1])
