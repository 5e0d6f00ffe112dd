"""Resume of the contrastive job through ``dist-unlearn run`` (one process, no Ray): a run stopped mid-way
(``OUTPUT/STOP``: checkpoint, exit 75) and run again with the same command ends with exactly the weights,
learned loss parameters and per-step metrics of an uninterrupted run; a finished run whose ``contrastive.steps``
grows continues from its last checkpoint.

The subject is the resume path, not the training, so everything is as small as it gets: a randomly initialised
one-layer BERT (hidden size 32, dropout on, so the per-step reseed matters) with the bundled MiniLM tokenizer,
a user triples directory of 16 training and 4 dev rows, a global batch of 4 in GradCache chunks of 2, a
checkpoint every step. Four CLI runs in all: the uninterrupted reference (2 steps) is also the run that is
extended (to 3 steps), and the stopped run (3 steps) must end, resumed, where the extended one does. Only the
resumed run is a ``dist-unlearn`` subprocess; the others call the CLI's ``main`` in the test's process, which
saves their interpreter start-up and imports.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_config
from reference_run import weights

from dist_unlearn.engine.preemption import REQUEUE_EXIT_CODE, stop_file
from dist_unlearn.engine.runner import RUN_SETTINGS_FILE

pytestmark = pytest.mark.slow

STEPS = 3
SIGLIP_START = {"scale": 5.0, "bias": -3.0}
"""The initial sigmoid scale and bias (``contrastive.sigmoid_scale`` / ``sigmoid_bias``, not SigLIP's defaults)."""
TIMING = ("step_seconds", "examples_per_second")
"""Metrics fields that measure the machine, not the run: left out of the comparisons."""


def tiny_encoder(root: Path) -> Path:
    """A randomly initialised (seeded) one-layer BERT saved with the bundled MiniLM tokenizer's files."""
    from transformers import BertConfig, BertModel

    from dist_unlearn.models.encoders import encoder_path

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root)
    bundled = Path(encoder_path("embedded"))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled / name, root / name)
    return root


def write_triples(root: Path) -> Path:
    """A user's data directory: 16 training triples (``train.jsonl``) and 4 dev triples (``dev.jsonl``)."""
    root.mkdir(parents=True)
    for name, count in (("train.jsonl", 16), ("dev.jsonl", 4)):
        rows = [
            {"query": f"{name[:3]} question {i}", "positive": f"answer {i} of {name[:3]}", "negative": f"not {i}"}
            for i in range(count)
        ]
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def contrastive_config(out: Path, model: Path, data: Path, steps: int) -> Path:
    """``out/run.yaml``: the tiny contrastive run, one process, SigLIP (``contrastive.loss=siglip``: the sigmoid
    loss with learned scale and bias; Zhai et al. 2023) from a scale and bias of our own, a checkpoint every step;
    stop requests by ``OUTPUT/STOP`` only."""
    cfg = {
        "job": {"kind": "contrastive"},
        "model": {"path": str(model)},
        "contrastive": {
            "data": str(data),
            "hard_negatives": 1,
            "global_batch_size": 4,
            "chunk_size": 2,
            "steps": steps,
            "lr": 1.0e-3,
            "max_length": 16,
            "loss": "siglip",
            "sigmoid_scale": SIGLIP_START["scale"],
            "sigmoid_bias": SIGLIP_START["bias"],
            "temperature_lr": 1.0e-2,
        },
        "deepspeed": {"zero_stage": 2},
        "ray": {"enabled": False},
        "checkpoint": {"every_steps": 1},
        "failure": {"handle_signals": False},  # the runs in the test's process leave its signal handlers alone
        "output": {"dir": str(out), "save_dtype": "fp32"},
    }
    return write_config(out / "run.yaml", cfg)


