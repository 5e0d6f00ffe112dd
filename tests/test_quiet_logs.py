"""Quiet by default (engine/chatter.py): library records below ERROR reach the log file, not the
console, whether they are logged before or after the file is known, through handlers the library adds
later or through the root's; errors still reach the console; ``--verbose`` changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import logging, sys
from pathlib import Path
from dist_unlearn.engine import chatter

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="root-handler %(name)s %(message)s")
chatter.quiet_console()
# a library that adds its own console handler after the CLI started (as DeepSpeed does at import)
ds = logging.getLogger("DeepSpeed")
own = logging.StreamHandler(sys.stdout)
ds.addHandler(own)
ds.warning("early warning")
logging.getLogger("ray.train.v2.controller").info("child info")
chatter.attach_log_file(Path(sys.argv[1]))
ds.info("late info")
ds.error("real error")
logging.getLogger("dist_unlearn.mine").info("our own record")
"""


def _run(tmp_path: Path, verbose: bool) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "logs" / "driver.log"
    env = {k: v for k, v in os.environ.items() if k != "DIST_UNLEARN_VERBOSE"}
    if verbose:
        env["DIST_UNLEARN_VERBOSE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result, log.read_text() if log.exists() else ""


def test_library_chatter_goes_to_the_file_and_errors_to_the_console(tmp_path: Path) -> None:
    result, text = _run(tmp_path, verbose=False)
    console = result.stdout + result.stderr
    for message in ("early warning", "child info", "late info"):
        assert message not in console
        assert message in text
    assert "real error" in result.stdout and "real error" in text
    assert "root-handler dist_unlearn.mine our own record" in result.stderr  # not a library: untouched
    assert "our own record" not in text
    assert [line.split(" ", 2)[2] for line in text.splitlines()] == [
        "WARNING DeepSpeed: early warning",
        "INFO ray.train.v2.controller: child info",
        "INFO DeepSpeed: late info",
        "ERROR DeepSpeed: real error",
    ]


def test_verbose_leaves_every_logger_alone(tmp_path: Path) -> None:
    result, text = _run(tmp_path, verbose=True)
    assert text == ""
    assert "early warning" in result.stdout and "root-handler ray.train.v2.controller child info" in result.stderr


SHM_SCRIPT = r"""
import deepspeed
import deepspeed.comm.comm as ds_comm
from dist_unlearn.distributed.env import init_distributed

init_distributed()
deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
print("shm op:", ds_comm.cdb.shm_comm_op)

import os, sys, torch
from dist_unlearn.distributed.env import import_deepspeed_muon_uncompiled, initialize_deepspeed

MUON = "deepspeed.runtime.zero.muon.muon_optimizer"
import_deepspeed_muon_uncompiled({"optimizer": {"type": "Muon"}})  # left to DeepSpeed (compiled)
print("muon imported for a Muon config:", MUON in sys.modules)
model = torch.nn.Linear(4, 4)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
engine = initialize_deepspeed(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
print("engine:", type(engine).__name__, type(engine.optimizer).__name__)
print("muon imported:", MUON in sys.modules)
print("inductor loaded:", "torch._inductor.compile_fx" in sys.modules)
print("dynamo switch:", os.environ.get("TORCHDYNAMO_DISABLE"))
"""


def test_deepspeed_sets_up_without_building_its_cpu_shm_op(tmp_path: Path) -> None:
    """Our process-group set-up keeps DeepSpeed from JIT-building (and announcing) its CPU shm op, and a ZeRO
    engine built by ``initialize_deepspeed`` does not load TorchInductor for DeepSpeed's Muon kernels (unless
    the config's optimizer is Muon); the process's TorchDynamo switch is left as it was."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}  # a build would land here
    # without the suite's start-up hooks, which skip the op in every test process (tests/force_bnb_cpu_fastpath)
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if "fastpath" not in p)
    result = subprocess.run([sys.executable, "-c", SHM_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shm op: None" in result.stdout
    assert "muon imported for a Muon config: False" in result.stdout
    assert "engine: DeepSpeedEngine DeepSpeedZeroOptimizer" in result.stdout, result.stdout
    assert "muon imported: True" in result.stdout and "inductor loaded: False" in result.stdout, result.stdout
    assert "dynamo switch: None" in result.stdout
    assert "built successfully" not in result.stdout + result.stderr
    assert not (tmp_path / "extensions").exists()
