"""The unlearning train function that runs in every worker: under Ray Train, under ``torchrun`` or the
``deepspeed`` launcher, or in one plain process. It never imports Ray; the launcher passes a
:class:`Reporter` that knows where checkpoints go.

Per step ``s`` each rank draws its slice of the global forget batch and of the global retain batch
(:class:`~dist_unlearn.unlearning.streams.StepBatches`), computes the objective, and calls
``engine.backward`` / ``engine.step``; DeepSpeed averages gradients over ranks, so the update equals
the one of a single process on the whole global batch.

The objective declares what it reads (:class:`~dist_unlearn.unlearning.batch.DataNeeds`): only those
streams are sampled (retain and holdout with their own per-rank seeds; refusal / target answers paired
with the forget rows) and only the reference it needs is built (``none`` for reference-free methods).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dist_unlearn.config import RunConfig, config_from_dict
from dist_unlearn.data.qa import QADataset
from dist_unlearn.engine.ds_config import torch_dtype
from dist_unlearn.engine.export import export_hf_model
from dist_unlearn.engine.job import Job, LocalReporter, Reporter
from dist_unlearn.engine.metrics_log import MetricsLog, mean_over_ranks
from dist_unlearn.engine.prepare import load_benchmark
from dist_unlearn.engine.validate import resolve_reference_mode
from dist_unlearn.engine.worker import Checkpointer, initialize_engine, progress_bar, resume, start_worker
from dist_unlearn.eval.answers import evaluate_splits
from dist_unlearn.eval.periodic import RunEvaluator
from dist_unlearn.eval.suite import headline
from dist_unlearn.eval.sweep_report import result_numbers
from dist_unlearn.models.combined import write_inference_spec
from dist_unlearn.models.loading import model_for_config, tokenizer_for_config
from dist_unlearn.unlearning import build_reference, objective_from_config
from dist_unlearn.unlearning.robust import robust_plan, unlearning_backward
from dist_unlearn.unlearning.saliency import saliency_mask_for_run
from dist_unlearn.unlearning.streams import StepBatches, qa_streams


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

    tokenizer = tokenizer_for_config(job.model_dir, cfg.data)
    model = model_for_config(job.model_dir, cfg.model, kind="causal_lm")
    facts = load_benchmark(cfg.data)
    objective = objective_from_config(cfg, job.name)
    needs = objective.needs
    reference_mode = resolve_reference_mode(cfg, job.name, objective)
    streams = qa_streams(facts.split, needs, tokenizer, cfg.data.max_length)
    objective.prepare_model(model)  # e.g. RMU: only the chosen layers train
    robust = robust_plan(cfg)  # method.robust: SAM step, or SURE's saliency fraction and learning rate
    engine = initialize_engine(cfg, model, cfg.train.forget_batch_size // world, robust.lr)
    pad_id = tokenizer.pad_token_id
    eval_sets = _eval_datasets(facts, tokenizer, cfg)

    # π_ref from the starting weights, built before any checkpoint is loaded (cached: scored now)
    reference = build_reference(
        reference_mode,
        engine,
        model_path=job.model_dir,
        pad_token_id=pad_id,
        seq_datasets={name: streams[name] for name in sorted(needs.seq_streams)},
        hidden_datasets={name: streams[name] for name in sorted(needs.hidden_streams)},
        layer_names=objective.layer_names(engine),
        micro_batch_size=cfg.train.forget_batch_size // world,
        dtype=cfg.model.dtype,
        device=device,
    )

    # SalUn mask from the starting weights (None unless method.saliency < 1 or method.robust=sure)
    saliency = saliency_mask_for_run(engine, streams["forget"], pad_id, robust.saliency, device)
    start_step, before = resume(engine, reporter, job.name)
    if before is None:
        before = evaluate_splits(engine, eval_sets, pad_id, device=device)

    batches = StepBatches(
        streams,
        needs,
        forget_batch_size=cfg.train.forget_batch_size,
        retain_batch_size=cfg.train.retain_batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
        pad_token_id=pad_id,
    )

    log = MetricsLog(run_dir, tensorboard=cfg.output.tensorboard, resume_from_step=start_step)
    checkpointer = Checkpointer(engine, reporter, run_dir, cfg, cfg.train.steps, before)
    inference = objective.inference_spec(job.model_dir)  # how the trained weights deploy (ULD: target − α·them)
    evaluator = RunEvaluator(cfg, tokenizer, facts, run_dir, job.model_dir, device, inference)  # eval suite
    save_dtype = torch_dtype(cfg.output.save_dtype)
    progress = progress_bar(cfg.train.steps, start_step, f"unlearn {job.name}")
    engine.train()
    for step in range(start_step, cfg.train.steps):
        started = time.perf_counter()
        out = unlearning_backward(engine, objective, batches.batch(step, device), reference, robust.sam)
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
        evaluated = evaluator.after_step(engine, step + 1, lambda e, d: export_hf_model(e, tokenizer, d, save_dtype))
        if evaluated is not None:  # periodic evaluation: its numbers to the launcher (a sweep's scheduler reads them)
            reporter.report({"step": step + 1, "eval": result_numbers(evaluated)}, None)
    progress.close()
    log.close()

    after = evaluate_splits(evaluator.scored(engine), eval_sets, pad_id, device=device)  # the unlearned model
    export_hf_model(engine, tokenizer, run_dir / "model", torch_dtype(cfg.output.save_dtype))
    if inference is not None and rank == 0:  # evaluation then scores the model the spec describes
        write_inference_spec(run_dir / "model", inference)
    summary = {
        "method": job.name,
        "steps": cfg.train.steps,
        "world_size": world,
        "zero_stage": cfg.deepspeed.zero_stage,
        "reference": reference_mode,
        "robust": robust.name,
        "before": before,
        "after": after,
    }
    summary["eval"] = headline(evaluator.finish(run_dir / "model")["result"])  # eval.json holds it under "result"
    checkpointer.finish(run_dir, summary)
    return summary
