"""``dist-unlearn submit CONFIG --nodes N --gpus-per-node G``: render an sbatch script and submit it.

Two templates ship with the package in ``dist_unlearn/launch/slurm/`` (``slurm/`` of a checkout links there):

- ``ray_cluster.sbatch`` (``--launcher ray``): a Ray cluster per job (head on the first node, workers
  on the others, job-specific ports, a short temp dir), then ``dist-unlearn run ... ray.address=...``
  (``--command sweep``: ``dist-unlearn sweep``, whose Ray Tune trials then share that cluster; the
  ``STOP`` file the script writes on USR1/TERM stops the sweep, which resumes when the job is requeued);
- ``torchrun.sbatch`` (``--launcher torchrun``): ``srun`` starts one ``torchrun`` per node, rendezvous on
  the first node of ``SLURM_JOB_NODELIST``, every rank runs ``dist-unlearn run``.

Both ask Slurm for ``USR1`` ahead of the time limit (``--signal=B:USR1@SECONDS``): the run saves a
checkpoint at the next step and the script requeues the job, which resumes from it.

Templates use ``{{name}}`` placeholders (no template engine); every placeholder must have a value.
Workers: with ``--gpus-per-node G > 0`` the run gets one worker per GPU (``ray.num_workers = N*G``,
``ray.use_gpu=true``); on CPU nodes the config's ``ray.num_workers`` is used (spread over the nodes).
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dist_unlearn.config import ConfigError, RunConfig

TEMPLATE_DIR = Path(__file__).resolve().parent / "slurm"  # package data: present in a wheel install too
TEMPLATES = {"ray": "ray_cluster.sbatch", "torchrun": "torchrun.sbatch"}
# job-specific ports: BASE + (SLURM_JOB_ID % SLOTS) [* 100 for Ray, which needs a block of ports]
PORTS = {"ray": (40000, 200), "torchrun": (20000, 20000)}
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class SubmitError(Exception):
    """A problem found before anything is submitted; the message names the fix."""


@dataclass
class SubmitRequest:
    """What ``dist-unlearn submit`` was asked for (the command-line options)."""

    config: str
    overrides: list[str] = field(default_factory=list)
    launcher: str = "ray"
    command: str = "run"
    """``run`` or ``sweep`` (Ray launcher only)."""
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None
    signal_seconds: int = 120
    sbatch_args: list[str] = field(default_factory=list)
    template: str | None = None
    bin_dir: str | None = None


@dataclass
class RenderedJob:
    """A rendered batch script and where its outputs go."""

    script: str
    launcher: str
    output_dir: Path
    log_pattern: str
    """The ``--output`` path with ``%j`` for the job id."""
    workers: int

    def log_path(self, job_id: str) -> Path:
        return Path(self.log_pattern.replace("%j", job_id))


def render(template: str, values: dict[str, str]) -> str:
    """Fill the ``{{name}}`` placeholders of ``template``; an unknown name raises :class:`SubmitError`."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise SubmitError(f"template placeholder(s) without a value: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def job_overrides(req: SubmitRequest) -> list[str]:
    """The user's overrides plus the ones the layout implies (one worker per GPU on GPU nodes)."""
    extra = [f"ray.num_workers={req.nodes * req.gpus_per_node}", "ray.use_gpu=true"] if req.gpus_per_node else []
    return [*req.overrides, *extra]


