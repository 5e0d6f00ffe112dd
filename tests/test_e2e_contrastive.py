"""End to end on CPU: the contrastive job (the quickstart config pointed at a user's triples; bundled MiniLM
encoder, GradCache, cross-rank InfoNCE with a learned temperature, DeepSpeed ZeRO-2) on 2 torchrun ranks, and the
plug-in example script. The fictitious default's data is checked in-process (test_contrastive_user_data.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, REPO, run_cli

pytestmark = pytest.mark.slow


def write_triples_dir(root: Path) -> Path:
    """A user's data directory: ``train.jsonl`` (the train people's questions, 1 mined negative each, as
    ``negative``) and ``dev.jsonl`` (12 people never trained on, 2 negatives each, as ``negatives``: a look-alike's
    passage and another of the person's own, which is also a dev positive, so the dev corpus has 96 passages)."""
    from dist_unlearn.data import generate_facts
    from dist_unlearn.data.retrieval import mine_hard_negatives

    facts = generate_facts(num_people=60, questions_per_person=4, forget_fraction=0.05, holdout_fraction=0.2, seed=0)
    train = mine_hard_negatives(facts.split("retain") + facts.split("forget"), 1, seed=0, lookalikes=1)
    dev = mine_hard_negatives(facts.split("holdout"), 2, seed=0, lookalikes=1)
    root.mkdir()
    rows = {
        "train.jsonl": [{"query": e.query, "positive": e.positive, "negative": e.negatives[0]} for e in train],
        "dev.jsonl": [{"query": e.query, "positive": e.positive, "negatives": list(e.negatives)} for e in dev],
    }
    for name, values in rows.items():
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in values))
    return root


def test_quickstart_config_on_a_users_triples_trains_on_two_ranks_and_improves_retrieval(tmp_path):
    """``configs/quickstart/contrastive.yaml`` pointed at a user's directory of triples, on 2 torchrun ranks: it
    trains (GradCache, cross-rank InfoNCE, ZeRO-2) with a learned τ, evaluates on ``dev.jsonl`` and exports a
    sentence-transformers model (its loading: test_integration_sentence_transformers.py)."""
    data = write_triples_dir(tmp_path / "triples")
    overrides = [
        f"contrastive.data={data}",
        "contrastive.global_batch_size=64",
        "contrastive.chunk_size=16",
        "contrastive.steps=3",
        "contrastive.learn_temperature=true",
        "contrastive.temperature_lr=1.0e-2",
        "ray.enabled=false",
        f"output.dir={tmp_path / 'out'}",
        "output.save_dtype=fp32",
    ]
    result = run_cli(["run", "configs/quickstart/contrastive.yaml", *overrides], nproc=2)
    assert "held-out retrieval (dev queries, never trained on)" in result.stdout and "recall@1" in result.stdout
    assert f"[contrastive] data: {data}: 192 training queries x 2 documents, 48 held-out queries against 96" in (
        result.stdout
    )
    run_dir = tmp_path / "out" / "contrastive"
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64 and summary["data"] == str(data)
    assert summary["train_examples"] == 192 and summary["eval_queries"] == 48 and summary["eval_passages"] == 96
    assert summary["after"]["mrr"] > summary["before"]["mrr"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # τ learned (AdamW's first step moves log(1/τ) by temperature_lr), logged per step and reported
    taus = [r["temperature"] for r in rows]
    assert abs(abs(math.log(taus[0] / 0.05)) - 1.0e-2) < 1e-4 and len(set(taus)) == 3
    assert summary["loss_parameters"] == {"temperature": taus[-1]}
    assert f"[contrastive] learned temperature 0.05 -> {taus[-1]:.5g}" in result.stdout
    assert all((run_dir / "model" / name).is_file() for name in ("config.json", "modules.json", "tokenizer.json"))


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
