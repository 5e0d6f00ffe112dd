"""End to end on CPU: the contrastive job (bundled MiniLM encoder, GradCache, cross-rank InfoNCE with a learned
temperature, DeepSpeed ZeRO-2) on 2 torchrun ranks, the quickstart config pointed at a user's file of triples
(one process), and the plug-in example script."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
from conftest import BIN, REPO, run_cli, write_config

pytestmark = pytest.mark.slow


def test_contrastive_job_trains_and_improves_held_out_retrieval(tmp_path):
    cfg = {
        "job": {"kind": "contrastive"},
        "data": {"num_people": 60, "questions_per_person": 4, "forget_fraction": 0.05, "holdout_fraction": 0.2},
        "contrastive": {
            "global_batch_size": 64,
            "chunk_size": 16,
            "steps": 3,
            "lr": 5.0e-5,
            "max_length": 32,
            "learn_temperature": True,
            "temperature_lr": 1.0e-2,
        },
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
    # τ learned (AdamW's first step moves log(1/τ) by temperature_lr), logged per step and reported
    taus = [r["temperature"] for r in rows]
    assert abs(abs(math.log(taus[0] / 0.05)) - 1.0e-2) < 1e-4 and len(set(taus)) == 3
    assert summary["loss_parameters"] == {"temperature": taus[-1]}
    assert f"[contrastive] learned temperature 0.05 -> {taus[-1]:.5g}" in result.stdout
    from transformers import AutoModel

    AutoModel.from_pretrained(tmp_path / "contrastive" / "model")


def test_quickstart_config_trains_on_a_users_file_of_triples(tmp_path):
    """``configs/quickstart/contrastive.yaml`` with ``contrastive.data=FILE`` (JSON Lines triples the test writes),
    one process: it trains, learns τ, evaluates on the held-out rows and exports a sentence-transformers model."""
    from dist_unlearn.data import generate_facts
    from dist_unlearn.data.retrieval import mine_hard_negatives

    facts = generate_facts(num_people=5, questions_per_person=4, seed=3)
    rows = [
        {"query": e.query, "positive": e.positive, "negatives": list(e.negatives)}
        for e in mine_hard_negatives(list(facts.items), 1, seed=0, lookalikes=1)
    ]
    data = tmp_path / "triples.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = [
        f"contrastive.data={data}",
        "contrastive.dev_fraction=0.2",
        "contrastive.global_batch_size=8",
        "contrastive.chunk_size=4",
        "contrastive.steps=1",
        "contrastive.learn_temperature=true",
        "ray.enabled=false",
        "ray.num_workers=1",
        f"output.dir={tmp_path / 'out'}",
        "output.save_dtype=fp32",
    ]
    result = run_cli(["run", "configs/quickstart/contrastive.yaml", *overrides])
    assert "held-out retrieval (dev queries, never trained on)" in result.stdout
    assert f"[contrastive] data: {data}: 16 training queries x 2 documents, 4 held-out queries" in result.stdout
    summary = json.loads((tmp_path / "out" / "contrastive" / "metrics.json").read_text())
    assert summary["data"] == str(data) and summary["train_examples"] == 16 and summary["eval_queries"] == 4
    assert summary["loss_parameters"]["temperature"] != 0.05 and set(summary["after"]) == {
        "recall@1",
        "recall@10",
        "mrr",
    }

    # the sentence-transformers files of the export (their loading: test_integration_sentence_transformers.py)
    assert (tmp_path / "out" / "contrastive" / "model" / "modules.json").is_file()


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
