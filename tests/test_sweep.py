"""`dist-unlearn sweep`: the search-space syntax and its checks, the objective (forget quality subject to
utility ≥ x × the target's), the Pareto front and the table, against hand-computed values; one end-to-end
sweep on the session's Ray cluster that is interrupted after its first trial and resumed."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, run_cli, small_run_config, write_config

from dist_unlearn.cli import main
from dist_unlearn.config import ConfigError, config_from_dict
from dist_unlearn.config.sweep import (
    Dimension,
    apply_overrides,
    format_value,
    parse_space,
    trial_count,
    trial_dirname,
)
from dist_unlearn.eval.sweep_report import (
    DONE,
    STOPPED,
    Objective,
    TrialRow,
    mark_pareto,
    pareto_front,
    rank,
    score,
    table_markdown,
    write_results,
)

# --- the search space ------------------------------------------------------------------------------


def test_space_syntax_flat_nested_and_call_forms():
    dims = parse_space(
        {
            "train.lr": "loguniform(1e-5, 1e-3)",  # 1e-5: a string to PyYAML, a number here
            "method": {"params": {"npo": {"beta": [0.05, 0.1]}}},  # nested, as sweep.space.method.params... creates
            "method.retain_weight": {"uniform": [1, 5]},
            "train.steps": "choice(10, 20)",
            "train.seed": {"randint": [0, 9]},
        }
    )
    assert dims == [
        Dimension("train.lr", "loguniform", (1e-5, 1e-3)),
        Dimension("method.params.npo.beta", "grid", (0.05, 0.1)),
        Dimension("method.retain_weight", "uniform", (1.0, 5.0)),
        Dimension("train.steps", "choice", (10, 20)),
        Dimension("train.seed", "randint", (0, 9)),
    ]
    assert trial_count(dims, num_samples=3) == 6  # the grid (2 values) × 3 samples of the random dimensions
    assert dims[0].describe() == "loguniform(1.0e-05, 0.001)"


def test_space_from_command_line_override(tmp_path):
    path = write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "out"))
    from dist_unlearn.config import load_config

    cfg = load_config(
        path, ["sweep.space.train.lr=loguniform(1e-5,1e-3)", "sweep.space.method.params.npo.beta=[0.1,0.2]"]
    )
    assert parse_space(cfg.sweep.space) == [
        Dimension("train.lr", "loguniform", (1e-5, 1e-3)),
        Dimension("method.params.npo.beta", "grid", (0.1, 0.2)),
    ]


def test_override_replaces_the_files_dimension(tmp_path):
    from dist_unlearn.config import load_config

    cfg = small_run_config(tmp_path / "out")
    cfg["sweep"] = {"space": {"train.lr": [1.0e-3, 2.0e-3], "train.steps": [2, 4]}}
    path = write_config(tmp_path / "c.yaml", cfg)
    dims = parse_space(load_config(path, ["sweep.space.train.lr=[3.0e-3]"]).sweep.space)
    assert dims == [Dimension("train.lr", "grid", (3e-3,)), Dimension("train.steps", "grid", (2, 4))]


def test_submit_renders_the_ray_template_with_sweep(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "out", eval={"every_steps": 3}))
    assert main(["submit", str(path), "--command", "sweep", "--dry-run", "sweep.space.train.lr=[1.0e-3,2.0e-3]"]) == 0
    script = capsys.readouterr().out
    line = next(line for line in script.splitlines() if 'dist-unlearn" ' in line)
    assert line.startswith('"$BIN/dist-unlearn" sweep ') and "'sweep.space.train.lr=[1.0e-3,2.0e-3]'" in line
    assert "#SBATCH --job-name=dist-unlearn-sweep" in script.splitlines()
    assert main(["submit", str(path), "--command", "sweep", "--launcher", "torchrun", "--dry-run"]) == 2
    assert "Fix: --launcher ray" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"train.lr": []}, "sweep.space.train.lr: an empty list has no value to try. Fix:"),
        ({"train.lr": "loguniform(1e-3, 1e-5)"}, "sweep.space.train.lr: loguniform needs low < high"),
        ({"train.lr": "uniform(a, 1)"}, "sweep.space.train.lr: uniform takes two numbers"),
        ({"train.lr": "loguniform(0, 1)"}, "sweep.space.train.lr: loguniform needs low > 0"),
        ({"train.steps": "randint(1.5, 4)"}, "sweep.space.train.steps: randint takes two integers"),
        ({"train.lr": "logunifrom(1e-5, 1e-3)"}, "unknown distribution 'logunifrom'. Fix: did you mean loguniform?"),
        ({"train.lr": 0.1}, "sweep.space.train.lr: the single value 0.1 is no search space. Fix:"),
        ({"eval.max_examples": [1, 2]}, "sweep.space.eval.max_examples: eval.* is the same in every trial"),
        ({}, "sweep.space is empty"),
    ],
)
def test_space_syntax_errors_name_the_key_and_the_fix(space, expected):
    with pytest.raises(ConfigError) as info:
        parse_space(space)
    message = str(info.value)
    assert expected in message and "Fix:" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "sweep.space.train.lrr=[1.0e-4,2.0e-4]",
            "sweep.space.train.lrr: unknown key 'train.lrr'; did you mean 'train.lr'? Fix: search sweep.space.train.lr",
        ),
        ("sweep.space.train.steps=[a,2]", "sweep.space.train.steps (value a): train.steps: expected an integer"),
        ("sweep.space.train.lr=[]", "sweep.space.train.lr: an empty list"),
        ("sweep.space.train.lr=uniform(0,1e-3)", "sweep.space.train.lr (value 0.0): train.lr: must be > 0"),
        ("sweep.space.method.params.grad_diff.betta=[1,2]", "method 'grad_diff' does not take parameter(s) betta"),
    ],
)
def test_bad_space_fails_before_any_trial_with_one_line(tmp_path, capsys, override, expected):
    out = tmp_path / "out"
    path = write_config(tmp_path / "c.yaml", small_run_config(out, eval={"every_steps": 3}))
    code = main(["sweep", str(path), override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("dist-unlearn: invalid sweep: ") and expected in err and "Fix:" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "a rejected sweep must not start any work"


def test_sweep_rules(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "out", method={"names": ["grad_diff", "npo"]}))
    code = main(["sweep", str(path), "sweep.space.train.lr=[1.0e-4,2.0e-4]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "method.names: a trial tunes one method" in err  # and ASHA without periodic evaluation:
    assert "sweep.scheduler=asha stops poor trials at their periodic evaluations, and eval.every_steps is 0" in err


def test_override_values_read_back_the_same():
    for value in (1e-5, 2.5e-4, 0.1, 3, True, None, "grad_diff", [1e-5, 0.2], {"beta": 0.1}):
        assert yaml.safe_load(format_value(value)) == value, value
    assert format_value(1e-5) == "1.0e-05"  # PyYAML reads 1e-05 as a string
    base = {"method": {"robust": "sam", "params": {}}, "train": {"lr": 1.0}}
    out = apply_overrides(base, {"train.lr": 1e-4, "method.params.npo.beta": 0.2, "method.robust.rho": 0.1})
    assert out == {
        "method": {"robust": {"name": "sam", "rho": 0.1}, "params": {"npo": {"beta": 0.2}}},
        "train": {"lr": 1e-4},
    }
    assert base["train"]["lr"] == 1.0
    assert (
        trial_dirname(3, {"train.lr": 1e-4})
        == trial_dirname(3, {"train.lr": 1e-4})
        != trial_dirname(3, {"train.lr": 2e-4})
    )


def test_sweep_section_is_ignored_by_run_config():
    cfg = config_from_dict({"sweep": {"space": {"train.lr": [1, 2]}, "num_samples": 2, "min_utility_ratio": 0.9}})
    assert cfg.sweep.num_samples == 2 and cfg.sweep.min_utility_ratio == 0.9
    with pytest.raises(ConfigError, match="sweep.space: expected a mapping"):
        config_from_dict({"sweep": {"space": [1, 2]}})


# --- the objective, ranking, Pareto front ----------------------------------------------------------


def test_objective_compares_utility_on_the_same_metric():
    target = {"model_utility": 0.5, "retain_utility": 0.8, "retain_utility_no_rouge": 0.6}
    objective = Objective(0.95, target)
    # a final evaluation on a TOFU-like benchmark: model_utility first
    full = objective.measure({"forget_quality": 0.2, "model_utility": 0.49, "retain_utility": 0.1})
    assert full["utility_metric"] == "model_utility" and full["utility_ratio"] == pytest.approx(0.98)
    assert full["feasible"] and full["score"] == pytest.approx(0.2)
    # a periodic evaluation without generation: only the no-ROUGE utility, compared with the target's own
    periodic = objective.measure({"forget_quality": 0.3, "retain_utility_no_rouge": 0.54})
    assert periodic["utility_metric"] == "retain_utility_no_rouge"
    assert periodic["utility_ratio"] == pytest.approx(0.9) and not periodic["feasible"]
    assert periodic["score"] == pytest.approx(-1 / 1.9)
    assert objective.measure({"retain_utility": 0.8})["score"] == -math.inf


def test_score_ranks_every_violator_below_every_feasible_trial():
    x = 0.95
    assert score(0.0, 0.95, x) == 0.0  # feasible, no forgetting at all: still above any violator
    assert score(1e-12, 1.2, x) == 1e-12
    assert score(0.9, 0.94, x) == pytest.approx(-1 / 1.94)  # a violator with excellent forget quality ...
    assert score(0.9, 0.94, x) < score(0.0, 0.95, x)  # ... ranks below
    assert score(0.01, 0.9, x) > score(0.9, 0.5, x)  # violators: closer to the constraint first
    assert score(None, 1.0, x) == score(0.5, None, x) == -math.inf


def _row(index, fq, utility, ratio, status=DONE, x=0.95):
    return TrialRow(
        index=index,
        name=f"t{index}",
        overrides={"train.lr": 10.0 ** -(index + 3)},
        status=status,
        step=4,
        forget_quality=fq,
        utility=utility,
        utility_metric="retain_utility",
        utility_ratio=ratio,
        feasible=ratio is not None and ratio >= x,
        score=score(fq, ratio, x),
    )


def test_rank_and_pareto_front_by_hand():
    rows = [
        _row(0, 0.10, 0.50, 1.00),  # feasible
        _row(1, 0.40, 0.48, 0.96),  # feasible, best forget quality among feasible -> rank 1
        _row(2, 0.90, 0.30, 0.60),  # violator, on the front (best forget quality)
        _row(3, 0.05, 0.47, 0.94),  # violator, dominated by 1 (0.48 > 0.47, 0.40 > 0.05)
        _row(4, None, None, None, status="error"),
    ]
    assert [r.index for r in rank(rows)] == [1, 0, 3, 2, 4]
    assert pareto_front([(0.5, 0.1), (0.48, 0.4), (0.3, 0.9), (0.47, 0.05), (None, None)]) == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert pareto_front([(0.5, 0.1), (0.5, 0.1)]) == [True, True]  # equal points do not dominate each other
    mark_pareto(rows)
    assert [r.pareto for r in rows] == [True, True, True, False, False]
    table = table_markdown(rows, Objective(0.95, {"retain_utility": 0.5}))
    lines = table.splitlines()
    assert lines[2].startswith(
        "| 1 | 1 | `train.lr=0.0001` | 0.400 | 0.480 (retain_utility) | 0.960 | yes | yes | done |"
    )
    assert lines[-1].startswith("| 5 | 4 |") and "error" in lines[-1]


def test_results_files(tmp_path):
    rows = [_row(0, 0.1, 0.5, 1.0), _row(1, 0.02, 0.3, 0.6, status=STOPPED)]
    objective = Objective(0.95, {"retain_utility": 0.5})
    json_path, md_path, png_path = write_results(tmp_path, rows, objective, {"config": "c.yaml"})
    data = json.loads(json_path.read_text())
    assert [t["index"] for t in data["trials"]] == [0, 1] and data["objective"]["min_utility_ratio"] == 0.95
    assert "stopped early at step 4" in md_path.read_text()
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


# --- end to end --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)  # alone, the session's fixtures (a prepared model, a Ray cluster) are made first
def test_sweep_interrupted_after_a_trial_resumes_without_redoing_it(
    tmp_path, small_target, ray_address, one_process_eval
):
    """2 trials (a grid over train.lr), one at a time, 1 Ray worker each, on the session's cluster. The driver
    gets SIGTERM once the first trial has finished; the same command then completes the second only. Its
    cost is mostly Ray Train worker-group starts (three trial runs). The target's evaluation, which the
    sweep makes once and keeps in SWEEP/target/eval.json, is the session's one-process evaluation of the
    same target with the same generation settings (making it goes through ``evaluate_on_ray``, tested in
    test_eval_ray)."""
    out = tmp_path / "sweep"
    (out / "target").mkdir(parents=True)
    shutil.copy(one_process_eval[0] / "original" / "eval.json", out / "target" / "eval.json")
    cfg = small_run_config(
        out,
        small_target,
        train={"steps": 4},
        deepspeed={"zero_stage": 2},
        ray={"num_workers": 1, "address": ray_address},
        checkpoint={"every_steps": 2},
        eval={"every_steps": 2, "generate": True, "sampled_generations": 0, "max_new_tokens": 8},
    )
    cfg["sweep"] = {"space": {"train.lr": [1.0e-3, 3.0e-3]}, "max_concurrent": 1}
    path = write_config(tmp_path / "sweep.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "dist-unlearn"), "sweep", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        records = out / "trials"
        deadline = time.monotonic() + 600
        while not list(records.glob("trial_000_*/trial.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        proc.send_signal(signal.SIGTERM)
        first_out = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    first_s = time.monotonic() - started
    assert proc.returncode == 75, first_out[-4000:]
    assert "Run the same command again to resume" in first_out
    assert "evaluating the target model" not in first_out  # the kept evaluation is reused
    (first,) = records.glob("trial_000_*")
    assert json.loads((first / "trial.json").read_text())["status"] == "done"
    metrics_before = (first / "grad_diff" / "metrics.jsonl").read_text()
    eval_mtime = (first / "grad_diff" / "eval.json").stat().st_mtime_ns

    second = run_cli(["sweep", str(path)], timeout=600)
    text = second.stdout + second.stderr
    assert "(resumed)" in text
    assert "trial 0/2 (train.lr=0.001): started" not in text  # the finished trial is not run again
    assert (first / "grad_diff" / "metrics.jsonl").read_text() == metrics_before
    assert (first / "grad_diff" / "eval.json").stat().st_mtime_ns == eval_mtime
    results = json.loads((out / "results.json").read_text())
    assert sorted(t["index"] for t in results["trials"]) == [0, 1]
    assert all(t["status"] == "done" and t["forget_quality"] is not None for t in results["trials"])
    assert (out / "results.md").is_file() and (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "reproduce: dist-unlearn run " in text and "train.lr=" in text
    print(f"\nfirst run (until interrupted) {first_s:.0f} s, total {time.monotonic() - started:.0f} s")


def test_tune_wiring_scheduler_domains_and_reproduce_command(tmp_path):
    from ray import tune

    from dist_unlearn.engine.prepare import ModelAssets
    from dist_unlearn.ray.sweep import _scheduler, reproduce_command, tune_domain

    cfg = config_from_dict(small_run_config(tmp_path / "out", train={"steps": 8}, eval={"every_steps": 2}))
    dims = parse_space({"train.steps": [8, 12], "train.seed": "randint(0, 3)", "train.lr": "loguniform(1e-5,1e-3)"})
    asha = _scheduler(cfg, dims)
    assert (asha._time_attr, asha._max_t) == ("step", 13)  # reaching the last step is no reason to stop a trial
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [8, 4, 2]  # grace: eval.every_steps
    assert tune_domain(dims[0]) == tune.grid_search([8, 12])
    assert (tune_domain(dims[1]).lower, tune_domain(dims[1]).upper) == (0, 4)  # randint's high end included
    row = TrialRow(index=1, name="t", overrides={"train.lr": 1e-5, "method.params.npo.beta": 0.1}, status=DONE)
    command = reproduce_command(
        cfg, row, "c.yaml", ["train.steps=8", "sweep.num_samples=2"], ModelAssets("/m/target", None)
    )
    assert command == (
        f"dist-unlearn run {Path('c.yaml').resolve()} train.steps=8 train.lr=1.0e-05 method.params.npo.beta=0.1 "
        f"model.path=/m/target output.dir={tmp_path / 'out' / 'best'}"
    )
