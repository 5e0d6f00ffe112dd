"""Published metrics against hand-computed values: MUSE's PrivLeak (orientation, attack, sign), Min-K%,
Min-K%++ and our own MIA AUC gap, through the same functions the evaluation suite uses."""

from __future__ import annotations

import pytest
import torch

from dist_unlearn.eval import metrics
from dist_unlearn.eval.mia import mia_scores, scores_from_token_stats
from dist_unlearn.eval.report import report_table
from dist_unlearn.eval.suite import compare_to_reference, headline, membership_aucs


def _stats(logps, mus=None, sigmas=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token statistics ``[b, T, 4]`` (log p, hit, μ, σ) of sequences with the given token log-probs."""
    lp = torch.tensor(logps, dtype=torch.float32)
    mu = torch.tensor(mus, dtype=torch.float32) if mus is not None else torch.zeros_like(lp)
    sd = torch.tensor(sigmas, dtype=torch.float32) if sigmas is not None else torch.ones_like(lp)
    return torch.stack([lp, torch.zeros_like(lp), mu, sd], dim=-1), torch.ones(lp.shape, dtype=torch.bool)


def _scores(logps, k=0.2, mus=None, sigmas=None) -> dict[str, torch.Tensor]:
    stats, mask = _stats(logps, mus, sigmas)
    rows = scores_from_token_stats(stats, mask, k)
    return mia_scores(rows, ["some answer text"] * len(logps))


def _result(forget_logps, holdout_logps) -> dict:
    return membership_aucs(_scores(forget_logps), _scores(holdout_logps)) | {"per_example": {}}


# Five tokens per text: MUSE's Min-40% is the mean of the int(0.4·5) = 2 lowest token log-probs.
HOLDOUT = [[-2, -1, -3, -1, -1], [-1, -1.5, -0.5, -2, -1]]  # Min-40%: -2.5, -1.75
TARGET_FORGET = [[-0.1, -0.2, -0.3, -0.4, -0.5], [-0.2, -0.2, -0.6, -0.1, -0.1]]  # -0.45, -0.4: memorised
ORACLE_FORGET = [[-1, -2, -3, -1, -1], [-1, -1, -1, -1, -1]]  # -2.5, -1.0: like unseen text


def test_min_k_40_takes_int_of_40_percent_of_tokens():
    s = _scores(TARGET_FORGET + HOLDOUT)
    assert s["min_k_40"].tolist() == pytest.approx([-0.45, -0.4, -2.5, -1.75])
    # 4 tokens: int(1.6) = 1 token (MUSE / Min-K% reference code round down); 1 token: at least one
    assert _scores([[-1.0, -4.0, -2.0, -3.0]])["min_k_40"].tolist() == pytest.approx([-4.0])
    assert _scores([[-0.7]])["min_k_40"].tolist() == pytest.approx([-0.7])


def test_muse_auc_is_holdout_positive():
    # forget Min-40% scores -1, -3; holdout -2, -4 (higher = member).
    # MUSE: P(holdout > forget) = pairs (-2>-1 no, -2>-3 yes, -4>-1 no, -4>-3 no) = 1/4
    assert metrics.muse_auc([-1.0, -3.0], [-2.0, -4.0]) == pytest.approx(0.25)
    assert metrics.auc([-1.0, -3.0], [-2.0, -4.0]) == pytest.approx(0.75)  # forget-as-member orientation
    assert metrics.muse_auc([-1.0, -2.0], [-1.0, -2.0]) == pytest.approx(0.5)  # ties count 1/2


def test_privleak_target_is_minus_100_oracle_zero():
    target, oracle = _result(TARGET_FORGET, HOLDOUT), _result(ORACLE_FORGET, HOLDOUT)
    # target: every holdout text scores below every forget text -> MUSE AUC 0
    assert target["privleak_auc"] == 0.0
    # oracle pairs (holdout, forget): (-2.5,-2.5) tie 1/2, (-2.5,-1) 0, (-1.75,-2.5) 1, (-1.75,-1) 0 -> 1.5/4
    assert oracle["privleak_auc"] == pytest.approx(0.375)
    assert compare_to_reference(target, oracle)["privleak"] == pytest.approx(-100.0)
    assert compare_to_reference(oracle, oracle)["privleak"] == 0.0
    # a model equal to the target, evaluated again: same strongly negative value
    again = compare_to_reference(_result(TARGET_FORGET, HOLDOUT), oracle)
    assert again["privleak"] == pytest.approx(-100.0) and headline(again)["privleak"] == pytest.approx(-100.0)
    # over-unlearned: forget Min-40% -3 and -0.4 -> pairs 1, 0, 1, 0 -> AUC 1/2 -> (0.5 - 0.375)/0.375 = +33.3 %
    over = _result([[-3, -3, -1, -1, -1], TARGET_FORGET[1]], HOLDOUT)
    assert over["privleak_auc"] == pytest.approx(0.5)
    assert compare_to_reference(over, oracle)["privleak"] == pytest.approx(100 / 3)


def test_our_auc_gap_is_a_separate_metric_with_the_opposite_sign():
    target, oracle = _result(TARGET_FORGET, HOLDOUT), _result(ORACLE_FORGET, HOLDOUT)
    out = compare_to_reference(target, oracle)
    # Min-K% at k = 0.2: 1 lowest token of 5. Target forget -0.5, -0.6 vs holdout -3, -2 -> AUC 1.
    assert target["mia_auc"]["min_k"] == 1.0
    # oracle forget -3, -1 vs holdout -3, -2: (-3,-3) 1/2, (-3,-2) 0, (-1,-3) 1, (-1,-2) 1 -> 2.5/4
    assert oracle["mia_auc"]["min_k"] == pytest.approx(0.625)
    assert out["mia_auc_gap"]["min_k"] == pytest.approx((1.0 - 0.625) / 0.625 * 100)
    assert out["mia_auc_gap"]["min_k"] > 0 > out["privleak"]
    assert metrics.auc_gap(0.75, 0.5) == pytest.approx(50.0)


def test_min_k_and_min_k_pp_hand_computed_aucs():
    # two tokens per text, k = 0.5 -> the single lowest value; z = (log p - mu) / sigma
    forget_lp, forget_mu, forget_sd = [[-1, -2], [-0.5, -3]], [[-1.5, -1], [-1, -4]], [[0.5, 1], [1, 2]]
    holdout_lp, holdout_mu, holdout_sd = [[-1, -1], [-0.2, -4]], [[-0.5, -2], [-0.2, -3]], [[1, 0.5], [1, 0.5]]
    f = _scores(forget_lp, 0.5, forget_mu, forget_sd)
    h = _scores(holdout_lp, 0.5, holdout_mu, holdout_sd)
    # z: forget [1, -1] -> -1, [0.5, 0.5] -> 0.5; holdout [-0.5, 2] -> -0.5, [0, -2] -> -2
    assert f["min_k_pp"].tolist() == pytest.approx([-1.0, 0.5])
    assert h["min_k_pp"].tolist() == pytest.approx([-0.5, -2.0])
    assert f["min_k"].tolist() == pytest.approx([-2.0, -3.0]) and h["min_k"].tolist() == pytest.approx([-1.0, -4.0])
    aucs = membership_aucs(f, h)
    # Min-K%++: (-1,-0.5) 0, (-1,-2) 1, (0.5,-0.5) 1, (0.5,-2) 1 -> 3/4
    assert aucs["mia_auc"]["min_k_pp"] == pytest.approx(0.75)
    # Min-K%: (-2,-1) 0, (-2,-4) 1, (-3,-1) 0, (-3,-4) 1 -> 1/2; MUSE's Min-40% (1 token of 2) is the same
    # scores, holdout-positive: 1 - 1/2
    assert aucs["mia_auc"]["min_k"] == pytest.approx(0.5)
    assert aucs["privleak_auc"] == pytest.approx(0.5)
    # one text, three tokens, k = 0.4: Min-K% and Min-K%++ take ceil(1.2) = 2 tokens, MUSE int(1.2) = 1
    one = _scores([[-1, -2, -0.5]], 0.4, [[-2, -2.5, -0.25]], [[1, 0.25, 0.5]])  # z = 1, 2, -0.5
    assert one["min_k"].tolist() == pytest.approx([-1.5])
    assert one["min_k_pp"].tolist() == pytest.approx([0.25])
    assert one["min_k_40"].tolist() == pytest.approx([-2.0])


def test_report_names_privleak_and_the_gap_apart():
    target, oracle = _result(TARGET_FORGET, HOLDOUT), _result(ORACLE_FORGET, HOLDOUT)
    target |= compare_to_reference(target, oracle)
    table = report_table({"original": {"result": target}})
    assert "PrivLeak % (MUSE, →0)" in table and "MIA AUC gap % (Min-K%++, →0)" in table
    assert "| original |" in table and "-100.000" in table
    # an eval.json written before this change held a per-attack dict under "privleak": not MUSE's, not shown
    assert headline({"privleak": {"min_k_pp": 12.0}})["privleak"] is None
