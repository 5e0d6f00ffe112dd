"""``dist-unlearn sweep``: Ray Tune trials of the unlearning run, on the cluster the run uses.

Flow (driver): join or start the Ray cluster (:func:`~dist_unlearn.ray.trainer.connect`); prepare the
models as ``run`` does; evaluate the target once with the suite through ``dist-unlearn eval``'s Ray path
(``SWEEP/target/eval.json``, kept for reruns), which gives the utility the constraint refers to; then
one Ray Tune experiment (``SWEEP/tune``) whose trials each run the ordinary unlearning job with their
overrides through :func:`~dist_unlearn.ray.trainer.run_jobs_on_ray` (a ``TorchTrainer`` started inside
the Tune trial, output in ``SWEEP/trials/trial_NNN_HASH/<method>/``).

Each periodic evaluation of a trial (``eval.every_steps``) reaches Tune through a Ray Train callback
(Ray's ``TuneReportCallback`` with the objective applied: :class:`~dist_unlearn.eval.sweep_report.Objective`),
so ASHA can stop poor trials at its rungs (``step`` is its time axis); a trial that ends reports its
final evaluation (``eval.json``, the full suite).

Resuming: SIGINT, SIGTERM, SIGUSR1 or the file ``SWEEP/STOP`` ends the experiment after Tune saved its
state (exit 75); running the same command again restores it (``Tuner.restore``): finished trials are
kept, unfinished ones run again and resume from their own checkpoints in their run directories. A trial
whose run directory already holds ``metrics.json`` and ``eval.json`` (finished before a driver was
killed without saving Tune's state) only reports them again: no finished trial is trained twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from dist_unlearn.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from dist_unlearn.config.schema import SweepConfig
from dist_unlearn.config.sweep import (
    CHOICE,
    GRID,
    LOGUNIFORM,
    RANDINT,
    UNIFORM,
    Dimension,
    apply_overrides,
    override_args,
    shell_command,
    trial_count,
    trial_dirname,
)
from dist_unlearn.engine.eval_job import reference_oracle_dir
from dist_unlearn.engine.preemption import REQUEUE_EXIT_CODE, STOP_FILE_NAME
from dist_unlearn.engine.prepare import ModelAssets, resolve_model_assets
from dist_unlearn.engine.runner import check_answer_lengths, plan_jobs, prepare_run_dirs
from dist_unlearn.eval.sweep_report import (
    DONE,
    ERROR,
    PENDING,
    STOPPED,
    Objective,
    TrialRow,
    rank,
    result_numbers,
    write_results,
)
from dist_unlearn.io import write_json_atomic
from dist_unlearn.ray.evaluate import evaluate_on_ray
from dist_unlearn.ray.trainer import _wants_gpu, connect, disconnect, run_jobs_on_ray

TRIAL_CPUS = 0.01
"""CPUs Tune reserves for a trial's own process (it only waits for its Ray Train workers, which reserve theirs)."""
TRIAL_RECORD = "trial.json"
SETTINGS_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepSetup:
    """What every trial needs (plain data, shipped to the trials once)."""

    sweep_dir: str
    base: dict[str, Any]
    """The run config every trial starts from (``config_to_dict``; model and oracle resolved)."""
    target_dir: str
    oracle_dir: str | None
    objective: Objective


def trial_index(trial_id: str) -> int:
    """The running number of a Tune trial id (``ab12c_00003`` → 3)."""
    return int(trial_id.rsplit("_", 1)[-1])


def trial_root(sweep_dir: str | Path, trial_id: str, overrides: dict[str, Any]) -> Path:
    """``SWEEP/trials/trial_NNN_HASH``: the trial's ``output.dir``."""
    return Path(sweep_dir) / "trials" / trial_dirname(trial_index(trial_id), overrides)


class PeriodicEvalToTune(TuneReportCallback):
    """Ray Train callback in a Tune trial: each periodic evaluation the workers report (``eval`` in the
    metrics, see ``tasks/unlearn.py``) goes to Tune as the objective's numbers at its ``step``; other
    reports (checkpoints) and the evaluation at the last step (the final one supersedes it) do not."""

    def __init__(self, objective: Objective, steps: int) -> None:
        super().__init__()
        self.objective, self.steps = objective, steps

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        report = metrics[0]
        step = int(report.get("step", 0))
        if "eval" not in report or step >= self.steps:
            return
        self._training_actor_item_queue.put({"step": step, "final": 0, **self.objective.measure(report["eval"])})


def _finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "eval.json").is_file()


