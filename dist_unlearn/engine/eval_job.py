"""``dist-unlearn eval``: evaluate saved models with the suite, sharded over the ranks of the process
group (Ray workers, ``torchrun`` ranks, or one process). Never imports Ray.

Which models: ``eval.model_dir`` when set, else every method's ``OUTPUT/<method>/model`` that exists,
plus the starting model (``original``) and the ``oracle`` (``eval.oracle_dir``, else the embedded
benchmark's), which is also the reference of forget quality and PrivLeak. Each result
goes to ``OUTPUT/<name>/eval.json`` (rank 0, temporary name then rename), and the oracle's statistics to
``OUTPUT/oracle_stats.json`` (:mod:`dist_unlearn.eval.oracle_stats`). With ``eval.oracle_stats=FILE`` no
oracle model is loaded: the file is the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_unlearn.config import RunConfig, config_from_dict, config_to_dict


def reference_oracle_dir(cfg: RunConfig, assets_oracle_dir: str | None) -> str | None:
    """The oracle model to evaluate as the reference: ``eval.oracle_dir``, else the embedded one; ``None``
    when ``eval.oracle_stats`` gives the reference as a file."""
    if cfg.eval.oracle_stats:
        return None
    return cfg.eval.oracle_dir or assets_oracle_dir


def eval_targets(cfg: RunConfig, target_dir: str, oracle_dir: str | None) -> dict[str, str]:
    """``name → model directory`` to evaluate (see module docstring)."""
    if cfg.eval.model_dir:
        path = Path(cfg.eval.model_dir)
        return {(path.parent.name if path.name == "model" else path.name): str(path)}
    out = Path(cfg.output.dir).resolve()
    targets = {"original": target_dir}
    if oracle_dir:
        targets["oracle"] = oracle_dir
    for name in cfg.method.names:
        if (out / name / "model" / "config.json").is_file():
            targets[name] = str(out / name / "model")
    return targets


def check_targets(targets: dict[str, str]) -> None:
    """Fail before any work when a model directory is missing (one line naming the field and the fix)."""
    from dist_unlearn.config import ConfigError

    missing = [
        f"eval.model_dir: {path} has no config.json"
        for path in targets.values()
        if not (Path(path) / "config.json").is_file()
    ]
    if missing:
        problems = [
            m + ". Fix: point eval.model_dir at a saved model directory (e.g. OUTPUT/<method>/model)" for m in missing
        ]
        raise ConfigError("invalid config:\n" + "\n".join(problems), problems)


def eval_job(cfg: RunConfig, targets: dict[str, str], oracle_dir: str | None) -> dict[str, Any]:
    """Plain data for the workers of :func:`run_eval_job`."""
    return {"config": config_to_dict(cfg), "targets": targets, "oracle_dir": oracle_dir}


def run_eval_job(job: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every target of ``job`` on this rank's share (collective); rank 0 writes the eval.json files."""
    from dist_unlearn.distributed.env import is_main_process
    from dist_unlearn.engine.prepare import load_benchmark
    from dist_unlearn.engine.worker import start_worker
    from dist_unlearn.eval.oracle_stats import ORACLE_STATS_FILE, load_oracle_stats, stats_meta, write_oracle_stats
    from dist_unlearn.eval.suite import evaluate_directory
    from dist_unlearn.io import write_json_atomic

    cfg = config_from_dict(job["config"])
    ctx = start_worker(cfg)
    facts = load_benchmark(cfg.data)
    out = Path(cfg.output.dir).resolve()
    results: dict[str, Any] = {}
    oracle_result = load_oracle_stats(cfg.eval.oracle_stats) if cfg.eval.oracle_stats else None
    for name, model_dir in job["targets"].items():
        evaluation = evaluate_directory(cfg, model_dir, job["oracle_dir"], facts, ctx.device, oracle_result)
        oracle_result = evaluation["oracle"]
        evaluation["name"] = name
        if is_main_process():
            (out / name).mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / name / "eval.json", evaluation)
        results[name] = evaluation
    if job["oracle_dir"] and oracle_result is not None and is_main_process():
        write_oracle_stats(out / ORACLE_STATS_FILE, oracle_result, stats_meta(cfg, job["oracle_dir"]))
    return results


def run_eval_without_ray(cfg: RunConfig, only: tuple[str, ...] | None = None) -> dict[str, str]:
    """:func:`run_eval_job` in this process or on each ``torchrun`` rank: rank 0 prepares the embedded
    models if needed (the others wait), then every rank evaluates its share of the targets of
    :func:`eval_targets` (those named in ``only``, when given). Returns the targets evaluated."""
    from dist_unlearn.distributed.env import destroy_process_group, init_distributed
    from dist_unlearn.engine.runner import prepared_assets

    init_distributed()
    try:
        assets = prepared_assets(cfg)
        oracle_dir = reference_oracle_dir(cfg, assets.oracle_dir)
        targets = eval_targets(cfg, assets.target_dir, oracle_dir)
        targets = {name: path for name, path in targets.items() if only is None or name in only}
        check_targets(targets)
        run_eval_job(eval_job(cfg, targets, oracle_dir))
        return targets
    finally:
        destroy_process_group()
