"""``accelerate launch`` runs examples/accelerate_grad_cache.py on 2 CPU processes under DeepSpeed ZeRO-2; after 2
steps its weights and learnable temperature equal one process's on the same global batches.

The reference is independent of GradCache: ONE process encodes each whole 8-row global batch with grad
(all-MiniLM-L6-v2, dropout 0, mean pooling), computes InfoNCE from its formula (cosine scores times
``exp(log(1/tau))``, cross-entropy against the diagonal), calls ``backward`` once and applies SGD by hand to the
weights and to ``log(1/tau)``. The script runs GradCache.step_deferred + ``accelerator.backward`` (engine.backward
and engine.step through accelerate's DeepSpeed wrapper) with 2-row chunks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "accelerate_grad_cache.py"
STEPS, BATCH, LR, TEMPERATURE = 2, 8, 0.05, 0.05
TOL = 1e-5


def load_example():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import accelerate_grad_cache
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return accelerate_grad_cache


def reference() -> dict[str, torch.Tensor]:
    """SGD on the formula's gradient, one whole global batch per step, in one process."""
    example = load_example()
    model, tokenizer = example.load_encoder(dropout=0.0)
    model.train()
    log_t = torch.tensor(-torch.log(torch.tensor(TEMPERATURE)).item(), requires_grad=True)

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    for step in range(STEPS):
        rows = example.PAIRS[step * BATCH : (step + 1) * BATCH]
        q, d = embed([r[0] for r in rows]), embed([r[1] for r in rows])
        scores = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
        F.cross_entropy(scores * log_t.exp(), torch.arange(len(rows))).backward()
        with torch.no_grad():
            for param in [*model.parameters(), log_t]:
                param -= LR * param.grad
                param.grad = None
    out = {n: p.detach().double() for n, p in model.named_parameters()}
    out["log_inverse_temperature"] = log_t.detach().double()
    return out


@pytest.mark.slow
def test_accelerate_launch_two_processes_zero2_equals_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "weights.pt"
    # the suite's PYTHONPATH stays on it (tests/force_bnb_cpu_fastpath: no JIT build of DeepSpeed's shm op)
    path = os.pathsep.join((str(REPO), os.environ["PYTHONPATH"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    args = ["--zero-stage", "2", "--steps", str(STEPS), "--batch", str(BATCH), "--chunk", "2"]
    args += ["--lr", str(LR), "--temperature", str(TEMPERATURE), "--dropout", "0", "--out", str(out)]
    run = subprocess.run(
        [*launch, str(EXAMPLE), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    steps = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == STEPS and all(line.endswith("(boundary)") for line in steps), run.stdout  # one process prints
    got = torch.load(out)
    want = reference()
    assert set(want) <= set(got)
    scale = max(w.abs().max().item() for w in want.values())
    err = max((got[n] - want[n]).abs().max().item() for n in want) / scale
    assert err < TOL, f"weights relative error {err:.2e}"
    start = -torch.log(torch.tensor(TEMPERATURE, dtype=torch.float64))
    moved, want_moved = got["log_inverse_temperature"] - start, want["log_inverse_temperature"] - start
    assert want_moved.abs().item() > 0
    assert abs(moved - want_moved).item() / abs(want_moved).item() < 1e-3, (moved, want_moved)
