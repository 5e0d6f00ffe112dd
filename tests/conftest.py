"""Shared fixtures: a tiny real Llama with QA batches, and one prepared embedded model per session."""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray (2.5x+) enables token authentication for the clusters it starts; a process that joins one by
# address needs the mode and the token in its environment. Every Ray cluster of the suite (the shared one
# below, the ones the CLI starts, the Slurm ones) uses this session's own token, not ~/.ray/auth_token.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# The suite's Ray clusters are all on this one machine and never drain a node: Ray Train's preemption
# watcher (an actor process per run) is off for the runs that join the shared cluster too, as the CLI
# turns it off for the local clusters it starts itself (dist_unlearn/ray/trainer.connect).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Under pytest-xdist (`make test TEST_WORKERS=2`) one worker process per core runs tests side by side: each computes on
# one thread, and so do the processes it starts. Several intra-op threads per process on an
# oversubscribed machine wait for each other at every operation (a tiny model's step then takes
# seconds instead of milliseconds).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# Every process of the suite runs as on a CPU with AVX512-BF16, where bitsandbytes takes a different
# 4-bit path (tests/force_bnb_cpu_fastpath/sitecustomize.py): the suite then fails on any machine when
# the project is wrong on such CPUs. This process imports the hook now; the processes it starts find it
# on PYTHONPATH.
_FASTPATH = str(Path(__file__).resolve().parent / "force_bnb_cpu_fastpath")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_FASTPATH, os.environ.get("PYTHONPATH", "")) if p)
_spec = importlib.util.spec_from_file_location("force_bnb_cpu_fastpath", Path(_FASTPATH) / "sitecustomize.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))


# The test files that take minutes, longest first. `make test TEST_WORKERS=2` splits the suite over xdist workers
# file by file in collection order (`--dist loadfile --no-loadscope-reorder`); starting these first keeps
# one of them from being the last thing left running on one worker while the others sit idle.
LONG_FILES = (
    "test_slurm.py",
    "test_failure_recovery.py",
    "test_e2e_unlearn.py",
    "test_integration_hf.py",
    "test_sweep.py",
    "test_eval_ray.py",
    "test_first_run.py",
    "test_continual.py",
    "test_integration_accelerate.py",
    "test_reference.py",
    "test_e2e_objectives.py",
    "test_bench.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the :data:`LONG_FILES` first (in that order); every other file keeps its place after them."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # a stable sort


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test leaves os.environ as it found it. Code that sets up a one-process group in this process
    (DeepSpeed, accelerate) exports RANK, WORLD_SIZE, MASTER_ADDR, ...; inherited by a later test's
    ``dist-unlearn`` subprocess, they would make it run as a torchrun rank instead of launching Ray."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def tiny_lm():
    """Factory: a small real LlamaForCausalLM and forget/retain batches of the facts benchmark."""
    from dist_unlearn.data import QADataset, collate_qa, generate_facts
    from dist_unlearn.models import build_embedded_model

    def make():
        facts = generate_facts(num_people=6, questions_per_person=2, seed=1)
        model, tok = build_embedded_model(facts.corpus(), vocab_size=400, hidden_size=32, num_layers=2, num_heads=2)
        forget = collate_qa(list(QADataset(facts.split("forget"), tok, 48)), tok.pad_token_id)
        retain = collate_qa(list(QADataset(facts.split("retain")[:4], tok, 48)), tok.pad_token_id)
        torch.manual_seed(0)
        return model, forget, retain

    return make


# --- end-to-end helpers ------------------------------------------------------------------------
import subprocess  # noqa: E402

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A small embedded setup: 12 invented people, a 2-layer Llama; every e2e test starts from it.
SMALL_DATA = {"num_people": 12, "questions_per_person": 3, "forget_fraction": 0.25, "holdout_fraction": 0.1}
SMALL_PREPARE = {
    "steps": 150,
    "batch_size": 16,
    "lr": 3.0e-3,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "vocab_size": 512,
}


def small_run_config(output_dir: Path, target_dir: str | None = None, **sections) -> dict:
    """A run config dict for the small setup; ``sections`` replace/extend its sections."""
    cfg = {
        "model": {"path": target_dir or "embedded"},
        "data": dict(SMALL_DATA),
        "prepare": dict(SMALL_PREPARE),
        "method": {"names": ["grad_diff"]},
        "train": {"steps": 6, "forget_batch_size": 4, "retain_batch_size": 4, "lr": 1.0e-3},
        "deepspeed": {"zero_stage": 3},
        "ray": {"num_workers": 2},
        "checkpoint": {"every_steps": 3},
        # generations (greedy, and 8 sampled per forget question by default) and their ROUGE scoring cost more
        # than the rest of a small run (about 6 s of CPU per evaluating process); the tests that check them
        # ask for them (test_e2e_unlearn, test_eval_ray, test_report, test_chat_format, test_sweep)
        "eval": {"max_examples": 8, "generate": False, "sampled_generations": 0},
        "output": {"dir": str(output_dir), "save_dtype": "fp32"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def fresh_run_config(out: Path, **sections) -> dict:
    """The small setup from nothing (first runs): the embedded models prepared by the run itself, briefly
    (the flow is under test, not how well the models learn); 2 steps, no checkpoints."""
    brief = {"prepare": {"steps": 20}, "train": {"steps": 2}, "checkpoint": {"every_steps": 0}}
    brief["eval"] = {"generate": False}
    return small_run_config(out, None, **{**brief, **sections})


# What the suite sets (above) and a user's shell does not: first-run tests start their commands without.
TEST_ONLY_ENV = (
    "TOKENIZERS_PARALLELISM",
    "HF_HUB_OFFLINE",
    "PYTHONWARNINGS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
    "RAY_ADDRESS",
)


def save_tiny_qwen2(out: Path, tokenizer, seed: int = 0, max_positions: int = 256) -> Path:
    """Save ``tokenizer`` and a tiny random Qwen2 sized for it (1 layer, H=32, 2 heads, 1 KV head, no BOS
    token id, as Qwen2) to ``out``: a real architecture without BOS for the tests that need one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer.save_pretrained(out)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args: list[str], nproc: int | None = None, timeout: int = 600, check: bool = True):
    """Run ``dist-unlearn ARGS`` (under ``torchrun --nproc_per_node NPROC`` when given); returns the result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if nproc is None:
        cmd = [str(BIN / "dist-unlearn"), *args]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "dist_unlearn.cli", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The directory ``name``, filled by ``make(directory)`` once per test session.

    Under pytest-xdist a session is split over worker processes, each with its own session fixtures;
    the expensive ones (prepared models, reference runs) are then made by the first worker that needs
    them, under a file lock in the run's shared temp root, and reused by the others (a marker file next to
    the directory says it is complete). Without xdist this is ``make(tmp_path_factory.mktemp(name))``.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name)
        make(out)
        return out
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # shared by the run's workers
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            done.touch()
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address() -> str:
    """One Ray cluster for the session (a head node with 4 CPUs, started with ``ray start``) that the
    end-to-end runs whose subject is not the cluster's start or stop join with ``ray.address=...``: the
    cluster start-up is paid once. Its own temp dir keeps stray ``ray.init()`` calls from finding it; at
    the end every process naming that dir is stopped (nothing else on the machine is touched)."""
    import shutil
    import tempfile

    from dist_unlearn.ray.trainer import stop_processes_naming

    temp_dir = tempfile.mkdtemp(prefix="du-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    address = f"127.0.0.1:{_free_port()}"
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={address.rsplit(':', 1)[1]}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=4",
        "--num-gpus=0",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=180)
    try:
        yield address
    finally:
        stop_processes_naming(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny real Llama (2 layers, H=32) with its tokenizer, saved like a prepared model (not fine-tuned)."""
    from dist_unlearn.data import generate_facts
    from dist_unlearn.models import build_embedded_model

    def make(out: Path) -> None:
        facts = generate_facts(**SMALL_DATA, seed=0)
        model, tok = build_embedded_model(facts.corpus(), vocab_size=400, hidden_size=32, num_layers=2, num_heads=2)
        model.save_pretrained(out / "target")
        tok.save_pretrained(out / "target")

    return str(made_once(tmp_path_factory, "tiny", make) / "target")


@pytest.fixture(scope="session")
def small_target(tmp_path_factory) -> str:
    """The small embedded target model, prepared once per session (single process)."""
    from dist_unlearn.config import config_from_dict
    from dist_unlearn.engine.prepare import prepare_embedded

    def make(out: Path) -> None:
        target = prepare_embedded(config_from_dict(small_run_config(out)), log=lambda *_: None).target_dir
        (out / "target_dir").write_text(target)

    return (made_once(tmp_path_factory, "embedded", make) / "target_dir").read_text()


# Evaluation settings of the one-process `dist-unlearn eval` below (shared by test_report and test_eval_ray).
ONE_PROCESS_EVAL = {
    "generate": True,
    "sampled_generations": 2,
    "max_new_tokens": 8,
    "attacks": ["relearn"],
    "relearn_steps": 3,
}


def copy_prepared_models(small_target: str, output_dir: Path) -> None:
    """Put the session's prepared embedded target and oracle under ``output_dir/embedded`` (no re-preparing)."""
    import shutil

    shutil.copytree(Path(small_target).parents[1] / "embedded", output_dir / "embedded")


@pytest.fixture(scope="session")
def one_process_eval(small_target, tmp_path_factory) -> tuple[Path, str]:
    """``dist-unlearn eval`` of the small target and oracle in one process (settings ``ONE_PROCESS_EVAL``),
    run once per session; returns (output dir, stdout). Tests may add files there but not change any."""

    def make(out: Path) -> None:
        copy_prepared_models(small_target, out)
        cfg = small_run_config(out, ray={"enabled": False}, eval=dict(ONE_PROCESS_EVAL))
        cfg["model"] = {"path": "embedded"}
        result = run_cli(["eval", str(write_config(out / "eval.yaml", cfg))], timeout=900)
        _stdout_of(out).write_text(result.stdout)

    out = made_once(tmp_path_factory, "one_process_eval", make)
    return out, _stdout_of(out).read_text()


def _stdout_of(out: Path) -> Path:
    """Where a shared run keeps what its command printed: next to its directory, not in it."""
    return out.with_name(out.name + ".stdout")


# The README's quantized command (nf4 base, LoRA r=8) at the small setup: 8 steps, a checkpoint every 2.
NF4_STEPS, NF4_EVERY = 8, 2


def nf4_run_config(output_dir: Path, target_dir: str, **sections) -> dict:
    """The quantized run of :func:`nf4_torchrun_run` with ``output.dir=output_dir`` (``sections`` merged in)."""
    cfg = small_run_config(
        output_dir,
        target_dir,
        model={"quantization": "nf4", "lora": {"r": 8, "alpha": 16}},
        train={"steps": NF4_STEPS, "lr": 2.0e-3},
        checkpoint={"every_steps": NF4_EVERY},
        eval={"generate": False},  # the weights are under test, not the evaluation
    )
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


@pytest.fixture(scope="session")
def nf4_torchrun_run(small_target, tmp_path_factory) -> Path:
    """The quantized run on 2 ``torchrun`` ZeRO-3 ranks, uninterrupted, once per session: its own test
    checks the export, and the stopped-and-resumed run on Ray must end with its weights."""

    def make(out: Path) -> None:
        cfg = nf4_run_config(out, small_target, ray={"enabled": False})
        run_cli(["run", str(write_config(out / "run.yaml", cfg))], nproc=2)

    return made_once(tmp_path_factory, "nf4_torchrun", make)