def run_trial(config: dict[str, Any], setup: SweepSetup) -> None:
    """The Tune function trainable: one unlearning run with ``config["overrides"]`` (the same job
    ``dist-unlearn run`` runs), then its final evaluation reported to Tune."""
    overrides = dict(config["overrides"])
    root = trial_root(setup.sweep_dir, tune.get_context().get_trial_id(), overrides)
    cfg = config_from_dict(apply_overrides(setup.base, {**overrides, "output.dir": str(root)}))
    job = plan_jobs(cfg, ModelAssets(setup.target_dir, setup.oracle_dir))[0]
    run_dir = Path(job.run_dir)
    if not _finished(run_dir):
        data_changed = any(key.startswith("data.") for key in overrides)  # else the sweep checked it once
        prepare_run_dirs([job], cfg.ray.num_workers, check_lengths=data_changed)
        run_jobs_on_ray(cfg, [job], callbacks=[PeriodicEvalToTune(setup.objective, cfg.train.steps)])
    final = json.loads((run_dir / "eval.json").read_text())["result"]
    tune.report({"step": cfg.train.steps, "final": 1, **setup.objective.measure(result_numbers(final))})


class SweepProgress(tune.Callback):
    """Driver side: one line per trial result and end, each finished trial recorded in its directory
    (``trial.json``: status, overrides, last numbers), and the ``STOP`` file turned into Tune's stop."""

    def __init__(self, sweep_dir: str, total: int) -> None:
        self.sweep_dir, self.total = sweep_dir, total
        self.stop_sent = False

    def _label(self, trial: Any) -> str:
        overrides = trial.config.get("overrides", {})
        return f"trial {trial_index(trial.trial_id)}/{self.total} ({' '.join(override_args(overrides))})"

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if not self.stop_sent and (Path(self.sweep_dir) / STOP_FILE_NAME).exists():
            self.stop_sent = True
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own handler: save the experiment, end

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        print(f"{self._label(trial)}: started", flush=True)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any):
        if not result.get("final"):
            print(f"{self._label(trial)} step {result.get('step')}: {_numbers_text(result)}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        status = DONE if last.get("final") else STOPPED
        self._record(trial, status, last)
        where = "" if status == DONE else f" at step {last.get('step')}"
        print(f"{self._label(trial)}: {status}{where}: {_numbers_text(last)}", flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        message = _first_error_line(trial)
        self._record(trial, ERROR, trial.last_result or {}, message)
        print(f"{self._label(trial)}: error: {message}", flush=True)

    def _record(self, trial: Any, status: str, last: dict[str, Any], error: str = "") -> None:
        overrides = dict(trial.config.get("overrides", {}))
        root = trial_root(self.sweep_dir, trial.trial_id, overrides)
        keep = ("step", "forget_quality", "utility", "utility_metric", "utility_ratio", "feasible", "score")
        record = {
            "trial_id": trial.trial_id,
            "index": trial_index(trial.trial_id),
            "overrides": overrides,
            "status": status,
            "error": error,
            "last": {k: last.get(k) for k in keep},
        }
        write_json_atomic(root / TRIAL_RECORD, record)


def _first_error_line(trial: Any) -> str:
    text = str(getattr(trial, "error_msg", "") or "")
    if not text and getattr(trial, "error_file", None) and Path(trial.error_file).is_file():
        text = Path(trial.error_file).read_text()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "failed (see the Tune trial's error.txt)"


def _numbers_text(result: dict[str, Any]) -> str:
    fq, utility, ratio = result.get("forget_quality"), result.get("utility"), result.get("utility_ratio")
    if fq is None or ratio is None:
        return "no forget quality / utility measured"
    mark = "meets" if result.get("feasible") else "misses"
    return (
        f"forget quality {fq:.3g}, {result.get('utility_metric')} {utility:.3f} "
        f"({ratio:.3f}× the target's: {mark} the constraint)"
    )


def tune_domain(dim: Dimension) -> Any:
    """The Ray Tune search-space object of a dimension (randint's high end included)."""
    values = list(dim.values)
    if dim.kind == GRID:
        return tune.grid_search(values)
    if dim.kind == CHOICE:
        return tune.choice(values)
    if dim.kind == UNIFORM:
        return tune.uniform(*values)
    if dim.kind == LOGUNIFORM:
        return tune.loguniform(*values)
    if dim.kind == RANDINT:
        return tune.randint(values[0], values[1] + 1)
    raise ValueError(f"unknown dimension kind {dim.kind!r}")


def _max_steps(cfg: RunConfig, dims: Sequence[Dimension]) -> int:
    steps = [cfg.train.steps, *(int(v) for d in dims if d.key == "train.steps" for v in d.values)]
    return max(steps)


def _scheduler(cfg: RunConfig, dims: Sequence[Dimension]) -> Any:
    sweep = cfg.sweep
    if sweep.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        max_t=_max_steps(cfg, dims) + 1,  # reaching the last step is never itself a reason to stop
        grace_period=sweep.grace_steps or cfg.eval.every_steps,
        reduction_factor=sweep.reduction_factor,
    )


def _concurrency(cfg: RunConfig) -> int:
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // max(1, cfg.ray.num_workers * max(1, cfg.ray.cpus_per_worker)))
    if _wants_gpu(cfg):
        fits = min(fits, int(resources.get("GPU", 0) // cfg.ray.num_workers))
    return max(1, fits)


def sweep_settings(cfg: RunConfig, dims: Sequence[Dimension]) -> dict[str, Any]:
    """What a rerun must keep to resume this sweep: the trials' config, the space, the search settings."""
    base = config_to_dict(cfg)
    search = base.pop("sweep")
    base.pop("ray")  # where the trials run (address, ...) may change between runs
    search.pop("max_concurrent")
    search.pop("space")
    return {
        "config": base,
        "space": [{"key": d.key, "kind": d.kind, "values": list(d.values)} for d in dims],
        "search": search,
    }


def _check_resumable(sweep_dir: Path, settings: dict[str, Any]) -> None:
    path = sweep_dir / SETTINGS_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(settings))
    changed = [key for key in ("config", "space", "search") if old.get(key) != new.get(key)]
    if changed:
        detail = ", ".join(_changed_keys(old.get(k), new.get(k), k) for k in changed)
        raise ConfigError(
            f"output.dir: {sweep_dir} holds a sweep with other settings ({detail}). Fix: choose a new output.dir, "
            "or pass --restart to start this sweep over"
        )


def _changed_keys(old: Any, new: Any, prefix: str) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        parts = [_changed_keys(old.get(k), new.get(k), f"{prefix}.{k}") for k in keys if old.get(k) != new.get(k)]
        return ", ".join(parts[:3]) + (", ..." if len(parts) > 3 else "")
    return prefix


def _target_result(cfg: RunConfig, assets: ModelAssets, sweep_dir: Path) -> dict[str, Any]:
    """The target's evaluation (``SWEEP/target/eval.json``, made once through ``dist-unlearn eval``'s path)."""
    path = sweep_dir / "target" / "eval.json"
    if not path.is_file():
        print("evaluating the target model (the reference of the utility constraint) ...", flush=True)
        evaluate_on_ray(cfg, {"target": assets.target_dir}, reference_oracle_dir(cfg, assets.oracle_dir))
    return json.loads(path.read_text())["result"]


def _trial_base(cfg: RunConfig, assets: ModelAssets) -> dict[str, Any]:
    base = config_to_dict(cfg)
    base["sweep"] = config_to_dict(RunConfig(sweep=SweepConfig()))["sweep"]
    base["model"]["path"] = assets.target_dir
    base["eval"]["oracle_dir"] = reference_oracle_dir(cfg, assets.oracle_dir) or ""  # "" with eval.oracle_stats
    return base


_tuning = False


def _on_sigterm(signum: int, frame: Any) -> None:
    if _tuning:  # Tune handles SIGUSR1 like SIGINT: save the experiment's state, stop the trials, return
        os.kill(os.getpid(), signal.SIGUSR1)
    else:
        raise KeyboardInterrupt


def run_sweep(
    cfg: RunConfig,
    dims: Sequence[Dimension],
    config_path: str,
    overrides: Sequence[str],
    restart: bool = False,
) -> int:
    """Run (or resume) the sweep of ``cfg`` over ``dims``; write the results table and plot; print the best
    trial and the ``dist-unlearn run`` command that reproduces it. Returns the exit code (75: interrupted)."""
    global _tuning
    sweep_dir = Path(cfg.output.dir)
    if restart:
        for name in ("tune", "trials", SETTINGS_FILE, "results.json", "results.md", "pareto.png"):
            target = sweep_dir / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    settings = sweep_settings(cfg, dims)
    _check_resumable(sweep_dir, settings)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / STOP_FILE_NAME).unlink(missing_ok=True)
    write_json_atomic(sweep_dir / SETTINGS_FILE, settings)
    total = trial_count(dims, cfg.sweep.num_samples)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console tables off (verbose=0 then prints nothing)
    assets = resolve_model_assets(cfg)
    check_answer_lengths(plan_jobs(cfg, assets)[0])  # once for every trial that keeps the data settings
    started = connect(cfg)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        target = _target_result(cfg, assets, sweep_dir)
        objective = Objective(cfg.sweep.min_utility_ratio, {k: v for k, v in result_numbers(target).items()})
        setup = SweepSetup(str(sweep_dir), _trial_base(cfg, assets), assets.target_dir, assets.oracle_dir, objective)
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": TRIAL_CPUS})
        param_space = {"overrides": {d.key: tune_domain(d) for d in dims}}
        path = sweep_dir / "tune"
        resumed = tune.Tuner.can_restore(str(path))
        if resumed:
            tuner = tune.Tuner.restore(
                str(path), trainable, resume_unfinished=True, resume_errored=True, param_space=param_space
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric="score",
                    mode="max",
                    num_samples=cfg.sweep.num_samples,
                    scheduler=_scheduler(cfg, dims),
                    search_alg=BasicVariantGenerator(max_concurrent=_concurrency(cfg), random_state=cfg.sweep.seed),
                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
                ),
                run_config=tune.RunConfig(
                    name="tune",
                    storage_path=str(sweep_dir),
                    verbose=0,
                    callbacks=[SweepProgress(str(sweep_dir), total)],
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        print(
            f"sweep: {total} trial(s) of {', '.join(d.key + '=' + d.describe() for d in dims)}"
            f"{' (resumed)' if resumed else ''}; objective: best forget quality with utility >= "
            f"{cfg.sweep.min_utility_ratio:g}x the target's; trials in {sweep_dir / 'trials'}",
            flush=True,
        )
        _tuning = True
        try:
            grid = tuner.fit()
        finally:
            _tuning = False
        rows = _rows(sweep_dir, grid)
    finally:
        signal.signal(signal.SIGTERM, previous)
        disconnect(started)
    json_path, md_path, png_path = write_results(
        sweep_dir,
        rows,
        objective,
        {"config": str(Path(config_path).resolve()), "overrides": list(overrides), "target": assets.target_dir},
    )
    unfinished = [r for r in rows if r.status == PENDING]
    print(f"\nresults: {md_path}\n         {json_path}\nplot: {png_path}")
    if unfinished or len(rows) < total:
        left = max(len(unfinished), total - len(rows) + len(unfinished))
        print(
            f"\ndist-unlearn: sweep interrupted with {left} of {total} trial(s) unfinished. "
            "Run the same command again to resume.",
            file=sys.stderr,
            flush=True,
        )
        return REQUEUE_EXIT_CODE
    _print_best(rows, cfg, config_path, overrides, assets)
    return 0


def _rows(sweep_dir: Path, grid: Any) -> list[TrialRow]:
    """One row per trial of the experiment: its record (``trial.json``) when it ended, else not finished."""
    rows = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        overrides = dict((result.config or {}).get("overrides", {}))
        root = trial_root(sweep_dir, trial_id, overrides)
        record_path = root / TRIAL_RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        last = record["last"] if record else dict(result.metrics or {})
        status = record["status"] if record else PENDING
        rows.append(
            TrialRow(
                index=trial_index(trial_id),
                name=root.name,
                overrides=overrides,
                status=status,
                step=last.get("step"),
                forget_quality=last.get("forget_quality"),
                utility=last.get("utility"),
                utility_metric=last.get("utility_metric"),
                utility_ratio=last.get("utility_ratio"),
                feasible=bool(last.get("feasible")),
                score=float(last["score"]) if last.get("score") is not None else float("-inf"),
                run_dir=str(root),
                error=record.get("error", "") if record else "",
            )
        )
    return sorted(rows, key=lambda r: r.index)


def reproduce_command(
    cfg: RunConfig, row: TrialRow, config_path: str, overrides: Sequence[str], assets: ModelAssets
) -> str:
    """The ``dist-unlearn run`` command that repeats ``row``'s trial (same config, overrides, model)."""
    kept = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("sweep.")]
    words = ["dist-unlearn", "run", str(Path(config_path).resolve()), *kept, *override_args(row.overrides)]
    if cfg.model.path != assets.target_dir:  # the embedded model the sweep prepared, not a new one
        words.append(f"model.path={assets.target_dir}")
    words.append(f"output.dir={Path(cfg.output.dir) / 'best'}")
    return shell_command(words)


def _print_best(
    rows: list[TrialRow], cfg: RunConfig, config_path: str, overrides: Sequence[str], assets: ModelAssets
) -> None:
    ranked = rank(rows)
    if not ranked or ranked[0].score == float("-inf"):
        print("\nno trial measured forget quality and utility: no best trial")
        return
    best = ranked[0]
    x = cfg.sweep.min_utility_ratio
    head = (
        f"best trial {best.index}"
        if best.feasible
        else f"no trial keeps utility >= {x:g}x the target's; closest: trial {best.index}"
    )
    print(
        f"\n{head}: forget quality {best.forget_quality:.3g}, {best.utility_metric} {best.utility:.3f} "
        f"({best.utility_ratio:.3f}x the target's), {best.status}"
    )
    names = best.overrides.get("method.names", cfg.method.names)
    method = names[0] if isinstance(names, list) else str(names).split(",")[0].strip()
    model = Path(best.run_dir) / method / "model"
    if model.is_dir():
        print(f"model: {model}")
    print(f"reproduce: {reproduce_command(cfg, best, config_path, overrides, assets)}")
