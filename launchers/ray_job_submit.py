#!/usr/bin/env python
"""Run ``dist-unlearn run`` on an existing Ray cluster as a Ray job (Ray's job submission API)::

    python launchers/ray_job_submit.py --address http://HEAD:8265 CONFIG [key=value ...] [--no-wait]

The config is validated here first. Its directory is uploaded as the job's ``working_dir`` and the
entrypoint ``dist-unlearn run CONFIG [key=value ...] ray.address=auto`` runs on the head node, so
the workers are the cluster's. ``output.dir`` must be an absolute path on storage every node
shares (the job's working directory is a temporary copy). Needs ``pip install "ray[default]"``
here (the job client) and dist-unlearn installed on the cluster's nodes.

Prints the job id and the command to follow its logs; without ``--no-wait`` it follows them and
exits 0 when the job succeeded, 75 when it stopped on request after a checkpoint (submit again to
resume), 1 otherwise. Already inside the cluster (on a node that ran ``ray start``)?
``dist-unlearn run CONFIG ray.address=auto`` does the same without the job API.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import yaml


def entrypoint(config: Path, overrides: list[str]) -> str:
    """The command the Ray job runs (from inside the uploaded copy of the config's directory)."""
    return shlex.join(["dist-unlearn", "run", config.name, *overrides, "ray.address=auto"])


def check_output_dir(config: Path, overrides: list[str]) -> str | None:
    """A problem line when ``output.dir`` is not absolute (it would land in the job's temp copy)."""
    from dist_unlearn.config import apply_overrides

    raw = apply_overrides(yaml.safe_load(config.read_text()) or {}, overrides)
    out = (raw.get("output") or {}).get("dir", "runs/default")
    if not Path(str(out)).is_absolute():
        return (
            f"output.dir: '{out}' is relative, so the results would stay in the Ray job's temporary working "
            f"directory. Fix: set output.dir to an absolute path on storage every node shares, e.g. "
            f"output.dir=/shared/runs/{config.stem}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the cluster's job API, e.g. http://HEAD:8265")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    args, extra = parser.parse_known_args(argv)
    overrides = [*args.overrides, *extra]
    config = Path(args.config).expanduser().absolute()

    from dist_unlearn.cli import _load
    from dist_unlearn.config import ConfigError

    try:
        _load(str(config), overrides)
    except ConfigError as exc:
        print(f"ray_job_submit: {exc}", file=sys.stderr)
        return 2
    problem = check_output_dir(config, overrides)
    if problem:
        print(f"ray_job_submit: {problem}", file=sys.stderr)
        return 2
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient
    except ImportError as exc:
        print(f'ray_job_submit: the job client needs ray[default] ({exc}). Fix: pip install "ray[default]"')
        return 2

    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(
        entrypoint=entrypoint(config, overrides),
        runtime_env={"working_dir": str(config.parent)},
    )
    print(f"submitted Ray job {job_id}\nfollow: ray job logs --follow --address {args.address} {job_id}")
    if args.no_wait:
        return 0
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[shown:], end="", flush=True)
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(5)
    info = client.get_job_info(job_id)
    print(f"Ray job {job_id}: {status.value} (driver exit code {info.driver_exit_code})")
    if status == JobStatus.SUCCEEDED:
        return 0
    return 75 if info.driver_exit_code == 75 else 1


if __name__ == "__main__":
    sys.exit(main())
