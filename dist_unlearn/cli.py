"""``dist-unlearn`` command line: run, sweep, eval, report, prepare, bench, submit, init, config.

Every command validates its config fully (schema, method names and parameters) before Ray or
DeepSpeed start; a bad config prints one message naming the field and the fix and exits with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dist_unlearn.config import ConfigError, RunConfig, load_config


def _load(path: str, overrides: list[str]) -> RunConfig:
    """The config at ``path`` with ``overrides``, validated for its job kind with every registry."""
    from dist_unlearn.engine.validate import run_registries

    return load_config(path, overrides, registries=run_registries())


def _launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _quiet_driver(cfg: RunConfig) -> None:
    """Library chatter of this process to OUTPUT/logs/driver.log unless ``--verbose`` (engine/chatter.py;
    :func:`main` recorded the flag before any library was imported)."""
    from dist_unlearn.engine.chatter import attach_log_file, log_path

    attach_log_file(log_path(cfg.output.dir, "driver"))


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides)
    _quiet_driver(cfg)
    from dist_unlearn.engine.preemption import Preempted, clear_stop_request, install_signal_handlers
    from dist_unlearn.engine.prepare import resolve_model_assets
    from dist_unlearn.eval.tables import before_after_table, retrieval_table
    from dist_unlearn.io import write_json_atomic

    if cfg.failure.handle_signals:  # SIGUSR1/SIGTERM: checkpoint at the next step, exit 75
        install_signal_handlers(cfg.output.dir)
    try:
        if cfg.ray.enabled and not _launched_by_torchrun():
            from dist_unlearn.ray.trainer import run_with_ray

            summaries = run_with_ray(cfg, resolve_model_assets(cfg), restart=args.restart)
        else:
            from dist_unlearn.engine.runner import run_without_ray

            summaries = run_without_ray(cfg, restart=args.restart)
    except Preempted:
        if os.environ.get("RANK", "0") == "0":
            clear_stop_request(cfg.output.dir)  # honoured: the next run of this command starts clean
        raise
    if os.environ.get("RANK", "0") == "0":  # the driver, or rank 0 of a torchrun launch
        # a stop asked for during the last step came too late to matter; left on disk it would stop the
        # next run of this directory (an extension, say) at its first step
        clear_stop_request(cfg.output.dir)
        out = Path(cfg.output.dir)
        write_json_atomic(out / "summary.json", summaries)
        if cfg.job.kind == "contrastive":
            from dist_unlearn.config.schema import FICTITIOUS_SOURCE

            fictitious = cfg.contrastive.data == FICTITIOUS_SOURCE
            held_out = "questions about people never trained on" if fictitious else "dev queries, never trained on"
            print(f"\nheld-out retrieval ({held_out}):")
            print(retrieval_table(summaries["contrastive"]))
        else:
            print("\n" + before_after_table(summaries))
        print(f"\nper method: {out.resolve()}/<method>/ (model/, metrics.json, metrics.jsonl)")
        print(f"summary: {out.resolve() / 'summary.json'}")
    return 0


def _load_sweep(path: str, overrides: list[str]) -> tuple[RunConfig, list]:
    """The config and its search space (``sweep.space``), every value checked like a run's config."""
    from dist_unlearn.config import config_from_dict, config_to_dict
    from dist_unlearn.config.sweep import check_space, parse_space
    from dist_unlearn.engine.validate import run_registries

    def validate(data: dict) -> None:
        config_from_dict(data, registries=run_registries())

    cfg = _load(path, overrides)
    dims = parse_space(cfg.sweep.space)
    check_space(dims, cfg, config_to_dict(cfg), validate)
    return cfg, dims


