"""Continual unlearning (``job.kind=continual``): forget requests one after another, each with its own LoRA
adapter kept orthogonal to the earlier ones (:mod:`dist_unlearn.unlearning.continual`).

The forget people are split in order into ``continual.num_requests`` groups; each request is one phase of
``train.steps`` steps. For request k (adapter ``request{k}``): the adapters ``request1..k`` are applied,
only ``request{k}`` trains; a fresh DeepSpeed engine (ZeRO 0-2) optimises it on

    loss = objective(forget_k, retain) + λ·Σ_{j<k} Σ_m ‖A_k^m (A_j^m)ᵀ‖_F²

with π_ref (for methods that need it) the model as it is when request k starts (base + adapters < k),
its log-probs cached once. After each request the model with adapters ``1..k`` is evaluated on each
request's forget set, on all forget people so far, on the forget people still to come and on retain;
``continual.json`` (rank 0, rewritten atomically after each request) holds one entry per request
(request 0 = the base model). Adapters are saved one by one under ``adapters/request{k}`` and the model
with all adapters merged under ``model/``.

The task saves its own progress (``progress_dir``): a stop drops the request in progress; the same command
then loads the saved adapters of the finished requests (those ``continual.json`` lists) and redoes the
dropped one from its start, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dist_unlearn.data.benchmark import load_benchmark
from dist_unlearn.data.qa import QADataset, collate_qa
from dist_unlearn.data.sampling import StepSampler
from dist_unlearn.distributed.env import barrier, is_main_process, mean_over_ranks
from dist_unlearn.eval.answers import evaluate_splits, score_dataset
from dist_unlearn.io import atomic_path, write_json_atomic
from dist_unlearn.models.loading import model_for_config, tokenizer_for_config
from dist_unlearn.tasks.base import Run, Task
from dist_unlearn.unlearning import objective_from_config
from dist_unlearn.unlearning.continual import (
    activate_adapters,
    add_request_adapter,
    normalized_overlap,
    orthogonality_penalty,
    split_requests,
)

METRICS_FILE = "continual.json"


def check_objective(objective: Any) -> None:
    """Continual requests feed forget, retain and cached π_ref log-probs of the forget batch only."""
    needs = objective.needs
    extra = needs.holdout or needs.idk or needs.target or needs.hidden_streams or needs.logits_streams
    if extra or needs.seq_streams - {"forget"}:
        raise ValueError(
            f"method '{objective.name}' needs data the continual loop does not provide (only forget, retain "
            "and cached reference log-probs). Fix: use e.g. method.names=npo_gd, grad_diff or simnpo_gd"
        )


def finished_requests(run_dir: Path) -> list[dict[str, Any]]:
    """``continual.json`` of an earlier run of this directory (entry 0 = the base model, then one per finished
    request), or ``[]`` when there is none or an adapter it lists is missing (the run then starts over).
    An adapter saved without its ``continual.json`` entry (a stop in between) is redone."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    history = json.loads(path.read_text())
    if any(not (run_dir / "adapters" / f"request{k}").is_dir() for k in range(1, len(history))):
        return []
    return history


