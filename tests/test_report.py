"""`dist-unlearn eval` on the small embedded target and oracle, then `dist-unlearn report`."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_eval_and_report_target_vs_oracle(one_process_eval):
    tmp_path, out = one_process_eval
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
    for name, evaluation in (("original", target), ("oracle", oracle)):
        _check_row_against_eval_json(_table_row(md, name), evaluation)
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    assert "report:" in report
    bad = run_cli(["report", str(tmp_path / "nothing-here")], check=False)
    assert bad.returncode == 2 and "not a directory" in bad.stderr


def _table_row(markdown: str, name: str) -> dict[str, str]:
    """The report table's row of model ``name`` as ``column header → cell``."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines() if line[:1] == "|"]
    header = rows[0]
    (row,) = [r for r in rows[2:] if r[0] == name]
    return dict(zip(header, row, strict=True))


def _check_row_against_eval_json(row: dict[str, str], evaluation: dict) -> None:
    """Each cell shows the number eval.json holds (read here by its own path, not through the report code)."""
    r = evaluation["result"]
    forget = r["splits"]["forget"]
    expected = {
        "forget quality ↑": r["forget_quality"],
        "retain utility ↑": r["retain_utility"],
        "forget ROUGE-L ↓": forget["rouge"],
        "retain ROUGE-L ↑": r["splits"]["retain"]["rouge"],
        "forget prob ↓": forget["prob"],
        "MIA AUC (Min-K%++)": r["mia_auc"]["min_k_pp"],
        "PrivLeak % (MUSE, →0)": r["privleak"],
        "MIA AUC gap % (Min-K%++, →0)": r["mia_auc_gap"]["min_k_pp"],
        "sampled leak ↓": forget["sampled_leak"],
    }
    for column, value in expected.items():
        assert float(row[column]) == pytest.approx(value, abs=5.001e-4), (column, row[column], value)  # 3 decimals
    assert row["model utility (TOFU) ↑"] == "–"  # the embedded benchmark has no real-authors/world-facts sets
    before, after = row["relearn: forget ROUGE"].split(" → ")
    assert float(before) == pytest.approx(forget["rouge"], abs=5e-3)
    assert float(after) == pytest.approx(evaluation["attacks"]["relearn"]["splits"]["forget"]["rouge"], abs=5e-3)