def cmd_sweep(args: argparse.Namespace) -> int:
    """Ray Tune trials of CONFIG over ``sweep.space``; see :mod:`dist_unlearn.ray.sweep`."""
    cfg, dims = _load_sweep(args.config, args.overrides)
    _quiet_driver(cfg)
    from dist_unlearn.ray.sweep import run_sweep

    return run_sweep(cfg, dims, args.config, args.overrides, restart=args.restart)


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides)
    from dist_unlearn.engine.prepare import prepare_embedded

    assets = prepare_embedded(cfg, force=args.force)
    print(f"target: {assets.target_dir}\noracle: {assets.oracle_dir}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config (defaults filled in, overrides applied, validated) as YAML: what ``run``
    would use. The output is itself a valid config file."""
    import yaml

    from dist_unlearn.config import config_to_dict

    cfg = _load(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dist_unlearn.bench import contrastive, memory_suite

    suite = memory_suite if args.suite == "memory" else contrastive
    try:
        args = suite.resolve(args)
    except ValueError as exc:
        print(f"dist-unlearn bench {args.suite}: {exc}", file=sys.stderr)
        return 2
    suite.run(args)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides)
    _quiet_driver(cfg)
    from dist_unlearn.engine.eval_job import check_targets, eval_targets, reference_oracle_dir, run_eval_without_ray
    from dist_unlearn.engine.prepare import resolve_model_assets
    from dist_unlearn.eval.report import report_table

    if cfg.ray.enabled and not _launched_by_torchrun():
        from dist_unlearn.ray.evaluate import run_eval_with_ray

        assets = resolve_model_assets(cfg)
        oracle_dir = reference_oracle_dir(cfg, assets.oracle_dir)
        targets = eval_targets(cfg, assets.target_dir, oracle_dir)
        check_targets(targets)
        run_eval_with_ray(cfg, targets, oracle_dir)
    else:  # one process, or every torchrun rank: the embedded models are prepared inside the group
        targets = run_eval_without_ray(cfg)
    if os.environ.get("RANK", "0") == "0":
        import json

        out = Path(cfg.output.dir)
        evals = {name: json.loads((out / name / "eval.json").read_text()) for name in targets}
        print(report_table(evals))
        print(f"\nper model: {out.resolve()}/<name>/eval.json")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dist_unlearn.eval.report import write_report

    try:
        md, png = write_report(args.run_dirs, args.out)
    except FileNotFoundError as exc:
        print(f"dist-unlearn report: {exc}", file=sys.stderr)
        return 2
    print(md.read_text())
    print(f"report: {md}\nplot: {png}")
    return 0


def cmd_bench_unlearning(args: argparse.Namespace) -> int:
    from dist_unlearn.bench.unlearning import main_from_args

    try:
        return main_from_args(args, _load)
    except ValueError as exc:
        print(f"dist-unlearn bench unlearning: {exc}", file=sys.stderr)
        return 2


def cmd_submit(args: argparse.Namespace) -> int:
    from dist_unlearn.launch.submit import SubmitError, describe, prepare_job, request_from_args, submit_job

    request = request_from_args(args)
    load = _load if request.command == "run" else (lambda path, overrides: _load_sweep(path, overrides)[0])
    try:
        job = prepare_job(request, load)
        if args.dry_run:
            print(job.script, end="")
            return 0
        job_id, script_path = submit_job(job)
    except SubmitError as exc:
        print(f"dist-unlearn submit: {exc}", file=sys.stderr)
        return 2
    print("\n".join(describe(job, job_id, script_path, request.nodes, request.gpus_per_node)))
    return 0


VERBOSE_HELP = "show Ray's, DeepSpeed's and transformers' logs on the console (default: OUTPUT/logs/*.log)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-unlearn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="unlearn with every method of CONFIG (Ray workers, or torchrun ranks)")
    run.add_argument("config", help="YAML run config")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. deepspeed.zero_stage=2")
    run.add_argument("--restart", action="store_true", help="discard earlier checkpoints of these methods")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser(
        "sweep", help="Ray Tune trials over sweep.space: best forget quality at utility >= x * the target's"
    )
    sweep.add_argument("config", help="YAML run config with a sweep: section (or sweep.* overrides)")
    sweep.add_argument(
        "overrides", nargs="*", help="e.g. 'sweep.space.train.lr=loguniform(1e-5,1e-3)' sweep.num_samples=4"
    )
    sweep.add_argument("--restart", action="store_true", help="discard this output.dir's earlier trials and start over")
    sweep.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sweep.set_defaults(func=cmd_sweep)
    prep = sub.add_parser("prepare", help="build the embedded fictitious-facts target and oracle models")
    prep.add_argument("config")
    prep.add_argument("overrides", nargs="*")
    prep.add_argument("--force", action="store_true", help="rebuild even if a matching cache exists")
    prep.set_defaults(func=cmd_prepare)
    bench = sub.add_parser("bench", help="measure speed and memory (writes JSON, prints a table)")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    from dist_unlearn.bench.contrastive import add_arguments as add_bench_arguments

    contrastive = bench_sub.add_parser(
        "contrastive", help="GradCache overhead/memory, vs sentence-transformers, tiled loss"
    )
    add_bench_arguments(contrastive)
    contrastive.set_defaults(func=cmd_bench)
    from dist_unlearn.bench.memory_suite import add_arguments as add_memory_arguments

    memory = bench_sub.add_parser(
        "memory", help="LM loss plain vs chunked, fp32 vs nf4+LoRA step, reference models, sharded evaluation"
    )
    add_memory_arguments(memory)
    memory.set_defaults(func=cmd_bench)
    from dist_unlearn.bench.unlearning import add_arguments as add_unlearning_bench_arguments

    unlearning = bench_sub.add_parser("unlearning", help="run methods on the embedded benchmark, evaluate, report")
    add_unlearning_bench_arguments(unlearning)
    unlearning.set_defaults(func=cmd_bench_unlearning)
    ev = sub.add_parser("eval", help="evaluate saved models (metrics, MIA, generation, attacks) -> eval.json")
    ev.add_argument("config")
    ev.add_argument("overrides", nargs="*")
    ev.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    ev.set_defaults(func=cmd_eval)
    rep = sub.add_parser("report", help="report.md + tradeoff.png from the eval.json files of run directories")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", default=None, help="where to write (default: the first run directory)")
    rep.set_defaults(func=cmd_report)
    from dist_unlearn.launch.submit import add_arguments as add_submit_arguments

    submit = sub.add_parser("submit", help="render an sbatch script for CONFIG (Ray cluster or torchrun) and submit it")
    add_submit_arguments(submit)
    submit.set_defaults(func=cmd_submit)
    from dist_unlearn.launch.init import add_arguments as add_init_arguments
    from dist_unlearn.launch.init import run_init

    init = sub.add_parser("init", help="write the example configs (quickstart, bench) into DIR (default: configs)")
    add_init_arguments(init)
    init.set_defaults(func=run_init)
    show = sub.add_parser("config", help="print the resolved CONFIG (defaults, overrides, validated) as YAML")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dist_unlearn.engine.chatter import quiet_console, set_verbose

    set_verbose("--verbose" in (sys.argv[1:] if argv is None else argv))
    quiet_console()  # before DeepSpeed, Ray or transformers are imported (engine/chatter.py)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options, e.g. `submit CONFIG --nodes 2 train.steps=10`
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from dist_unlearn.engine.preemption import REQUEUE_EXIT_CODE, Preempted

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"dist-unlearn: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        if os.environ.get("RANK", "0") == "0":  # the driver, or rank 0 of a torchrun launch
            print(f"\ndist-unlearn: {exc}. Run the same command again to resume.", file=sys.stderr, flush=True)
        return REQUEUE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