def _layout(req: SubmitRequest, cfg: RunConfig) -> tuple[int, int, int]:
    """(workers, processes per node, CPUs per node) for the request; raises on an impossible layout."""
    workers = cfg.ray.num_workers
    if req.launcher == "torchrun" and workers % req.nodes:
        lower = max(req.nodes, workers // req.nodes * req.nodes)
        raise SubmitError(
            f"ray.num_workers ({workers}) must be a multiple of --nodes ({req.nodes}) for the torchrun launcher "
            f"(the same number of ranks on every node). Fix: set ray.num_workers={lower} or "
            f"{lower + req.nodes}, or use --launcher ray"
        )
    per_node = req.gpus_per_node or math.ceil(workers / req.nodes)
    cpus = req.cpus_per_node or per_node * max(1, cfg.ray.cpus_per_worker)
    return workers, per_node, cpus


def _sbatch_lines(req: SubmitRequest) -> list[str]:
    lines = [f"--gpus-per-node={req.gpus_per_node}"] if req.gpus_per_node else []
    for flag, value in (("partition", req.partition), ("time", req.time), ("account", req.account), ("qos", req.qos)):
        if value:
            lines.append(f"--{flag}={value}")
    lines += list(req.sbatch_args)
    return [f"#SBATCH {line}" for line in lines]


def _bin_dir(req: SubmitRequest) -> Path:
    """Where ``dist-unlearn``, ``ray``, ``torchrun`` and ``python`` of this installation live."""
    bin_dir = Path(req.bin_dir).expanduser().absolute() if req.bin_dir else Path(sys.executable).parent.absolute()
    needed = ["dist-unlearn", "python", "ray" if req.launcher == "ray" else "torchrun"]
    missing = [name for name in needed if not (bin_dir / name).exists()]
    if missing:
        raise SubmitError(
            f"{', '.join(missing)} not found in {bin_dir}. Fix: pass --bin-dir with the bin directory of the "
            f"environment where dist-unlearn is installed on the compute nodes"
        )
    return bin_dir


def prepare_job(req: SubmitRequest, load: Callable[[str, list[str]], RunConfig]) -> RenderedJob:
    """Validate the config (with ``load``, the CLI's loader) and render the batch script."""
    if req.launcher not in TEMPLATES:
        raise SubmitError(f"unknown launcher '{req.launcher}'. Fix: --launcher ray or --launcher torchrun")
    if req.command != "run" and req.launcher != "ray":
        raise SubmitError(f"--command {req.command} runs on a Ray cluster. Fix: --launcher ray")
    overrides = job_overrides(req)
    try:
        cfg = load(req.config, overrides)
    except ConfigError as exc:
        if not req.gpus_per_node:
            raise
        note = (
            f"(--nodes {req.nodes} --gpus-per-node {req.gpus_per_node} runs one worker per GPU: "
            f"ray.num_workers={req.nodes * req.gpus_per_node})"
        )
        raise ConfigError(f"{exc}\n{note}", [*exc.problems, note]) from exc
    workers, per_node, cpus = _layout(req, cfg)
    template_path = Path(req.template) if req.template else TEMPLATE_DIR / TEMPLATES[req.launcher]
    if not template_path.is_file():
        raise SubmitError(
            f"sbatch template not found: {template_path}. Fix: pass --template PATH (the shipped templates "
            f"are in {TEMPLATE_DIR})"
        )
    output_dir = Path(cfg.output.dir)
    log = str(output_dir / "slurm-%j.log")
    base, slots = PORTS[req.launcher]
    values = {
        "job_name": req.job_name or f"dist-unlearn-{cfg.job.kind if req.command == 'run' else req.command}",
        "command": req.command,
        "nodes": str(req.nodes),
        "cpus_per_node": str(cpus),
        "nproc_per_node": str(per_node),
        "log": log,
        "workdir": shlex.quote(str(Path.cwd())),
        "signal_seconds": str(req.signal_seconds),
        "sbatch_lines": "\n".join(_sbatch_lines(req)),
        "bin_dir": shlex.quote(str(_bin_dir(req))),
        "stop_file": shlex.quote(str(output_dir / "STOP")),
        "config": shlex.quote(str(Path(req.config).expanduser().absolute())),
        "overrides": " ".join(shlex.quote(item) for item in overrides),
        "port_base": str(base),
        "port_slots": str(slots),
    }
    script = render(template_path.read_text(), values)
    return RenderedJob(script, req.launcher, output_dir, log, workers)


def submit_job(job: RenderedJob, sbatch: str = "sbatch") -> tuple[str, Path]:
    """Write the script to ``OUTPUT_DIR/slurm/<launcher>.sbatch`` and submit it; returns (job id, script)."""
    if shutil.which(sbatch) is None:
        raise SubmitError(
            "sbatch not found on PATH: submitting needs Slurm's client commands. Fix: run this on a Slurm "
            "login node (or install the client, e.g. apt-get install slurm-client), or add --dry-run to "
            "print the batch script"
        )
    script_path = job.output_dir / "slurm" / f"{job.launcher}.sbatch"
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(job.script)
    result = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"sbatch failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0], script_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dist-unlearn submit``."""
    parser.add_argument("config", help="YAML run config (validated before anything is submitted)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, passed on to the run")
    parser.add_argument("--launcher", choices=sorted(TEMPLATES), default="ray", help="ray (default) or torchrun")
    parser.add_argument(
        "--command", choices=("run", "sweep"), default="run", help="what the job runs (sweep: Ray launcher only)"
    )
    parser.add_argument("--nodes", type=_positive, default=1)
    parser.add_argument("--gpus-per-node", type=_non_negative, default=0, help="0 = CPU nodes")
    parser.add_argument("--cpus-per-node", type=_positive, help="default: workers per node x ray.cpus_per_worker")
    parser.add_argument("--partition")
    parser.add_argument("--time", help="time limit, e.g. 04:00:00")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--job-name")
    parser.add_argument(
        "--signal-seconds",
        type=_positive,
        default=120,
        help="USR1 this many seconds before the time limit: checkpoint and requeue (default 120)",
    )
    parser.add_argument(
        "--sbatch-arg", dest="sbatch_args", action="append", default=[], help="extra #SBATCH line, e.g. --mem=64G"
    )
    parser.add_argument("--template", help="a custom sbatch template with the same {{placeholders}}")
    parser.add_argument("--bin-dir", help="bin directory of the environment on the compute nodes (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")


def request_from_args(args: argparse.Namespace) -> SubmitRequest:
    names = [name for name in SubmitRequest.__dataclass_fields__ if hasattr(args, name)]
    return SubmitRequest(**{name: getattr(args, name) for name in names})


def describe(job: RenderedJob, job_id: str, script_path: Path, nodes: int, gpus: int) -> Sequence[str]:
    """The lines ``dist-unlearn submit`` prints after submitting."""
    return [
        f"submitted batch job {job_id} ({job.launcher}: {nodes} node(s) x {gpus} GPU(s), {job.workers} workers)",
        f"log: {job.log_path(job_id)}",
        f"script: {script_path}",
    ]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
