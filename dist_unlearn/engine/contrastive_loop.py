"""The large-batch contrastive train function that runs in every worker (Ray, torchrun or one process).

Per step each rank takes its slice of the global batch of (query, positive, hard negatives) examples,
and :class:`~dist_unlearn.contrastive.GradCache` computes, chunk by chunk, the exact gradient of a
cross-rank contrastive loss whose negatives are every document of every rank; ``engine.step()``
then applies it. Retrieval quality (recall@1/@10, MRR) on held-out queries is measured before and after.

The data is the fictitious-facts retrieval task (people never trained on are evaluated) or the user's own
JSON Lines pairs/triples (``contrastive.data``, :mod:`dist_unlearn.data.pairs`; the dev rows are evaluated).
With ``contrastive.learn_temperature`` the loss's own parameters (τ; SigLIP's scale and bias) train next to
the model with their own optimizer (:class:`~dist_unlearn.contrastive.loss_params.LossParameterStepper`),
identically on every rank, and are saved with each checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from dist_unlearn.config import RunConfig, config_from_dict
from dist_unlearn.config.schema import FICTITIOUS_SOURCE
from dist_unlearn.contrastive import GradCache
from dist_unlearn.contrastive.loss_params import (
    LossParameterStepper,
    backward_without_cache,
    build_contrastive_loss,
    loss_parameter_values,
)
from dist_unlearn.data.pairs import load_pairs_data
from dist_unlearn.data.retrieval import RetrievalEvalSet, RetrievalExample, mine_hard_negatives, retrieval_eval_set
from dist_unlearn.data.sampling import StepSampler
from dist_unlearn.distributed.env import is_main_process
from dist_unlearn.distributed.seeding import rank_seed, seed_everything
from dist_unlearn.engine.ds_config import torch_dtype
from dist_unlearn.engine.export import export_hf_model
from dist_unlearn.engine.job import Job, LocalReporter, Reporter
from dist_unlearn.engine.metrics_log import MetricsLog, mean_over_ranks
from dist_unlearn.engine.prepare import load_benchmark
from dist_unlearn.engine.worker import Checkpointer, initialize_engine, progress_bar, resume_state, start_worker
from dist_unlearn.eval.retrieval import evaluate_retrieval
from dist_unlearn.models.encoders import encode_batch, tokenize
from dist_unlearn.models.loading import model_for_config
from dist_unlearn.models.st_format import write_sentence_transformers_files

TRAIN_SPLITS = ("retain", "forget")
EVAL_SPLIT = "holdout"
TRAIN_LOOKALIKES = 1
"""Look-alike-name negatives per training example, the hardest mined (see :mod:`dist_unlearn.data.retrieval`)."""


def contrastive_data(cfg: RunConfig) -> tuple[list[RetrievalExample], RetrievalEvalSet]:
    """Training examples (``1 + contrastive.hard_negatives`` documents each) and the held-out retrieval set:
    the fictitious-facts task (mined negatives, held-out people) or the user's ``contrastive.data`` rows."""
    c = cfg.contrastive
    if c.data != FICTITIOUS_SOURCE:
        pairs = load_pairs_data(c.data, c.dev_data or None, c.hard_negatives, c.dev_fraction, cfg.data.seed)
        return pairs.train, pairs.eval_set
    facts = load_benchmark(cfg.data)
    examples = mine_hard_negatives(
        [item for split in TRAIN_SPLITS for item in facts.split(split)],
        c.hard_negatives,
        seed=cfg.train.seed,
        lookalikes=TRAIN_LOOKALIKES,
    )
    return examples, retrieval_eval_set(facts, EVAL_SPLIT, seed=cfg.data.seed)


def report_loss_parameters(start: dict[str, float], end: dict[str, float]) -> None:
    """Print the learned temperature (or SigLIP scale and bias), start → end (rank 0)."""
    if end and is_main_process():
        changes = ", ".join(f"{name} {start[name]:.5g} -> {value:.5g}" for name, value in end.items())
        print(f"[contrastive] learned {changes}", flush=True)


