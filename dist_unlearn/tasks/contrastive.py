"""Large-batch contrastive training of an encoder (``job.kind=contrastive``).

Per step each rank takes its slice of the global batch of (query, positive, hard negatives) examples,
and :class:`~dist_unlearn.contrastive.GradCache` computes, chunk by chunk, the exact gradient of a
cross-rank contrastive loss whose negatives are every document of every rank; ``engine.step()``
then applies it. Retrieval quality (recall@1/@10, MRR) on held-out queries is measured before and after.

The data is the fictitious-facts retrieval task (people never trained on are evaluated) or the user's own
JSON Lines pairs/triples (``contrastive.data``, :mod:`dist_unlearn.data.pairs`; the dev rows are evaluated).
With ``contrastive.learn_temperature`` (or ``contrastive.loss=siglip``) the loss's own parameters (τ; the
sigmoid loss's scale and bias, SigLIP: Zhai et al. 2023) train next to the model with their own optimizer
(:class:`~dist_unlearn.contrastive.loss_params.LossParameterStepper`), identically on every rank, and are saved
with each checkpoint. The exported ``model/`` is also a
sentence-transformers model directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from dist_unlearn.config import RunConfig
from dist_unlearn.config.schema import FICTITIOUS_SOURCE
from dist_unlearn.contrastive import GradCache
from dist_unlearn.contrastive.loss_params import (
    LossParameterStepper,
    backward_without_cache,
    build_contrastive_loss,
    loss_parameter_values,
)
from dist_unlearn.data.benchmark import load_benchmark
from dist_unlearn.data.pairs import load_pairs_data
from dist_unlearn.data.retrieval import RetrievalEvalSet, RetrievalExample, mine_hard_negatives, retrieval_eval_set
from dist_unlearn.data.sampling import StepSampler
from dist_unlearn.distributed.env import is_main_process, mean_over_ranks
from dist_unlearn.distributed.seeding import rank_seed, seed_everything
from dist_unlearn.eval.retrieval import evaluate_retrieval
from dist_unlearn.models.encoders import encode_batch, tokenize
from dist_unlearn.models.loading import model_for_config
from dist_unlearn.models.st_format import write_sentence_transformers_files
from dist_unlearn.tasks.base import Run, Task

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


def _say(line: str) -> None:
    if is_main_process():
        print(f"[contrastive] {line}", flush=True)


class ContrastiveTask(Task):
    """Train the encoder at ``run.model_dir`` contrastively on the global batch of every rank."""

    per_method = False

    def __init__(self, run: Run) -> None:
        super().__init__(run)
        self.c = c = run.cfg.contrastive
        self.label, self.total_steps, self.examples_per_step = "contrastive", c.steps, c.global_batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
        model = model_for_config(run.model_dir, run.cfg.model, kind="encoder")
        self.examples, self.eval_set = contrastive_data(run.cfg)
        self.engine = run.initialize_engine(model, max(1, c.global_batch_size // run.world_size), c.lr)
        self.loss_fn = build_contrastive_loss(c).to(run.device)
        self.stepper = LossParameterStepper(self.loss_fn, c.temperature_lr or c.lr)
        self.loss_start = loss_parameter_values(self.loss_fn)
        encode = lambda module, chunk: encode_batch(module, chunk, c.pooling)
        self.cache = GradCache(self.engine, c.chunk_size, self.loss_fn, encode=encode) if c.chunk_size > 0 else None

    def begin(self, start_step: int, state: dict[str, Any]) -> None:
        c, run = self.c, self.run
        self.before = state.get("eval_before")
        if "loss_parameters" in state:
            self.stepper.load_state_dict(state["loss_parameters"])
            self.loss_start = state.get("loss_parameters_start", self.loss_start)
        _say(
            f"data: {c.data}: {len(self.examples)} training queries x {1 + c.hard_negatives} documents, "
            f"{len(self.eval_set.queries)} held-out queries against {len(self.eval_set.passages)} passages"
        )
        if self.before is None:
            self.before = self.evaluate()
        _say(f"held-out retrieval before: {self.before}")
        self.sampler = StepSampler(
            len(self.examples), c.global_batch_size, run.rank, run.world_size, run.cfg.train.seed, "contrastive"
        )

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "eval_before": self.before,
            "loss_parameters": self.stepper.state_dict(),
            "loss_parameters_start": self.loss_start,
        }

    def start_phase(self, phase: int) -> None:
        self.engine.train()

    def step(self, step: int) -> dict[str, float]:
        c, run, engine = self.c, self.run, self.engine
        seed_everything(rank_seed(run.cfg.train.seed, run.rank, f"contrastive-step-{step}"))  # dropout: same on resume
        batch = [self.examples[i] for i in self.sampler.indices(step)]
        queries = tokenize(self.tokenizer, [e.query for e in batch], c.max_length, run.device)
        docs = tokenize(
            self.tokenizer, [d for e in batch for d in (e.positive, *e.negatives)], c.max_length, run.device
        )
        if self.cache is not None:
            self.cache.step(queries, docs)
        else:
            encode = lambda chunk: encode_batch(engine, chunk, c.pooling)
            backward_without_cache(engine, self.loss_fn(encode(queries), encode(docs)), self.stepper)
        skipped = getattr(engine, "skipped_steps", 0)
        engine.step()
        # the loss's own parameters, then their clamp (CLIP: after the step, never in forward); not after an fp16
        # overflow that made DeepSpeed skip the model's step
        self.stepper.step(skipped=getattr(engine, "skipped_steps", 0) != skipped)
        values = mean_over_ranks({"loss": float(self.loss_fn.last_global_loss)}, run.device)
        values.update(loss_parameter_values(self.loss_fn))
        return values

    def evaluate(self) -> dict[str, float]:
        c = self.c
        return evaluate_retrieval(self.engine, self.tokenizer, self.eval_set, c.max_length, c.pooling, self.run.device)

    def export(self, directory: Path) -> None:
        c = self.c
        self.loss_end = loss_parameter_values(self.loss_fn)
        if self.loss_end:  # the learned temperature (or SigLIP scale and bias), start -> end
            _say("learned " + ", ".join(f"{k} {self.loss_start[k]:.5g} -> {v:.5g}" for k, v in self.loss_end.items()))
        hidden = int(self.engine.module.config.hidden_size)  # the model directory is also a sentence-transformers model

        def st_files(staging: Path) -> None:
            write_sentence_transformers_files(staging, hidden, c.pooling, c.max_length)

        self.run.export(self.engine, self.tokenizer, directory, extra_files=st_files)

    def summary(self, after: Any) -> dict[str, Any]:
        c, run = self.c, self.run
        return {
            "job": "contrastive",
            "steps": c.steps,
            "world_size": run.world_size,
            "zero_stage": run.cfg.deepspeed.zero_stage,
            "global_batch_size": c.global_batch_size,
            "chunk_size": c.chunk_size,
            "loss": c.loss,
            "data": c.data,
            "loss_parameters": self.loss_end,
            "train_examples": len(self.examples),
            "eval_queries": len(self.eval_set.queries),
            "eval_passages": len(self.eval_set.passages),
            "before": self.before,
            "after": after,
        }