def metrics_lines(run_dir: Path) -> list[dict[str, float]]:
    """``metrics.jsonl`` without the timing fields."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


def cli(argv: list[str]) -> int:
    """``dist-unlearn ARGV`` in this process (its imports are paid once per test session, not per run);
    returns the exit code.

    One torch thread, as in the CLI subprocesses of the suite (``OMP_NUM_THREADS=1``), so that runs here and
    in a subprocess sum in the same order. Each run creates and destroys its own one-process group (a second
    run in one process is what a notebook user does too); the environment that group exports (``RANK``,
    ``MASTER_PORT``, ...) is taken back, so a later subprocess does not take itself for a torchrun rank."""
    from dist_unlearn.cli import main

    saved_env, saved_threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(saved_threads)
        os.environ.clear()
        os.environ.update(saved_env)


def run_until_stopped(config: Path, out: Path) -> int:
    """``dist-unlearn run CONFIG`` (in this process) with ``OUTPUT/STOP`` created, as a user would by hand,
    as soon as the run has recorded its settings (before its first step): it stops at a step boundary mid-run.
    Returns the exit code."""
    settings = out / "contrastive" / RUN_SETTINGS_FILE
    done = threading.Event()

    def touch_stop_when_started() -> None:
        while not done.is_set():
            if settings.is_file():
                stop_file(out).touch()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=touch_stop_when_started, daemon=True)
    watcher.start()
    try:
        return cli(["run", str(config)])
    finally:
        done.set()
        watcher.join()


def test_stopped_run_resumes_to_the_uninterrupted_weights_and_a_finished_run_extends(tmp_path, capsys):
    """Stop (exit 75), then the same command in a new process: the weights, SigLIP's learned scale and bias and the
    per-step loss equal the uninterrupted run's bit for bit, and every step moves the scale and the bias; growing
    ``contrastive.steps`` of a finished run continues from its last checkpoint, to the same end as the
    stopped-and-resumed run of that many steps.

    The resumed run is a ``dist-unlearn`` subprocess: it can only know what the checkpoint holds (a fresh
    process, its own hash seed). The others run the CLI in this process, which saves their start-up."""
    model, data = tiny_encoder(tmp_path / "encoder"), write_triples(tmp_path / "triples")

    straight = tmp_path / "straight"  # uninterrupted for STEPS - 1 steps, then extended by one
    straight_config = contrastive_config(straight, model, data, STEPS - 1)
    assert cli(["run", str(straight_config)]) == 0
    straight_dir = straight / "contrastive"
    uninterrupted = metrics_lines(straight_dir)
    assert [line["step"] for line in uninterrupted] == list(range(1, STEPS))

    parted = tmp_path / "parted"
    parted_config = contrastive_config(parted, model, data, STEPS)
    parted_dir = parted / "contrastive"
    capsys.readouterr()
    assert run_until_stopped(parted_config, parted) == REQUEUE_EXIT_CODE
    stopped_at = metrics_lines(parted_dir)[-1]["step"]
    assert 1 <= stopped_at < STEPS
    assert f"stopped on request after step {stopped_at} of contrastive" in capsys.readouterr().err
    assert not (parted_dir / "model").exists() and not stop_file(parted).exists()

    resumed = run_cli(["run", str(parted_config)])
    assert f"[contrastive] resumed from {parted_dir / 'checkpoints' / f'step_{stopped_at:06d}'}" in resumed.stdout
    parted_lines = metrics_lines(parted_dir)
    assert [line["step"] for line in parted_lines] == list(range(1, STEPS + 1))
    # steps up to STEPS - 1 against the uninterrupted run: each logged loss is computed from the weights
    # before that step, each scale and bias after it, so equal lines mean equal weights, scale and bias (and their
    # AdamW state)
    assert parted_lines[: STEPS - 1] == uninterrupted

    # the extension runs one step, its last; a stop asked for by then comes too late: the run finishes, and
    # the request does not outlive it (left on disk, it would stop the next run of this directory)
    stop_file(straight).touch()
    assert cli(["run", str(straight_config), f"contrastive.steps={STEPS}"]) == 0
    assert not stop_file(straight).exists()
    resumed_from = straight_dir / "checkpoints" / f"step_{STEPS - 1:06d}"
    assert f"[contrastive] resumed from {resumed_from} at step {STEPS - 1}" in capsys.readouterr().out
    assert metrics_lines(straight_dir) == parted_lines
    ours, theirs = weights(parted_dir), weights(straight_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    summaries = [json.loads((d / "metrics.json").read_text()) for d in (parted_dir, straight_dir)]
    assert summaries[0]["steps"] == summaries[1]["steps"] == STEPS
    learned = {"scale": parted_lines[-1]["scale"], "bias": parted_lines[-1]["bias"]}
    # SigLIP's scale and bias train: every step moves both (AdamW moves each by about temperature_lr)
    trail = [SIGLIP_START] + [{k: line[k] for k in SIGLIP_START} for line in parted_lines]
    for before, after in zip(trail, trail[1:]):
        assert all(abs(after[k] - before[k]) > 1e-3 for k in SIGLIP_START), trail
    assert summaries[0]["loss_parameters"] == summaries[1]["loss_parameters"] == learned
    assert summaries[0]["before"] == summaries[1]["before"] and summaries[0]["after"] == summaries[1]["after"]
