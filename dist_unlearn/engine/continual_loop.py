"""Continual unlearning train function (``job.kind=continual``): forget requests one after another, each
with its own LoRA adapter kept orthogonal to the earlier ones (:mod:`dist_unlearn.unlearning.continual`).

The forget people are split in order into ``continual.num_requests`` groups. For request k (adapter
``request{k}``): the adapters ``request1..k`` are applied, only ``request{k}`` trains; a fresh DeepSpeed
engine (ZeRO 0-2) optimises it for ``train.steps`` steps on

    loss = objective(forget_k, retain) + λ·Σ_{j<k} Σ_m ‖A_k^m (A_j^m)ᵀ‖_F²

with π_ref (for methods that need it) the model as it is when request k starts (base + adapters < k),
its log-probs cached once. After each request the model with adapters ``1..k`` is evaluated on each
request's forget set, on all forget people so far, on the forget people still to come and on retain;
``continual.json`` (rank 0, rewritten atomically after each request) holds one entry per request
(request 0 = the base model). Adapters are saved one by one under ``adapters/request{k}`` and the model
with all adapters merged under ``model/``.

Stop and resume work per request: a stop request (``OUTPUT/STOP``, SIGUSR1/SIGTERM) is honoured at the
next step; the request in progress is dropped and the run exits with 75. The same command then loads the
saved adapters of the finished requests (those ``continual.json`` lists) and redoes the dropped one from its
start, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from dist_unlearn.config import config_from_dict
from dist_unlearn.data.qa import QADataset, collate_qa
from dist_unlearn.data.sampling import StepSampler
from dist_unlearn.distributed.env import barrier, is_main_process
from dist_unlearn.engine.ds_config import torch_dtype
from dist_unlearn.engine.job import Job, LocalReporter, Reporter
from dist_unlearn.engine.metrics_log import MetricsLog, mean_over_ranks
from dist_unlearn.engine.preemption import Preempted, agree_to_stop, stop_requested
from dist_unlearn.engine.prepare import load_benchmark
from dist_unlearn.engine.worker import initialize_engine, progress_bar, start_worker
from dist_unlearn.eval.answers import evaluate_splits, score_dataset
from dist_unlearn.io import atomic_path, write_json_atomic
from dist_unlearn.models.loading import model_for_config, tokenizer_for_config
from dist_unlearn.unlearning import objective_from_config
from dist_unlearn.unlearning.continual import (
    activate_adapters,
    add_request_adapter,
    normalized_overlap,
    orthogonality_penalty,
    split_requests,
)

METRICS_FILE = "continual.json"


def _check_objective(objective: Any) -> None:
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


def _load_request_adapter(model: Any, run_dir: Path, name: str) -> None:
    """Load the saved adapter ``name`` (``adapters/NAME``, as written by ``save_pretrained``) into ``model``."""
    config = next((run_dir / "adapters" / name).rglob("adapter_config.json"))
    model.load_adapter(str(config.parent), adapter_name=name, is_trainable=False)


def run_continual(job: Job, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run every forget request of ``job`` in order on this rank (collective); returns the summary."""
    cfg = config_from_dict(job.config)
    run_dir = Path(job.run_dir)
    reporter = reporter or LocalReporter(run_dir)
    ctx = start_worker(cfg)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    length = cfg.data.max_length

    tokenizer = tokenizer_for_config(job.model_dir, cfg.data)
    pad_id = tokenizer.pad_token_id
    facts = load_benchmark(cfg.data)
    groups = split_requests(facts.people("forget"), cfg.continual.num_requests)
    objective = objective_from_config(cfg, job.name)
    _check_objective(objective)
    lam = cfg.continual.orthogonal_weight
    model = model_for_config(job.model_dir, cfg.model, kind="causal_lm")  # PeftModel, adapter "default"

    limit = cfg.eval.max_examples or None
    forget_sets = [
        QADataset([it for it in facts.split("forget") if it.person in group], tokenizer, length) for group in groups
    ]
    retain_set = QADataset(facts.split("retain"), tokenizer, length)

    def eval_sets(k: int) -> dict[str, QADataset]:
        sets = {f"forget_request{j + 1}": QADataset(forget_sets[j].items[:limit], tokenizer, length) for j in range(k)}
        done = [p for group in groups[:k] for p in group]
        todo = [p for group in groups[k:] for p in group]
        for name, people in (("forget_so_far", done), ("forget_to_come", todo)):
            if people:
                items = [it for it in facts.split("forget") if it.person in people]
                sets[name] = QADataset(items[:limit], tokenizer, length)
        sets["retain"] = QADataset(facts.split("retain")[:limit], tokenizer, length)
        return sets

    names: list[str] = []
    history = finished_requests(run_dir)[: len(groups) + 1]
    for k in range(1, len(history)):  # resume: the finished requests' adapters, as they were saved
        _load_request_adapter(model, run_dir, f"request{k}")
        names.append(f"request{k}")
    if history and is_main_process():
        print(f"[{job.name}] resumed after request {len(history) - 1} of {len(groups)}", flush=True)
    activate_adapters(model, names)
    if not history:
        history = [{"request": 0, "people": [], "eval": evaluate_splits(model, eval_sets(0), pad_id, device=device)}]
    global_step = (len(history) - 1) * cfg.train.steps
    log = MetricsLog(run_dir, tensorboard=cfg.output.tensorboard, resume_from_step=global_step)
    for k, group in enumerate(groups, start=1):
        name = f"request{k}"
        if k < len(history):
            continue
        add_request_adapter(model, name, like="default")
        earlier = list(names)
        names.append(name)
        activate_adapters(model, names, trainable=name)
        engine = initialize_engine(cfg, model, cfg.train.forget_batch_size // world, cfg.train.lr)
        forget_set = forget_sets[k - 1]
        reference = None
        if objective.needs_reference:  # π_ref = the model as request k starts (adapter k is still B = 0)
            reference = score_dataset(engine, forget_set, pad_id, device=device)[:, 0]
        forget_sampler = StepSampler(len(forget_set), cfg.train.forget_batch_size, rank, world, cfg.train.seed, name)
        retain_sampler = None
        if objective.uses_retain and cfg.train.retain_batch_size > 0:
            retain_sampler = StepSampler(
                len(retain_set), cfg.train.retain_batch_size, rank, world, cfg.train.seed, f"retain-{name}"
            )
        progress = progress_bar(cfg.train.steps, 0, f"continual {job.name} {name}")
        engine.train()
        for step in range(cfg.train.steps):
            started = time.perf_counter()
            f_idx = forget_sampler.indices(step)
            forget_batch = {key: v.to(device) for key, v in collate_qa([forget_set[i] for i in f_idx], pad_id).items()}
            retain_batch = None
            if retain_sampler is not None:
                r_idx = retain_sampler.indices(step)
                retain_batch = {
                    key: v.to(device) for key, v in collate_qa([retain_set[i] for i in r_idx], pad_id).items()
                }
            ref = reference[f_idx].to(device) if reference is not None else None
            out = objective(engine, forget_batch, retain_batch, ref)
            penalty = orthogonality_penalty(engine.module, name, earlier)
            engine.backward(out.loss + lam * penalty)
            engine.step()
            global_step += 1
            values = mean_over_ranks({**out.logs, "orthogonality": float(penalty.detach())}, device)
            values["request"] = k
            values["step_seconds"] = time.perf_counter() - started
            log.log(global_step, values)
            progress.update(1)
            if step + 1 < cfg.train.steps and agree_to_stop(stop_requested(cfg.output.dir)):
                progress.close()  # the request in progress is dropped; a rerun redoes it from its start
                done = (k - 1) * cfg.train.steps
                reporter.report({"step": done, "request": k - 1, "preempted": 1}, None)
                raise Preempted(done, run_dir / "adapters", job.name)
        progress.close()
        activate_adapters(model, names)  # all adapters so far, none trainable
        entry = {
            "request": k,
            "people": group,
            "orthogonality": float(orthogonality_penalty(model, name, earlier)),
            "overlap": {old: normalized_overlap(model, name, old) for old in earlier},
            "eval": evaluate_splits(model, eval_sets(k), pad_id, device=device),
        }
        history.append(entry)
        if is_main_process():
            with atomic_path(run_dir / "adapters" / name) as staging:
                model.save_pretrained(staging, selected_adapters=[name])
            write_json_atomic(run_dir / METRICS_FILE, history)
        engine.destroy()
        barrier()
    log.close()

    if is_main_process():  # every adapter merged into the base: one plain HF model
        merged = copy.deepcopy(model).merge_and_unload(adapter_names=names)
        with atomic_path(run_dir / "model") as staging:
            merged.to(torch_dtype(cfg.output.save_dtype)).save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        del merged
    first, last = history[0]["eval"], history[-1]["eval"]
    summary = {
        "method": job.name,
        "kind": "continual",
        "world_size": world,
        "zero_stage": cfg.deepspeed.zero_stage,
        # every forget person: before any request, and with all adapters applied
        "before": {"forget": first["forget_to_come"], "retain": first["retain"]},
        "after": {"forget": last["forget_so_far"], "retain": last["retain"]},
        "requests": history,
    }
    if is_main_process():
        write_json_atomic(run_dir / "metrics.json", summary)
    reporter.report({"done": 1, "requests": len(groups)}, None)
    barrier()
    return summary
