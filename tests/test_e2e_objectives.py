"""Every objective through ``dist-unlearn run`` on the embedded default: 2 ``torchrun`` ranks, DeepSpeed
ZeRO-3, two steps each, all methods in ONE run (the start-up is paid once). Ray is not what this test is
about; the Ray path of the same loop is covered by test_e2e_unlearn (Ray and torchrun give equal weights)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from conftest import run_cli, small_run_config, write_config

from dist_unlearn.unlearning import OBJECTIVES

pytestmark = pytest.mark.slow

# reference mode each method resolves to under method.reference=auto without LoRA
EXPECTED_REFERENCE = {name: "none" for name in OBJECTIVES} | {
    "npo": "cached",
    "npo_gd": "cached",
    "dpo": "cached",
    "idk_dpo": "cached",
    "rmu": "cached",
    "npo_kl": "sharded",
    "undial": "sharded",
}


def _run_all(out, small_target, ray: bool):
    cfg = small_run_config(
        out,
        small_target,
        method={"names": list(OBJECTIVES)},
        train={"steps": 2, "forget_batch_size": 4, "retain_batch_size": 4, "lr": 1.0e-3},
        ray={"enabled": ray, "num_workers": 2},
        checkpoint={"every_steps": 0},
        eval={"max_examples": 4, "generate": False},  # 17 methods x 2 evaluations: the losses are under test
        output={"dir": str(out), "save_dtype": "fp32", "tensorboard": False},
    )
    started = time.perf_counter()
    run_cli(["run", str(write_config(out / "run.yaml", cfg))], nproc=None if ray else 2, timeout=1500)
    return out, time.perf_counter() - started


def test_every_objective_runs_on_two_zero3_ranks(tmp_path, small_target):
    out, seconds = _run_all(tmp_path, small_target, ray=False)
    _check_all(out, seconds)
    assert set(json.loads((out / "summary.json").read_text())) == set(OBJECTIVES)


def _check_all(out, seconds):
    for name in OBJECTIVES:
        s = json.loads((out / name / "metrics.json").read_text())
        assert s["world_size"] == 2 and s["zero_stage"] == 3, name
        assert s["reference"] == EXPECTED_REFERENCE[name], (name, s["reference"])
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2], name
        for row in rows:
            for key in ("loss", "forget_loss", "forget_nll"):
                assert math.isfinite(row[key]), (name, key, row)
        assert (out / name / "model").is_dir(), name
    uld = json.loads((out / "uld" / "model" / "inference.json").read_text())  # scored as target − α·assistant
    assert uld["kind"] == "logit_difference" and uld["alpha"] == 0.5 and (Path(uld["target"]) / "config.json").is_file()
    print(f"\n{len(OBJECTIVES)} methods in {seconds:.0f} s ({seconds / len(OBJECTIVES):.1f} s per method)")
