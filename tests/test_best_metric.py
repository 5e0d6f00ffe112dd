"""``eval.best_metric`` that a run cannot measure: refused before the run when the config shows it (no oracle),
else replaced by −forget probability at the first periodic evaluation, with a warning and a note in best.json."""

from __future__ import annotations

import json

import pytest

from dist_unlearn.config import ConfigError, config_from_dict
from dist_unlearn.engine.validate import validate_run


def _cfg(tmp_path, model_path: str, **eval_section) -> object:
    return config_from_dict(
        {
            "model": {"path": model_path},
            "data": {"num_people": 6, "questions_per_person": 2, "holdout_fraction": 0.2},
            "method": {"names": ["grad_diff"]},
            "train": {"steps": 2, "forget_batch_size": 2, "retain_batch_size": 2},
            "ray": {"enabled": False, "num_workers": 1},
            "eval": {"max_examples": 4, "generate": False, **eval_section},
            "output": {"dir": str(tmp_path / "out")},
        }
    )


@pytest.mark.parametrize("metric", ["forget_quality", "privleak_abs"])
def test_oracle_metric_without_an_oracle_fails_before_the_run(tmp_path, metric):
    own_model = tmp_path / "my-model"  # a user's model: no oracle next to it
    own_model.mkdir()
    with pytest.raises(ConfigError) as err:
        validate_run(_cfg(tmp_path, str(own_model), every_steps=1, best_metric=metric))
    assert f"eval.best_metric: {metric} is measured against an oracle" in str(err.value)
    assert "Fix: eval.best_metric=model_utility" in str(err.value)
    validate_run(_cfg(tmp_path, str(own_model), every_steps=1, best_metric="neg_forget_prob"))
    validate_run(_cfg(tmp_path, str(own_model), every_steps=0, best_metric=metric))  # no periodic evaluation
    validate_run(_cfg(tmp_path, "embedded", every_steps=1, best_metric=metric))  # the embedded oracle


def test_metric_without_a_value_falls_back_to_neg_forget_prob(tmp_path):
    from dist_unlearn.data import generate_facts
    from dist_unlearn.eval.periodic import RunEvaluator
    from dist_unlearn.models import build_embedded_model

    cfg = _cfg(tmp_path, "embedded", every_steps=1, best_metric="forget_quality")
    facts = generate_facts(num_people=6, questions_per_person=2, seed=1)
    model, tok = build_embedded_model(facts.corpus(), vocab_size=300, hidden_size=32, num_layers=1, num_heads=2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # a starting model with no oracle next to it: forget quality has no value in any evaluation
    evaluator = RunEvaluator(cfg, tok, facts, run_dir, str(tmp_path / "my-model"), "cpu")
    exported = []
    with pytest.warns(UserWarning, match="eval.best_metric=forget_quality has no value"):
        evaluator.after_step(model, 1, lambda engine, path: exported.append(path))
    best = json.loads((run_dir / "best.json").read_text())
    assert best["metric"] == "neg_forget_prob" and best["requested"] == "forget_quality" and best["step"] == 1
    row = json.loads((run_dir / "eval_steps.jsonl").read_text().splitlines()[0])
    assert best["value"] == pytest.approx(-row["result"]["splits"]["forget"]["prob"])
    assert exported == [run_dir / "best_model"]

    resumed = RunEvaluator(  # a resumed run keeps the metric the best model was picked by
        cfg, tok, facts, run_dir, str(tmp_path / "my-model"), "cpu"
    )
    assert resumed.metric == "neg_forget_prob" and resumed.best == best["value"]
