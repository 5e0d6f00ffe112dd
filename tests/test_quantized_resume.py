"""The README's quantized command (nf4 base + LoRA r=8) on 2 Ray workers under ZeRO-3, with
checkpoints: stopped mid-run (``OUTPUT/STOP``: checkpoint, exit 75), then the same command again
resumes it and ends with the weights of an uninterrupted run (the session's 2-rank ``torchrun`` run of
the same config: the launchers give equal weights, see test_e2e_unlearn).

The suite runs as on a CPU with AVX512-BF16 (``tests/force_bnb_cpu_fastpath``); there, bitsandbytes'
CPU repacking used to break the first checkpoint of exactly this command.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import BIN, NF4_EVERY, NF4_STEPS, REPO, nf4_run_config, run_cli, write_config
from reference_run import logged_steps, max_diff, weights

from dist_unlearn.engine.preemption import REQUEUE_EXIT_CODE, stop_file

pytestmark = pytest.mark.slow

STEPS, EVERY = NF4_STEPS, NF4_EVERY


def test_nf4_lora_run_on_ray_stopped_and_resumed_equals_an_uninterrupted_run(
    tmp_path, small_target, ray_address, nf4_torchrun_run
) -> None:
    parted = tmp_path / "parted"
    # the session's Ray cluster: its start-up is not under test here
    config = write_config(parted / "run.yaml", nf4_run_config(parted, small_target, ray={"address": ray_address}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = tmp_path / "stopped.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "dist-unlearn"), "run", str(config)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    run_dir = parted / "grad_diff"
    try:
        deadline = time.monotonic() + 480
        while not (run_dir / "checkpoints" / f"step_{EVERY:06d}").is_dir():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no first checkpoint within 480 s"
            time.sleep(0.2)
        stop_file(parted).touch()
        proc.wait(timeout=480)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == REQUEUE_EXIT_CODE, log.read_text()[-4000:]
    stopped_at = logged_steps(run_dir)[-1]
    assert EVERY <= stopped_at < STEPS, f"stopped at step {stopped_at}, not mid-run"
    assert not (run_dir / "model").exists()

    resumed = run_cli(["run", str(config)])
    assert "[grad_diff] resumed from " in resumed.stdout + resumed.stderr
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    diff = max_diff(weights(run_dir), weights(nf4_torchrun_run / "grad_diff"))
    print(f"nf4+LoRA on Ray: stopped at step {stopped_at}, resumed; max |dw| vs uninterrupted = {diff:.3g}")
    assert diff < 1e-6
    adapter = run_dir / "model" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
