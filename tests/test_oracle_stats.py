"""Forget quality against the oracle's saved statistics (``eval.oracle_stats``, open-unlearning's "retain
logs"): the same numbers as against the oracle model, a hand-enumerated KS p-value, open-unlearning's file
layout, and one-line errors for bad files."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from dist_unlearn.eval import metrics
from dist_unlearn.eval.oracle_stats import load_oracle_stats, write_oracle_stats
from dist_unlearn.eval.suite import EvalSettings, compare_to_reference, evaluate_model


def _ks_statistic(a: list[float], b: list[float]) -> Fraction:
    """``max_x |F_a(x) − F_b(x)|`` over the pooled values, in exact fractions."""
    return max(abs(Fraction(sum(v <= x for v in a), len(a)) - Fraction(sum(v <= x for v in b), len(b))) for x in a + b)


def test_ks_p_value_by_enumerating_every_split():
    """Exact two-sided KS p-value (Maini et al. 2024 use scipy's ``ks_2samp``): under H0 every assignment of
    the pooled values to the two samples is equally likely; p = share of assignments with D ≥ D_observed."""
    unlearned, oracle = [0.1, 0.4, 0.5, 0.9], [0.2, 0.3, 0.6, 0.7, 0.8]
    observed = _ks_statistic(unlearned, oracle)
    assert observed == Fraction(7, 20)  # at x = 0.5: F_unlearned = 3/4, F_oracle = 2/5
    pooled = unlearned + oracle
    splits = list(itertools.combinations(range(len(pooled)), len(unlearned)))
    extreme = sum(
        _ks_statistic([pooled[i] for i in idx], [pooled[i] for i in range(len(pooled)) if i not in idx]) >= observed
        for idx in splits
    )
    assert len(splits) == 126
    assert metrics.forget_quality(np.array(unlearned), np.array(oracle)) == pytest.approx(extreme / 126, abs=1e-12)


@pytest.fixture(scope="module")
def two_results(tmp_path_factory):
    """Suite results (no generation) of two different tiny Llamas on the small data: model and oracle."""
    from dist_unlearn.data import generate_facts
    from dist_unlearn.models import build_embedded_model

    facts = generate_facts(num_people=12, questions_per_person=3, forget_fraction=0.25, holdout_fraction=0.1, seed=0)
    settings = EvalSettings(max_examples=8, generate=False, max_length=48, batch_size=8)
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, tok = build_embedded_model(facts.corpus(), vocab_size=400, hidden_size=32, num_layers=1, num_heads=2)
        out.append(evaluate_model(model.eval(), tok, facts, settings))
    return out


def test_reference_from_the_file_equals_the_oracle_model(two_results, tmp_path):
    model, oracle = two_results
    path = write_oracle_stats(tmp_path / "oracle_stats.json", oracle, {"source": "fictitious"})
    from_file = compare_to_reference(model, load_oracle_stats(path))
    from_model = compare_to_reference(model, oracle)
    assert set(from_model) == {"forget_quality", "privleak", "mia_auc_gap"}
    assert from_file == from_model  # exact: floats round-trip through JSON
    saved = json.loads(path.read_text())
    assert saved["forget_truth_ratio"] == oracle["per_example"]["forget_truth_ratio"]
    assert saved["meta"] == {"source": "fictitious"}


def test_open_unlearning_retain_logs(two_results, tmp_path):
    """open-unlearning's retain-model eval JSON: forget quality from ``forget_truth_ratio.value_by_index``."""
    model, oracle = two_results
    ratios = oracle["per_example"]["forget_truth_ratio"]
    logs = {
        "forget_truth_ratio": {
            "agg_value": 0.5,
            "value_by_index": {str(i): {"score": r} for i, r in enumerate(ratios)},
        },
        "model_utility": {"agg_value": 0.6},
    }
    path = tmp_path / "TOFU_EVAL.json"
    path.write_text(json.dumps(logs))
    reference = load_oracle_stats(path)
    assert reference["per_example"]["forget_truth_ratio"] == ratios
    assert compare_to_reference(model, reference) == {
        "forget_quality": compare_to_reference(model, oracle)["forget_quality"]
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("{not json", "could not read"),
        (json.dumps({"model_utility": 0.5}), "holds no forget truth ratios"),
        (json.dumps({"forget_truth_ratio": [0.5, -1.0]}), "not positive finite"),
    ],
)
def test_bad_stats_files_fail_in_one_line(tmp_path, content, message):
    path = tmp_path / "stats.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_oracle_stats(path)
    text = str(err.value)
    assert text.startswith("eval.oracle_stats: ") and message in text and "Fix: " in text and "\n" not in text


def test_config_checks_oracle_stats_before_any_work(tmp_path):
    from dist_unlearn.config import ConfigError, config_from_dict
    from dist_unlearn.config.loader import load_config
    from dist_unlearn.engine.validate import validate_run

    missing = tmp_path / "run.yaml"
    missing.write_text("eval: {oracle_stats: nowhere.json}\n")
    with pytest.raises(ConfigError, match=r"eval\.oracle_stats: file not found: .*nowhere\.json\. Fix: "):
        load_config(missing, [])
    (tmp_path / "stats.json").write_text(json.dumps({"forget_truth_ratio": [0.5, 2.0]}))
    both = tmp_path / "both.yaml"
    both.write_text(f"eval: {{oracle_stats: stats.json, oracle_dir: {tmp_path}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(both, [])
    assert any(p.startswith("eval.oracle_stats: set together with eval.oracle_dir") for p in err.value.problems)
    (tmp_path / "empty.json").write_text("{}")
    cfg = config_from_dict({"eval": {"oracle_stats": str(tmp_path / "empty.json")}})
    with pytest.raises(ConfigError, match="holds no forget truth ratios"):
        validate_run(cfg)


def test_sweep_trials_keep_the_stats_file_as_the_reference(tmp_path):
    """A sweep's trials run with the statistics file, not with the embedded oracle next to the target."""
    from dist_unlearn.config import config_from_dict
    from dist_unlearn.engine.prepare import ModelAssets
    from dist_unlearn.ray.sweep import _trial_base

    stats = str(tmp_path / "oracle_stats.json")
    (tmp_path / "oracle_stats.json").write_text(json.dumps({"forget_truth_ratio": [0.5, 2.0]}))
    cfg = config_from_dict({"eval": {"oracle_stats": stats}})
    base = _trial_base(cfg, ModelAssets(str(tmp_path / "target"), str(tmp_path / "oracle")))
    assert (base["eval"]["oracle_dir"], base["eval"]["oracle_stats"]) == ("", stats)
