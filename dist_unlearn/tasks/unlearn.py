"""Unlearning (``job.kind=unlearn``): one method (``job.name``) on a causal LM.

Per step ``s`` each rank draws its slice of the global forget batch and of the global retain batch
(:class:`~dist_unlearn.unlearning.streams.StepBatches`), computes the objective, and calls
``engine.backward`` / ``engine.step``; DeepSpeed averages gradients over ranks, so the update equals
the one of a single process on the whole global batch.

The objective declares what it reads (:class:`~dist_unlearn.unlearning.batch.DataNeeds`): only those
streams are sampled (retain and holdout with their own per-rank seeds; refusal / target answers paired
with the forget rows) and only the reference it needs is built (``none`` for reference-free methods).
An objective whose trained weights are not themselves the unlearned model says how they deploy
(``objective.inference_spec``, e.g. ULD: the target − α·the trained assistant): every evaluation scores
that model and the spec is saved next to ``RUN/model``.

Writes, from rank 0 (beside what the driver writes): ``eval_steps.jsonl``/``best_model`` (periodic
evaluation), ``eval.json`` (the full suite on the exported model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_unlearn.data.benchmark import load_benchmark
from dist_unlearn.data.qa import QADataset
from dist_unlearn.distributed.env import mean_over_ranks
from dist_unlearn.eval.answers import evaluate_splits
from dist_unlearn.eval.periodic import RunEvaluator
from dist_unlearn.eval.suite import headline
from dist_unlearn.eval.sweep_report import result_numbers
from dist_unlearn.models.combined import write_inference_spec
from dist_unlearn.models.loading import model_for_config, tokenizer_for_config
from dist_unlearn.tasks.base import Run, Task
from dist_unlearn.unlearning import build_reference, objective_from_config
from dist_unlearn.unlearning.reference import resolve_reference_mode
from dist_unlearn.unlearning.robust import robust_plan, unlearning_backward
from dist_unlearn.unlearning.saliency import saliency_mask_for_run
from dist_unlearn.unlearning.streams import StepBatches, qa_streams


class UnlearnTask(Task):
    """Unlearn ``run.name`` on this rank's share of the forget and retain data."""

    def __init__(self, run: Run) -> None:
        super().__init__(run)
        cfg, world = run.cfg, run.world_size
        self.label, self.total_steps, self.log_every = f"unlearn {run.name}", cfg.train.steps, cfg.train.log_every
        self.tokenizer = tokenizer_for_config(run.model_dir, cfg.data)
        model = model_for_config(run.model_dir, cfg.model, kind="causal_lm")
        self.facts = load_benchmark(cfg.data)
        self.objective = objective = objective_from_config(cfg, run.name)
        needs = objective.needs
        self.reference_mode = resolve_reference_mode(cfg, run.name, objective)
        self.streams = streams = qa_streams(self.facts.split, needs, self.tokenizer, cfg.data.max_length)
        objective.prepare_model(model)  # e.g. RMU: only the chosen layers train
        self.robust = robust_plan(cfg)  # method.robust: SAM step, or SURE's saliency fraction and learning rate
        self.engine = run.initialize_engine(model, cfg.train.forget_batch_size // world, self.robust.lr)
        self.pad_id = self.tokenizer.pad_token_id
        limit = cfg.eval.max_examples or None
        self.eval_sets = {
            split: QADataset(self.facts.split(split)[:limit], self.tokenizer, cfg.data.max_length)
            for split in ("forget", "retain")
        }
        # π_ref from the starting weights, built before any checkpoint is loaded (cached: scored now)
        self.reference = build_reference(
            self.reference_mode,
            self.engine,
            model_path=run.model_dir,
            pad_token_id=self.pad_id,
            seq_datasets={name: streams[name] for name in sorted(needs.seq_streams)},
            hidden_datasets={name: streams[name] for name in sorted(needs.hidden_streams)},
            layer_names=objective.layer_names(self.engine),
            micro_batch_size=cfg.train.forget_batch_size // world,
            dtype=cfg.model.dtype,
            device=run.device,
        )
        # SalUn mask from the starting weights (None unless method.saliency < 1 or method.robust=sure)
        self.saliency = saliency_mask_for_run(
            self.engine, streams["forget"], self.pad_id, self.robust.saliency, run.device
        )

    def begin(self, start_step: int, state: dict[str, Any]) -> None:
        run, cfg = self.run, self.run.cfg
        self.before = state.get("eval_before")
        if self.before is None:
            self.before = evaluate_splits(self.engine, self.eval_sets, self.pad_id, device=run.device)
        self.batches = StepBatches(
            self.streams,
            self.objective.needs,
            forget_batch_size=cfg.train.forget_batch_size,
            retain_batch_size=cfg.train.retain_batch_size,
            rank=run.rank,
            world_size=run.world_size,
            seed=cfg.train.seed,
            pad_token_id=self.pad_id,
        )
        self.inference = self.objective.inference_spec(run.model_dir)  # how the trained weights deploy
        self.evaluator = RunEvaluator(
            cfg, self.tokenizer, self.facts, run.run_dir, run.model_dir, run.device, self.inference
        )

    def checkpoint_state(self) -> dict[str, Any]:
        return {"eval_before": self.before}

    def start_phase(self, phase: int) -> None:
        self.engine.train()

    def step(self, step: int) -> dict[str, float]:
        device = self.run.device
        out = unlearning_backward(
            self.engine, self.objective, self.batches.batch(step, device), self.reference, self.robust.sam
        )
        if self.saliency is not None:
            self.saliency.apply(self.engine)
        self.engine.step()
        values = mean_over_ranks(out.logs, device)
        values["lr"] = float(self.engine.get_lr()[0])
        return values

    def after_step(self, completed: int) -> None:
        export = lambda engine, directory: self.run.export(engine, self.tokenizer, directory)
        evaluated = self.evaluator.after_step(self.engine, completed, export)
        if evaluated is not None:  # periodic evaluation: its numbers to the launcher (a sweep's scheduler reads them)
            self.run.report({"step": completed, "eval": result_numbers(evaluated)})

    def evaluate(self) -> dict[str, Any]:
        scored = self.evaluator.scored(self.engine)  # the unlearned model (ULD: combined per its inference spec)
        return evaluate_splits(scored, self.eval_sets, self.pad_id, device=self.run.device)

    def export(self, directory: Path) -> None:
        self.run.export(self.engine, self.tokenizer, directory)
        if self.inference is not None and self.run.rank == 0:  # evaluation then scores the model the spec describes
            write_inference_spec(directory, self.inference)
        self.model_path = directory

    def summary(self, after: Any) -> dict[str, Any]:
        cfg = self.run.cfg
        summary = {
            "method": self.run.name,
            "steps": cfg.train.steps,
            "world_size": self.run.world_size,
            "zero_stage": cfg.deepspeed.zero_stage,
            "reference": self.reference_mode,
            "robust": self.robust.name,
            "before": self.before,
            "after": after,
        }
        summary["eval"] = headline(self.evaluator.finish(self.model_path)["result"])  # eval.json: under "result"
        return summary
