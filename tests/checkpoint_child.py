"""Child process for the crash-during-checkpoint-write test (run as ``python checkpoint_child.py MODE ROOT``).

``crash``: train a small model one step under DeepSpeed ZeRO-2 (one gloo rank), save checkpoint 1
with :func:`save_checkpoint` and a copy of its weights, train one more step, then limit the size of
any file this process writes (``RLIMIT_FSIZE``) to half the largest checkpoint file and save
checkpoint 2: the kernel kills the process with ``SIGXFSZ`` in the middle of writing it.

``load``: a fresh process and engine load the latest complete checkpoint and write its weights;
then a new save of step 2 must succeed over the leftover ``.tmp`` directory.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

import torch

from dist_unlearn.config import config_from_dict
from dist_unlearn.distributed.env import init_distributed
from dist_unlearn.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dist_unlearn.engine.worker import initialize_engine


def _engine():
    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    cfg = config_from_dict({"deepspeed": {"zero_stage": 2}})
    return initialize_engine(cfg, model, micro_batch_size=4, lr=1e-3)


def _step(engine, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 256, generator=generator)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def crash(root: Path) -> None:
    engine = _engine()
    _step(engine, 1)
    first = save_checkpoint(engine, root / "checkpoints", 1, {"step": 1})
    torch.save(_weights(engine), root / "weights_step1.pt")
    _step(engine, 2)
    largest = max(p.stat().st_size for p in first.rglob("*") if p.is_file())
    (root / "limit.json").write_text(json.dumps({"largest_file": largest, "limit": largest // 2}))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default; die like a real crash
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, resource.RLIM_INFINITY))
    save_checkpoint(engine, root / "checkpoints", 2, {"step": 2})
    print("checkpoint 2 was written completely: the crash did not happen", flush=True)


def load(root: Path) -> None:
    engine = _engine()
    latest = latest_checkpoint(root / "checkpoints")
    state = load_checkpoint(engine, latest)
    torch.save(_weights(engine), root / "weights_loaded.pt")
    (root / "loaded.json").write_text(json.dumps({"latest": latest.name, "step": state["step"]}))
    _step(engine, 2)
    save_checkpoint(engine, root / "checkpoints", 2, {"step": 2})


if __name__ == "__main__":
    {"crash": crash, "load": load}[sys.argv[1]](Path(sys.argv[2]))
