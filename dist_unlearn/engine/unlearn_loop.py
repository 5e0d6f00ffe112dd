"""The unlearning train function that runs in every worker: under Ray Train, under ``torchrun`` or the
``deepspeed`` launcher, or in one plain process. It never imports Ray; the launcher passes a
:class:`Reporter` that knows where checkpoints go.

Per step ``s`` each rank draws its slice of the global forget batch and of the global retain batch
(:class:`~dist_unlearn.data.sampling.StepSampler`), computes the objective, and calls
``engine.backward`` / ``engine.step``; DeepSpeed averages gradients over ranks, so the update equals
the one of a single process on the whole global batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dist_unlearn.config import RunConfig, config_from_dict
from dist_unlearn.data.qa import QADataset, collate_qa
from dist_unlearn.data.sampling import StepSampler
from dist_unlearn.engine.ds_config import torch_dtype
from dist_unlearn.engine.export import export_hf_model
from dist_unlearn.engine.job import Job, LocalReporter, Reporter
from dist_unlearn.engine.metrics_log import MetricsLog, mean_over_ranks
from dist_unlearn.engine.prepare import load_benchmark
from dist_unlearn.engine.validate import resolve_reference_mode
from dist_unlearn.engine.worker import Checkpointer, initialize_engine, progress_bar, resume, start_worker
from dist_unlearn.eval.answers import evaluate_splits, score_dataset
from dist_unlearn.models.loading import load_tokenizer, model_for_config
from dist_unlearn.unlearning import objective_from_config
from dist_unlearn.unlearning.saliency import saliency_mask_for_run


def _eval_datasets(facts, tokenizer, cfg: RunConfig) -> dict[str, QADataset]:
    limit = cfg.eval.max_examples or None
    return {
        split: QADataset(facts.split(split)[:limit], tokenizer, cfg.data.max_length) for split in ("forget", "retain")
    }


def run_unlearning(job: Job, reporter: Reporter | None = None) -> dict[str, Any]:
    """Unlearn ``job.name`` on this rank's share of the data; returns the run summary (all ranks).

    Collective: every rank of the process group runs it. Writes, from rank 0, ``metrics.jsonl``,
    TensorBoard events, checkpoints under ``checkpoints/``, the final model under ``model/`` (HF
    format, ``output.save_dtype``) and ``metrics.json``.
    """
    cfg = config_from_dict(job.config)
    run_dir = Path(job.run_dir)
    reporter = reporter or LocalReporter(run_dir)
    ctx = start_worker(cfg)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device

    tokenizer = load_tokenizer(job.model_dir)
    model = model_for_config(job.model_dir, cfg.model, kind="causal_lm")
    facts = load_benchmark(cfg.data)
    forget_set = QADataset(facts.split("forget"), tokenizer, cfg.data.max_length)
    retain_set = QADataset(facts.split("retain"), tokenizer, cfg.data.max_length)
    objective = objective_from_config(cfg, job.name)
    reference_mode = resolve_reference_mode(cfg, job.name, objective.needs_reference)
    engine = initialize_engine(cfg, model, cfg.train.forget_batch_size // world, cfg.train.lr)
    pad_id = tokenizer.pad_token_id
    eval_sets = _eval_datasets(facts, tokenizer, cfg)

    # π_ref log-probs of every forget answer, from the starting weights, before any checkpoint is loaded
    reference_logprob = None
    if reference_mode == "cached":
        reference_logprob = score_dataset(engine, forget_set, pad_id, device=device)[:, 0]

    # SalUn mask from the starting weights (None unless method.saliency < 1)
    saliency = saliency_mask_for_run(engine, forget_set, pad_id, cfg.method.saliency, device)
    start_step, before = resume(engine, reporter, job.name)
    if before is None:
        before = evaluate_splits(engine, eval_sets, pad_id, device=device)

    forget_sampler = StepSampler(len(forget_set), cfg.train.forget_batch_size, rank, world, cfg.train.seed, "forget")
    retain_sampler = None
    if objective.uses_retain and cfg.train.retain_batch_size > 0:
        retain_sampler = StepSampler(
            len(retain_set), cfg.train.retain_batch_size, rank, world, cfg.train.seed, "retain"
        )

    log = MetricsLog(run_dir, tensorboard=cfg.output.tensorboard, resume_from_step=start_step)
    checkpointer = Checkpointer(engine, reporter, run_dir, cfg, cfg.train.steps, before)
    progress = progress_bar(cfg.train.steps, start_step, f"unlearn {job.name}")
    engine.train()
    for step in range(start_step, cfg.train.steps):
        started = time.perf_counter()
        forget_idx = forget_sampler.indices(step)
        forget_batch = {k: v.to(device) for k, v in collate_qa([forget_set[i] for i in forget_idx], pad_id).items()}
        retain_batch = None
        if retain_sampler is not None:
            retain_idx = retain_sampler.indices(step)
            retain_batch = {k: v.to(device) for k, v in collate_qa([retain_set[i] for i in retain_idx], pad_id).items()}
        ref = reference_logprob[forget_idx].to(device) if reference_logprob is not None else None
        out = objective(engine, forget_batch, retain_batch, ref)
        engine.backward(out.loss)
        if saliency is not None:
            saliency.apply(engine)
        engine.step()
        values = mean_over_ranks(out.logs, device)
        values["lr"] = float(engine.get_lr()[0])
        values["step_seconds"] = time.perf_counter() - started
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            log.log(step + 1, values)
        progress.update(1)
        progress.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        checkpointer.after_step(step + 1, values)
    progress.close()
    log.close()

    after = evaluate_splits(engine, eval_sets, pad_id, device=device)
    export_hf_model(engine, tokenizer, run_dir / "model", torch_dtype(cfg.output.save_dtype))
    summary = {
        "method": job.name,
        "steps": cfg.train.steps,
        "world_size": world,
        "zero_stage": cfg.deepspeed.zero_stage,
        "reference": reference_mode,
        "before": before,
        "after": after,
    }
    checkpointer.finish(run_dir, summary)
    return summary
