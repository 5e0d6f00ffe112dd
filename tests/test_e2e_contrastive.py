"""End to end on CPU: the contrastive job (bundled MiniLM encoder, GradCache, cross-rank InfoNCE,
DeepSpeed ZeRO-2) on 2 torchrun ranks, and the plug-in example script."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import BIN, REPO, run_cli, write_config

pytestmark = pytest.mark.slow


def test_contrastive_job_trains_and_improves_held_out_retrieval(tmp_path):
    cfg = {
        "job": {"kind": "contrastive"},
        "data": {"num_people": 60, "questions_per_person": 4, "forget_fraction": 0.05, "holdout_fraction": 0.2},
        "contrastive": {"global_batch_size": 64, "chunk_size": 16, "steps": 3, "lr": 5.0e-5, "max_length": 32},
        "deepspeed": {"zero_stage": 2},
        "ray": {"enabled": False, "num_workers": 2},
        "output": {"dir": str(tmp_path), "save_dtype": "fp32"},
    }
    result = run_cli(["run", str(write_config(tmp_path / "run.yaml", cfg))], nproc=2)
    assert "held-out retrieval" in result.stdout and "recall@1" in result.stdout
    summary = json.loads((tmp_path / "contrastive" / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64 and summary["eval_queries"] == 48
    # every item's passage (60 people x 4) + 7 attributes of 8 look-alikes per held-out person (12)
    assert summary["eval_passages"] == 60 * 4 + 12 * 8 * 7
    assert summary["after"]["mrr"] > summary["before"]["mrr"]
    rows = [json.loads(line) for line in (tmp_path / "contrastive" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    from transformers import AutoModel

    AutoModel.from_pretrained(tmp_path / "contrastive" / "model")


def test_plug_in_example_runs_under_torchrun(tmp_path):
    out = tmp_path / "losses.json"
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "examples/contrastive_deepspeed.py",
        "--steps",
        "3",
        "--batch",
        "32",
        "--chunk",
        "8",
        "--out",
        str(out),
    ]
    result = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    losses = json.loads(out.read_text())
    assert losses["world_size"] == 2 and len(losses["losses"]) == 3
    assert losses["losses"][-1] < losses["losses"][0]
