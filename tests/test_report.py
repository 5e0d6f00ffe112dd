"""`dist-unlearn eval` on the small embedded target and oracle, then `dist-unlearn report`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, small_run_config, write_config

pytestmark = pytest.mark.slow


def test_eval_and_report_target_vs_oracle(small_target, tmp_path):
    shutil.copytree(Path(small_target).parents[1] / "embedded", tmp_path / "embedded")  # reuse the prepared models
    cfg = small_run_config(
        tmp_path,
        ray={"enabled": False},
        eval={"sampled_generations": 2, "max_new_tokens": 12, "attacks": ["relearn"], "relearn_steps": 3},
    )
    cfg["model"] = {"path": "embedded"}
    config = write_config(tmp_path / "eval.yaml", cfg)
    out = run_cli(["eval", str(config)], timeout=600).stdout
    assert "| original |" in out and "| oracle |" in out

    oracle = json.loads((tmp_path / "oracle" / "eval.json").read_text())
    target = json.loads((tmp_path / "original" / "eval.json").read_text())
    # the oracle against itself: identical truth-ratio distributions and equal AUCs
    assert oracle["result"]["forget_quality"] == pytest.approx(1.0)
    assert oracle["result"]["privleak"] == pytest.approx(0.0)  # MUSE's PrivLeak
    assert oracle["result"]["mia_auc_gap"]["min_k_pp"] == pytest.approx(0.0)
    # the target was trained on the forget set, the oracle was not
    t, o = target["result"], oracle["result"]
    assert t["splits"]["forget"]["prob"] > 0.8 > 0.3 > o["splits"]["forget"]["prob"]
    assert t["splits"]["forget"]["rouge"] > o["splits"]["forget"]["rouge"]
    assert t["mia_auc"]["loss"] > 0.9 and t["mia_auc_gap"]["loss"] > 0
    assert t["privleak"] < -50  # MUSE's orientation: a model trained on the forget set is near -100
    assert t["forget_quality"] < o["forget_quality"]
    assert 0 < t["retain_utility"] <= 1 and "model_utility" not in t  # no real_authors/world_facts: not TOFU's
    forget = t["splits"]["forget"]
    assert 0 <= forget["sampled_leak"] <= forget["sampled_leak_upper95"] <= 1
    assert set(target["attacks"]) == {"relearn"}

    report = run_cli(["report", str(tmp_path)]).stdout
    md = (tmp_path / "report.md").read_text()
    assert "| original |" in md and "| oracle |" in md and "forget quality" in md
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    assert "report:" in report
    bad = run_cli(["report", str(tmp_path / "nothing-here")], check=False)
    assert bad.returncode == 2 and "not a directory" in bad.stderr
