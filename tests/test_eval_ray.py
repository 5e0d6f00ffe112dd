"""`dist-unlearn eval` on 2 Ray workers equals the one-process evaluation; `run` with
`eval.every_steps` evaluates during training and keeps the best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ONE_PROCESS_EVAL, copy_prepared_models, run_cli, small_run_config, write_config

pytestmark = pytest.mark.slow


def _eval_on_ray(tmp: Path, small_target: str, ray_address: str) -> dict:
    """Evaluate the prepared target and oracle on 2 workers of the cluster at ``ray_address``."""
    copy_prepared_models(small_target, tmp)
    ray = {"enabled": True, "num_workers": 2, "address": ray_address}
    settings = {key: value for key, value in ONE_PROCESS_EVAL.items() if not key.startswith(("attacks", "relearn"))}
    cfg = small_run_config(tmp, ray=ray, eval=settings)  # the attacks only add entries under "attacks"
    cfg["model"] = {"path": "embedded"}
    run_cli(["eval", str(write_config(tmp / "eval.yaml", cfg))], timeout=900)
    return _result(tmp)


def _result(out: Path) -> dict:
    return json.loads((out / "original" / "eval.json").read_text())["result"]


def _flatten(tree: object, prefix: str = "") -> dict[str, float]:
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: float(tree)} if isinstance(tree, int | float) else {}


def test_eval_on_two_ray_workers_equals_one_process(tmp_path, small_target, ray_address, one_process_eval):
    sharded = _flatten(_eval_on_ray(tmp_path / "ray", small_target, ray_address))
    single = _flatten(_result(one_process_eval[0]))
    assert sharded.keys() == single.keys() and len(single) > 20
    for key, value in single.items():
        assert sharded[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_periodic_eval_on_two_zero3_ranks_keeps_the_best_checkpoint(tmp_path, small_target):
    """``eval.every_steps`` under ``torchrun`` on 2 ranks at ZeRO-3: evaluations at steps 2 and 4, ``best.json``
    names the better one, and ``best_model`` holds exactly the weights of the checkpoint of that step
    (consolidated from its ZeRO-3 partitions with DeepSpeed's own ``zero_to_fp32``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    cfg = small_run_config(
        tmp_path,
        small_target,
        method={"names": ["grad_diff"]},
        train={"steps": 4, "lr": 3.0e-3},
        ray={"enabled": False},
        eval={"every_steps": 2, "best_metric": "forget_quality", "sampled_generations": 0},
        checkpoint={"every_steps": 2},
        deepspeed={"zero_stage": 3},
    )
    run_cli(["run", str(write_config(tmp_path / "run.yaml", cfg))], nproc=2, timeout=900)
    run = tmp_path / "grad_diff"
    rows = [json.loads(line) for line in (run / "eval_steps.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    best = json.loads((run / "best.json").read_text())
    values = {row["step"]: row["result"]["forget_quality"] for row in rows}
    assert best["metric"] == "forget_quality" and best["value"] == pytest.approx(max(values.values()))
    assert values[best["step"]] == pytest.approx(best["value"])
    assert (run / "best_model" / "config.json").is_file() and (run / "eval.json").is_file()

    exported = {k: v for f in sorted((run / "best_model").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    checkpoint = run / "checkpoints" / f"step_{best['step']:06d}"
    saved = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="state")
    shared = exported.keys() & saved.keys()
    assert len(shared) == len(exported), sorted(exported.keys() - saved.keys())
    assert all(torch.equal(exported[k].float(), saved[k].float()) for k in shared)