def run_contrastive(job: Job, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train the encoder of ``job`` contrastively; returns the summary (collective over all ranks).

    Writes, from rank 0, ``metrics.jsonl``, TensorBoard events, checkpoints, the trained encoder under
    ``model/`` and ``metrics.json`` (retrieval metrics before/after on the held-out people).
    """
    cfg = config_from_dict(job.config)
    c = cfg.contrastive
    run_dir = Path(job.run_dir)
    reporter = reporter or LocalReporter(run_dir)
    ctx = start_worker(cfg)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device

    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    model = model_for_config(job.model_dir, cfg.model, kind="encoder")
    examples, eval_set = contrastive_data(cfg)
    engine = initialize_engine(cfg, model, max(1, c.global_batch_size // world), c.lr)
    loss_fn = build_contrastive_loss(c).to(device)
    stepper = LossParameterStepper(loss_fn, c.temperature_lr or c.lr)
    loss_start = loss_parameter_values(loss_fn)

    def encode(module: Any, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        return encode_batch(module, chunk, c.pooling)

    cache = GradCache(engine, c.chunk_size, loss_fn, encode=encode) if c.chunk_size > 0 else None

    start_step, state = resume_state(engine, reporter, "contrastive")
    before = state.get("eval_before")
    if "loss_parameters" in state:
        stepper.load_state_dict(state["loss_parameters"])
        loss_start = state.get("loss_parameters_start", loss_start)
    if is_main_process():
        print(
            f"[contrastive] data: {c.data}: {len(examples)} training queries x {1 + c.hard_negatives} documents, "
            f"{len(eval_set.queries)} held-out queries against {len(eval_set.passages)} passages",
            flush=True,
        )
    if before is None:
        before = evaluate_retrieval(engine, tokenizer, eval_set, c.max_length, c.pooling, device)
    if is_main_process():
        print(f"[contrastive] held-out retrieval before: {before}", flush=True)

    sampler = StepSampler(len(examples), c.global_batch_size, rank, world, cfg.train.seed, "contrastive")
    log = MetricsLog(run_dir, tensorboard=cfg.output.tensorboard, resume_from_step=start_step)
    checkpointer = Checkpointer(
        engine,
        reporter,
        run_dir,
        cfg,
        c.steps,
        before,
        extra_state=lambda: {"loss_parameters": stepper.state_dict(), "loss_parameters_start": loss_start},
    )
    progress = progress_bar(c.steps, start_step, "contrastive")
    engine.train()
    for step in range(start_step, c.steps):
        started = time.perf_counter()
        seed_everything(rank_seed(cfg.train.seed, rank, f"contrastive-step-{step}"))  # dropout: same on resume
        batch = [examples[i] for i in sampler.indices(step)]
        queries = tokenize(tokenizer, [e.query for e in batch], c.max_length, device)
        docs = tokenize(tokenizer, [d for e in batch for d in (e.positive, *e.negatives)], c.max_length, device)
        if cache is not None:
            cache.step(queries, docs)
        else:
            backward_without_cache(engine, loss_fn(encode(engine, queries), encode(engine, docs)), stepper)
        engine.step()
        stepper.step()  # the loss's own parameters, then their clamp (CLIP: after the step, never in forward)
        values = mean_over_ranks({"loss": float(loss_fn.last_global_loss)}, device)
        values.update(loss_parameter_values(loss_fn))
        values["step_seconds"] = time.perf_counter() - started
        values["examples_per_second"] = c.global_batch_size / values["step_seconds"]
        log.log(step + 1, values)
        progress.update(1)
        progress.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        checkpointer.after_step(step + 1, values)
    progress.close()
    log.close()

    after = evaluate_retrieval(engine, tokenizer, eval_set, c.max_length, c.pooling, device)
    loss_end = loss_parameter_values(loss_fn)
    report_loss_parameters(loss_start, loss_end)
    hidden = int(engine.module.config.hidden_size)  # the model directory is also a sentence-transformers model

    def st_files(directory: Path) -> None:
        write_sentence_transformers_files(directory, hidden, c.pooling, c.max_length)

    export_hf_model(engine, tokenizer, run_dir / "model", torch_dtype(cfg.output.save_dtype), extra_files=st_files)
    summary = {
        "job": "contrastive",
        "steps": c.steps,
        "world_size": world,
        "zero_stage": cfg.deepspeed.zero_stage,
        "global_batch_size": c.global_batch_size,
        "chunk_size": c.chunk_size,
        "loss": c.loss,
        "data": c.data,
        "loss_parameters": loss_end,
        "train_examples": len(examples),
        "eval_queries": len(eval_set.queries),
        "eval_passages": len(eval_set.passages),
        "before": before,
        "after": after,
    }
    checkpointer.finish(run_dir, summary)
    return summary
