"""The plug-in example: an ordinary DeepSpeed script calling ``get_objective("npo_gd")`` unlearns under
``torchrun`` on 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import BIN, REPO


def test_unlearn_example_runs_under_torchrun(tmp_path, small_target):
    out = tmp_path / "probs.json"
    embedded = Path(small_target).parent
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "examples/unlearn_deepspeed.py",
        "--model",
        small_target,
        "--facts",
        str(embedded / "facts.jsonl"),
        "--steps",
        "6",
        "--batch",
        "4",
        "--lr",
        "3e-3",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    probs = json.loads(out.read_text())
    assert probs["world_size"] == 2
    # the script's 2-rank sharded evaluation before unlearning equals prepare's single-process one
    prepared = json.loads((embedded / "prepare.json").read_text())["target"]["eval"]
    for split in ("forget", "retain"):
        assert abs(probs["before"][split]["prob"] - prepared[split]["prob"]) < 1e-5, split
    assert probs["after"]["forget"]["prob"] < 0.5 * probs["before"]["forget"]["prob"]
