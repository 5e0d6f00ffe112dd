"""End to end on CPU: Ray workers and torchrun ranks running DeepSpeed ZeRO-3 unlearning of a real
tiny Llama; equality of launchers, world-size invariance and resume-from-checkpoint.

All runs share one prepared target model and the same global batch, so their final weights and loss
curves can be compared directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, small_run_config, write_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# the two reference runs of this module also sample answers (leak rate) on their ranks
WITH_SAMPLES = {"generate": True, "sampled_generations": 2}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "model").glob("*.safetensors"))
    assert files, f"no exported model in {run_dir}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in _rows(run_dir)]


def _losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in _rows(run_dir)]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, small_target, ray_address):
    """2 Ray workers (on the session's cluster), ZeRO-3, GradDiff and NPO: the reference run of this module."""
    out = tmp_path_factory.mktemp("ray_run")
    cfg = small_run_config(
        out, small_target, method={"names": ["grad_diff", "npo"]}, ray={"address": ray_address}, eval=WITH_SAMPLES
    )
    result = run_cli(["run", str(write_config(out / "run.yaml", cfg))])
    return out, result


@pytest.fixture(scope="module")
def torchrun_two(tmp_path_factory, small_target):
    out = tmp_path_factory.mktemp("torchrun2")
    cfg = small_run_config(
        out, small_target, method={"names": ["grad_diff", "npo"]}, ray={"enabled": False}, eval=WITH_SAMPLES
    )
    run_cli(["run", str(write_config(out / "run.yaml", cfg))], nproc=2)
    return out


def test_ray_two_workers_zero3_unlearns_and_exports(ray_run):
    out, result = ray_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"grad_diff", "npo"}
    for method, s in summary.items():
        assert s["world_size"] == 2 and s["zero_stage"] == 3
        assert s["after"]["forget"]["prob"] < s["before"]["forget"]["prob"], method
        run_dir = out / method
        assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
        assert (run_dir / "checkpoints" / "step_000006").is_dir()
        assert (run_dir / "checkpoints" / "step_000006" / "dist_unlearn_job").read_text() == method
        assert list((run_dir / "tensorboard").glob("events.*"))
    assert list((out / "ray_results").glob("methods-*/checkpoint_*")), "no checkpoint reported to Ray"
    assert summary["npo"]["reference"] == "cached" and summary["grad_diff"]["reference"] == "none"
    assert "forget prob" in result.stdout and "grad_diff" in result.stdout
    # the export is a normal Hugging Face model directory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "grad_diff" / "model")
    tok = AutoTokenizer.from_pretrained(out / "grad_diff" / "model")
    assert model(**tok("Question: hi", return_tensors="pt")).logits.shape[-1] == len(tok)


def test_torchrun_without_ray_gives_the_same_weights(ray_run, torchrun_two):
    ray_out, _ = ray_run
    for method in ("grad_diff", "npo"):
        assert _max_diff(_weights(ray_out / method), _weights(torchrun_two / method)) < 1e-6
        assert _losses(ray_out / method) == pytest.approx(_losses(torchrun_two / method), rel=1e-6)


def test_world_size_invariance_one_vs_two_ranks(tmp_path, small_target, torchrun_two):
    cfg = small_run_config(
        tmp_path, small_target, method={"names": ["grad_diff", "npo"]}, ray={"enabled": False, "num_workers": 1}
    )
    run_cli(["run", str(write_config(tmp_path / "run.yaml", cfg))], nproc=1)
    for method in ("grad_diff", "npo"):
        assert _steps(tmp_path / method) == _steps(torchrun_two / method)
        one, two = _losses(tmp_path / method), _losses(torchrun_two / method)
        assert one == pytest.approx(two, rel=1e-4, abs=1e-5), (method, one, two)
        assert _max_diff(_weights(tmp_path / method), _weights(torchrun_two / method)) < 1e-4
        # evaluation sharded over 2 ranks equals the single-process one
        one_eval = json.loads((tmp_path / method / "metrics.json").read_text())
        two_eval = json.loads((torchrun_two / method / "metrics.json").read_text())
        for when in ("before", "after"):
            for split in ("forget", "retain"):
                assert one_eval[when][split]["count"] == two_eval[when][split]["count"] == 8
                for key in ("prob", "acc", "nll"):
                    assert one_eval[when][split][key] == pytest.approx(two_eval[when][split][key], rel=1e-4, abs=1e-6)


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, small_target, torchrun_two):
    """Stop after 3 of 6 steps (checkpoint written), continue to 6: same weights as the straight run."""
    first = small_run_config(
        tmp_path, small_target, method={"names": ["grad_diff", "npo"]}, ray={"enabled": False}, train={"steps": 3}
    )
    run_cli(["run", str(write_config(tmp_path / "run.yaml", first))], nproc=2)
    assert (tmp_path / "npo" / "checkpoints" / "step_000003").is_dir()
    second = small_run_config(tmp_path, small_target, method={"names": ["grad_diff", "npo"]}, ray={"enabled": False})
    result = run_cli(["run", str(write_config(tmp_path / "run.yaml", second))], nproc=2)
    assert "resumed from" in result.stdout + result.stderr
    for method in ("grad_diff", "npo"):
        assert _steps(tmp_path / method) == [1, 2, 3, 4, 5, 6]
        assert _max_diff(_weights(tmp_path / method), _weights(torchrun_two / method)) < 1e-6
        assert _losses(tmp_path / method) == pytest.approx(_losses(torchrun_two / method), rel=1e-6)


def test_changed_settings_refuse_to_resume_and_restart_starts_over(tmp_path, torchrun_two):
    """A copy of the 2-rank run (a moved output directory resumes; see runner.run_settings) refuses other
    settings before any work; ``--restart`` discards the method's checkpoints and runs it anew."""
    shutil.copytree(torchrun_two, tmp_path / "run")
    path = tmp_path / "run" / "run.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["output"]["dir"] = str(tmp_path / "run")
    write_config(path, cfg)
    result = run_cli(["run", str(path), "train.lr=0.5"], check=False)
    assert result.returncode == 2
    changed = "(train.lr: 0.001 -> 0.5, world_size: 2 -> 1)"
    assert f"holds checkpoints of a run with other settings {changed}" in result.stderr
    assert "--restart" in result.stderr
    assert _steps(tmp_path / "run" / "grad_diff") == [1, 2, 3, 4, 5, 6]  # untouched
    one_step = ["train.lr=0.5", "train.steps=1", "method.names=grad_diff", "ray.num_workers=1", "--restart"]
    run_cli(["run", str(path), *one_step])
    assert _steps(tmp_path / "run" / "grad_diff") == [1]
    assert not (tmp_path / "run" / "grad_diff" / "checkpoints" / "step_000006").exists()
    assert _steps(tmp_path / "run" / "npo") == [1, 2, 3, 4, 5, 6]  # another method's run is left alone
