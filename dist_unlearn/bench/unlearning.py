"""``dist-unlearn bench unlearning CONFIG``: run unlearning methods on the embedded benchmark, evaluate
every result with the suite (plus the starting model and the oracle), and write the report.

Methods: ``--methods a,b`` or ``--methods all`` (every name in the ``OBJECTIVES`` registry, so new
objectives appear without changes here); default: ``method.names`` of the config. Each method runs as
its own ``dist-unlearn run`` process, so a method that fails (e.g. needs data the benchmark lacks) is
recorded in ``bench_unlearning.json`` with its error and the others go on. Each run evaluates its model
at the end (``RUN/eval.json``, with ``eval.attacks``); the starting model and the oracle are evaluated
here with the same suite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OVERRIDES = ("ray.enabled=false",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (model.path=embedded for the embedded benchmark)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--methods", default="", help="comma-separated method names, or 'all' (registry)")
    parser.add_argument("--ray", action="store_true", help="run methods and evaluation on Ray workers")


def resolve_methods(requested: str, configured: list[str]) -> list[str]:
    """The methods to run; ValueError naming ``--methods`` and the known names when one is unknown."""
    from dist_unlearn.unlearning import OBJECTIVES

    if not requested:
        return list(configured)
    if requested == "all":
        return list(OBJECTIVES)
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}. Fix: choose from {', '.join(OBJECTIVES)}")
    return names


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_unlearn.cli", *args], capture_output=True, text=True)


def run(
    config: str, overrides: list[str], methods: list[str], out_dir: Path, load, use_ray: bool = False
) -> dict[str, Any]:
    """Run each method, evaluate the baselines, write ``report.md``/``tradeoff.png``; returns the bench record.

    ``load(config, overrides)`` is the CLI's validating config loader."""
    from dist_unlearn.engine.eval_job import run_eval_without_ray
    from dist_unlearn.eval.report import write_report
    from dist_unlearn.io import write_json_atomic

    base = list(overrides) + ([] if use_ray else list(DEFAULT_OVERRIDES))
    record: dict[str, Any] = {"config": config, "overrides": base, "methods": {}}
    for name in methods:
        started = time.perf_counter()
        result = _cli(["run", config, *base, f"method.names={name}", "--restart"])
        status = "ok" if result.returncode == 0 else "failed"
        record["methods"][name] = {"status": status, "seconds": round(time.perf_counter() - started, 1)}
        if status == "failed":
            record["methods"][name]["error"] = (result.stderr.strip().splitlines() or ["?"])[-1][:300]
        print(f"bench unlearning: {name}: {status} ({record['methods'][name]['seconds']} s)", flush=True)
    # each finished run wrote its own eval.json (the suite runs at the end of `dist-unlearn run`);
    # the starting model and the oracle are evaluated here, in this process
    started = time.perf_counter()
    run_eval_without_ray(load(config, overrides), only=("original", "oracle"))
    record["baseline_eval_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out_dir / "bench_unlearning.json", record)
    failed = {n: r["error"] for n, r in record["methods"].items() if r["status"] != "ok"}
    notes = "".join(f"\n- `{n}` did not run: {err}" for n, err in failed.items())
    md, png = write_report([out_dir], notes=("\nMethods that failed:" + notes + "\n") if notes else "")
    print(md.read_text())
    print(f"report: {md}\nplot: {png}")
    return record


def main_from_args(args: argparse.Namespace, load) -> int:
    """Entry point of the CLI (``load`` validates the config like every other command)."""
    cfg = load(args.config, args.overrides)
    methods = resolve_methods(args.methods, cfg.method.names)
    run(args.config, args.overrides, methods, Path(cfg.output.dir), load, use_ray=args.ray)
    return 0