class ContinualTask(Task):
    """Run every forget request of ``run.name`` in order, one phase each."""

    phase_name = "request"

    def __init__(self, run: Run) -> None:
        super().__init__(run)
        cfg, length = run.cfg, run.cfg.data.max_length
        self.label, self.phase_steps = f"continual {run.name}", cfg.train.steps
        self.progress_dir = run.run_dir / "adapters"
        self.tokenizer = tokenizer_for_config(run.model_dir, cfg.data)
        self.pad_id = self.tokenizer.pad_token_id
        self.facts = load_benchmark(cfg.data)
        self.groups = split_requests(self.facts.people("forget"), cfg.continual.num_requests)
        self.total_steps = len(self.groups) * cfg.train.steps
        self.objective = objective_from_config(cfg, run.name)
        check_objective(self.objective)
        self.model = model_for_config(run.model_dir, cfg.model, kind="causal_lm")  # PeftModel, adapter "default"
        self.forget_sets = [
            QADataset([it for it in self.facts.split("forget") if it.person in group], self.tokenizer, length)
            for group in self.groups
        ]
        self.retain_set = QADataset(self.facts.split("retain"), self.tokenizer, length)
        self.names: list[str] = []
        self.history = finished_requests(run.run_dir)[: len(self.groups) + 1]
        for k in range(1, len(self.history)):  # resume: the finished requests' adapters, as they were saved
            name = f"request{k}"
            config = next((self.progress_dir / name).rglob("adapter_config.json"))  # save_pretrained's layout
            self.model.load_adapter(str(config.parent), adapter_name=name, is_trainable=False)
            self.names.append(name)
        if self.history and is_main_process():
            print(f"[{run.name}] resumed after request {len(self.history) - 1} of {len(self.groups)}", flush=True)
        activate_adapters(self.model, self.names)
        if not self.history:
            before = evaluate_splits(self.model, self.eval_sets(0), self.pad_id, device=run.device)
            self.history = [{"request": 0, "people": [], "eval": before}]
        self.start_step = (len(self.history) - 1) * cfg.train.steps

    def eval_sets(self, k: int) -> dict[str, QADataset]:
        """Evaluation sets with requests ``1..k`` done: each request's forget set, forget so far / to come, retain."""
        limit, length, tok = self.run.cfg.eval.max_examples or None, self.run.cfg.data.max_length, self.tokenizer
        forget = self.facts.split("forget")
        sets = {f"forget_request{j + 1}": QADataset(self.forget_sets[j].items[:limit], tok, length) for j in range(k)}
        done = [p for group in self.groups[:k] for p in group]
        todo = [p for group in self.groups[k:] for p in group]
        for name, people in (("forget_so_far", done), ("forget_to_come", todo)):
            if people:
                sets[name] = QADataset([it for it in forget if it.person in people][:limit], tok, length)
        sets["retain"] = QADataset(self.facts.split("retain")[:limit], tok, length)
        return sets

    def progress_label(self, phase: int) -> str:
        return f"{self.label} request{phase + 1}"

    def start_phase(self, phase: int) -> None:
        run, cfg, k = self.run, self.run.cfg, phase + 1
        self.name = name = f"request{k}"
        add_request_adapter(self.model, name, like="default")
        self.earlier = list(self.names)
        self.names.append(name)
        activate_adapters(self.model, self.names, trainable=name)
        self.engine = run.initialize_engine(self.model, cfg.train.forget_batch_size // run.world_size, cfg.train.lr)
        self.forget_set = self.forget_sets[phase]
        self.reference = None
        if self.objective.needs_reference:  # π_ref = the model as request k starts (adapter k is still B = 0)
            self.reference = score_dataset(self.engine, self.forget_set, self.pad_id, device=run.device)[:, 0]
        seed, rank, world = cfg.train.seed, run.rank, run.world_size
        self.forget_sampler = StepSampler(len(self.forget_set), cfg.train.forget_batch_size, rank, world, seed, name)
        self.retain_sampler = None
        if self.objective.uses_retain and cfg.train.retain_batch_size > 0:
            size = cfg.train.retain_batch_size
            self.retain_sampler = StepSampler(len(self.retain_set), size, rank, world, seed, f"retain-{name}")
        self.engine.train()

    def _batch(self, dataset: QADataset, indices: list[int]) -> dict[str, Any]:
        return {key: v.to(self.run.device) for key, v in collate_qa([dataset[i] for i in indices], self.pad_id).items()}

    def step(self, step: int) -> dict[str, float]:
        local = step % self.phase_steps
        f_idx = self.forget_sampler.indices(local)
        forget_batch = self._batch(self.forget_set, f_idx)
        retain_batch = None
        if self.retain_sampler is not None:
            retain_batch = self._batch(self.retain_set, self.retain_sampler.indices(local))
        ref = self.reference[f_idx].to(self.run.device) if self.reference is not None else None
        out = self.objective(self.engine, forget_batch, retain_batch, ref)
        penalty = orthogonality_penalty(self.engine.module, self.name, self.earlier)
        self.engine.backward(out.loss + self.run.cfg.continual.orthogonal_weight * penalty)
        self.engine.step()
        values = mean_over_ranks({**out.logs, "orthogonality": float(penalty.detach())}, self.run.device)
        values["request"] = step // self.phase_steps + 1
        return values

    def end_phase(self, phase: int) -> None:
        k, name, earlier, model = phase + 1, self.name, self.earlier, self.model
        activate_adapters(model, self.names)  # all adapters so far, none trainable
        entry = {
            "request": k,
            "people": self.groups[phase],
            "orthogonality": float(orthogonality_penalty(model, name, earlier)),
            "overlap": {old: normalized_overlap(model, name, old) for old in earlier},
            "eval": evaluate_splits(model, self.eval_sets(k), self.pad_id, device=self.run.device),
        }
        self.history.append(entry)
        if is_main_process():
            with atomic_path(self.progress_dir / name) as staging:
                model.save_pretrained(staging, selected_adapters=[name])
            write_json_atomic(self.run.run_dir / METRICS_FILE, self.history)
        self.engine.destroy()
        barrier()

    def export(self, directory: Path) -> None:
        if is_main_process():  # every adapter merged into the base: one plain HF model
            merged = copy.deepcopy(self.model).merge_and_unload(adapter_names=self.names)
            with atomic_path(directory) as staging:
                merged.to(self.run.save_dtype).save_pretrained(staging)
                self.tokenizer.save_pretrained(staging)
            del merged

    def summary(self, after: Any) -> dict[str, Any]:
        first, last = self.history[0]["eval"], self.history[-1]["eval"]
        return {
            "method": self.run.name,
            "kind": "continual",
            "world_size": self.run.world_size,
            "zero_stage": self.run.cfg.deepspeed.zero_stage,
            # every forget person: before any request, and with all adapters applied
            "before": {"forget": first["forget_to_come"], "retain": first["retain"]},
            "after": {"forget": last["forget_so_far"], "retain": last["retain"]},
            "requests": self.history,
        }
