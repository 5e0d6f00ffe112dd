"""Run every method of a config without Ray: in one process, or in each process of a ``torchrun`` /
``deepspeed`` launch (the same command on every rank)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dist_unlearn.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from dist_unlearn.data.qa import length_fit
from dist_unlearn.distributed.env import (
    barrier,
    destroy_process_group,
    get_world_size,
    init_distributed,
    is_main_process,
)
from dist_unlearn.engine.driver import run_job
from dist_unlearn.engine.job import Job
from dist_unlearn.engine.preemption import Preempted
from dist_unlearn.engine.prepare import ModelAssets, load_benchmark, resolve_model_assets
from dist_unlearn.io import write_json_atomic
from dist_unlearn.models.loading import tokenizer_for_config
from dist_unlearn.tasks import TASKS


def plan_jobs(cfg: RunConfig, assets: ModelAssets) -> list[Job]:
    """One job per method for a kind whose task runs methods (unlearn, continual), each writing to
    ``OUTPUT/<method>/``; otherwise one job named after the kind (contrastive: ``OUTPUT/contrastive/``)."""
    out = Path(cfg.output.dir).resolve()
    data = config_to_dict(cfg)
    kind = cfg.job.kind
    if not TASKS[kind].per_method:
        return [Job(data, kind, kind, assets.target_dir, str(out / kind))]
    return [Job(data, kind, name, assets.target_dir, str(out / name)) for name in cfg.method.names]


# settings that may change between a run and its resumption
_RESUMABLE_CHANGES = {
    "train": {"steps"},  # an unlearning or continual run is extended
    "contrastive": {"steps"},  # a contrastive run is extended
    "checkpoint": None,
    "eval": None,
    "ray": {"address", "max_failures", "enabled"},
    "failure": None,
    "output": {"tensorboard", "dir"},  # a run directory moved elsewhere (say, scratch to project space) resumes
    "sweep": None,  # read by dist-unlearn sweep only
}
RUN_SETTINGS_FILE = "run_settings.json"


def run_settings(job: Job, world_size: int) -> dict[str, Any]:
    """The settings a checkpoint of ``job`` depends on (everything a resumed run must keep)."""
    kept: dict[str, Any] = {
        "job": job.kind,
        "name": job.name,
        "world_size": world_size,
        "model_dir": _relative_to_output(job.model_dir, Path(job.run_dir).parent),
    }
    for section, values in job.config.items():
        free = _RESUMABLE_CHANGES.get(section, set())
        if free is None:
            continue
        kept[section] = {k: v for k, v in values.items() if k not in free} if isinstance(values, dict) else values
    return kept


def _relative_to_output(model_dir: str, output_dir: Path) -> str:
    """``model_dir`` relative to the output directory when it lies inside it (the embedded benchmark's
    models), so that moving the whole output directory keeps the settings equal."""
    path, root = Path(model_dir).resolve(), output_dir.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else model_dir


def check_resumable(jobs: list[Job], world_size: int) -> None:
    """Refuse, before any work, to continue a run directory whose checkpoints came from other settings.

    A run directory with checkpoints is resumed (or extended when ``train.steps`` grew); changing
    anything else would silently mix two experiments.
    """
    problems = []
    defaults = _default_settings()
    for job in jobs:
        path = Path(job.run_dir) / RUN_SETTINGS_FILE
        progress = [Path(job.run_dir) / d for d in ("checkpoints", "adapters")]  # adapters: continual requests
        if not path.is_file() or not any(d.is_dir() for d in progress):
            continue
        old, new = json.loads(path.read_text()), run_settings(job, world_size)
        changed = _diff(old, new, defaults)
        if changed:
            problems.append(
                f"output.dir: {job.run_dir} holds checkpoints of a run with other settings ({', '.join(changed)}). "
                "Fix: choose a new output.dir, or pass --restart to start this method over"
            )
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems), problems)


def _default_settings() -> dict[str, Any]:
    """Every config key with its default value (the sections of :class:`RunConfig`)."""
    return config_to_dict(RunConfig())


def _diff(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for each setting that differs. A key the old settings lack (they were written
    by a version without that option) counts as its default value, so an upgrade keeps runs resumable."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for key in keys:
        default = defaults.get(key)
        a, b = old.get(key, default), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, default if isinstance(default, dict) else {}, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {old.get(key)!r} -> {b!r}")
    return out


def check_answer_lengths(job: Job, log: Any = print) -> None:
    """Before any work, the run's QA examples (every split, and TOFU's evaluation sets) against
    ``data.max_length``, tokenized as training and scoring will tokenize them: a prompt with no room for an
    answer is refused (:class:`ConfigError`); answers cut short get one warning line naming the length
    that fits them all (cut answers are trained on and scored in part, so their numbers are not comparable
    with published ones)."""
    if job.kind == "contrastive":
        return
    data = config_from_dict(job.config).data
    benchmark = load_benchmark(data)
    items = [*benchmark.items, *(item for _, group in getattr(benchmark, "evaluation", ()) for item in group)]
    fit = length_fit(tokenizer_for_config(job.model_dir, data), items, data.max_length)
    if fit.prompt_too_long is not None:
        problem = (
            f"data.max_length ({data.max_length}) leaves no room for an answer after the prompt of "
            f"{fit.prompt_too_long!r}. Fix: data.max_length={fit.longest}"
        )
        raise ConfigError(f"invalid config:\n{problem}", [problem])
    if fit.truncated:
        log(
            f"dist-unlearn: data.max_length={data.max_length} cuts {fit.truncated} of {fit.examples} answers short "
            f"(the longest example needs {fit.longest} tokens); they are trained on and scored in part. "
            f"Fix: data.max_length={fit.longest}",
            flush=True,
        )


def prepare_run_dirs(jobs: list[Job], world_size: int, restart: bool = False, check_lengths: bool = True) -> None:
    """Driver side, before launching: check the answers' lengths (unless a caller that runs many jobs of
    one dataset did so once: ``check_lengths=False``), optionally wipe old runs, check resumability,
    record settings."""
    if check_lengths:
        check_answer_lengths(jobs[0])
    if restart:
        for job in jobs:
            shutil.rmtree(job.run_dir, ignore_errors=True)
            shutil.rmtree(Path(job.run_dir).parent / "ray_results" / job.name, ignore_errors=True)
    check_resumable(jobs, world_size)
    for job in jobs:
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(job.run_dir) / RUN_SETTINGS_FILE, run_settings(job, world_size))


def read_summaries(jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """``metrics.json`` of each finished job, by method name."""
    return {job.name: json.loads((Path(job.run_dir) / "metrics.json").read_text()) for job in jobs}


def prepared_assets(cfg: RunConfig) -> ModelAssets:
    """:func:`resolve_model_assets` inside a process group: rank 0 prepares the embedded models (if
    needed) while the other ranks wait; then every rank reads the finished cache. A stop asked for during
    the preparation stops every rank (:class:`Preempted`). Collective."""
    stopped: list[Preempted | None] = [None]
    if is_main_process():
        try:
            assets = resolve_model_assets(cfg)
        except Preempted as exc:
            stopped[0] = exc
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(stopped, src=0)  # also the barrier the other ranks wait at
    if stopped[0] is not None:
        raise stopped[0]
    return assets if is_main_process() else resolve_model_assets(cfg, log=lambda *_: None)


def run_without_ray(cfg: RunConfig, restart: bool = False) -> dict[str, dict[str, Any]]:
    """Prepare on rank 0 (others wait), then unlearn each method on all ranks; returns the summaries."""
    init_distributed()
    try:
        assets = prepared_assets(cfg)
        if is_main_process():
            prepare_run_dirs(plan_jobs(cfg, assets), get_world_size(), restart)
        barrier()
        jobs = plan_jobs(cfg, assets)
        for job in jobs:
            run_job(job)
        barrier()
        return read_summaries(jobs)
    finally:
        destroy_process_group()
