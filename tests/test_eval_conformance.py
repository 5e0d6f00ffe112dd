"""Published metrics against hand-computed values: MUSE's PrivLeak (orientation, attack, sign), Min-K%,
Min-K%++, our own MIA AUC gap, and TOFU's 9-number model utility, through the functions the suite uses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dist_unlearn.eval import metrics
from dist_unlearn.eval.mia import mia_scores, scores_from_token_stats
from dist_unlearn.eval.report import report_table
from dist_unlearn.eval.suite import compare_to_reference, headline, membership_aucs, utilities


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


def test_option_normalised_probability_hand_computed():
    # q1: per-token probs 0.5 (true) vs 0.25, 0.125, 0.125 -> 0.5 / 1.0; q2: 0.2 vs 0.2 x 3 -> 0.25
    answer = np.log([0.5, 0.2])
    wrong = np.log([[0.25, 0.125, 0.125], [0.2, 0.2, 0.2]])
    assert metrics.option_normalised_prob(answer, wrong) == pytest.approx((0.5 + 0.25) / 2)


def test_tofu_model_utility_is_the_harmonic_mean_of_nine_numbers():
    splits = {
        "retain": {"prob": 0.5, "rouge": 1.0, "truth_ratio": 0.25},
        "real_authors": {"prob": 0.5, "rouge": 0.5, "truth_ratio": 0.5},
        "world_facts": {"prob": 1.0, "rouge": 1.0, "truth_ratio": 0.25},
    }
    out = utilities(splits)
    # 9 / (1/0.5 + 1/1 + 1/0.25 + 1/0.5 + 1/0.5 + 1/0.5 + 1/1 + 1/1 + 1/0.25) = 9 / 19
    assert out["model_utility"] == pytest.approx(9 / 19)
    assert out["retain_utility"] == pytest.approx(3 / (2 + 1 + 4))  # ours: the 3 retain numbers only
    assert out["retain_utility_no_rouge"] == pytest.approx(2 / (2 + 4))
    # without the world-facts set there is no TOFU model utility, only ours
    partial = utilities({k: v for k, v in splits.items() if k != "world_facts"})
    assert "model_utility" not in partial and partial["retain_utility"] == pytest.approx(3 / 7)
    h = headline({"splits": {}, **partial})
    assert h["model_utility"] is None and h["retain_utility"] == pytest.approx(3 / 7)
    # an eval.json from before: its "model_utility" was the 3-number one
    old = headline({"model_utility": 0.4, "model_utility_no_rouge": 0.5})
    assert old["model_utility"] is None and old["retain_utility"] == 0.4


def test_tofu_layout_evaluation_scores_the_nine_numbers(tmp_path):
    """A real tiny model on the TOFU-layout fixture: retain is scored on retain_perturbed, real authors and
    world facts with option-normalised probabilities, and model utility is the harmonic mean of the 9."""
    from test_formats import _write_tofu_layout

    from dist_unlearn.data import QADataset, collate_qa
    from dist_unlearn.data.formats import load_formatted
    from dist_unlearn.eval.suite import EvalSettings, evaluate_model
    from dist_unlearn.models import build_embedded_model
    from dist_unlearn.models.finetune import finetune
    from dist_unlearn.models.logprobs import sequence_stats

    _write_tofu_layout(tmp_path)
    facts = load_formatted(f"tofu:{tmp_path}@forget05")
    corpus = (
        facts.corpus()
        + [
            t
            for name in ("real_authors", "world_facts")
            for it in facts.evaluation_split(name)
            for t in (it.question, it.answer, *it.perturbed_answers)
        ]
        * 50
    )  # repeated so that the tokenizer learns whole words for them (short sequences the model can learn)
    torch.manual_seed(0)
    model, tok = build_embedded_model(corpus, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2)
    # teach it the evaluation answers (and the retain paraphrases), so that the 9 numbers are not 0
    taught = [it for name in ("retain", "real_authors", "world_facts") for it in facts.evaluation_split(name)]
    taught += [dataclasses.replace(it, answer=it.paraphrased_answer) for it in facts.evaluation_split("retain")]
    finetune(model, QADataset(taught, tok, 48), tok.pad_token_id, 120, len(taught), 1e-2, desc="teach")
    settings = EvalSettings(generate=True, sampled_generations=0, max_new_tokens=32, max_length=48)
    out = evaluate_model(model, tok, facts, settings)
    assert out["splits"]["retain"]["count"] == 4  # retain_perturbed, not the 95 trained-on retain questions

    def norm_logprob(texts_items):
        batch = collate_qa(list(QADataset(texts_items, tok, 48)), tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s = sequence_stats(logits.double(), batch["labels"])
        return (s.logprob / s.num_tokens).numpy()

    for name in ("real_authors", "world_facts"):
        (item,) = facts.evaluation_split(name)
        true = float(np.exp(norm_logprob([item])[0]))
        wrong = np.exp(norm_logprob([dataclasses.replace(item, answer=a) for a in item.perturbed_answers]))
        res = out["splits"][name]
        assert res["prob"] == pytest.approx(true / (true + wrong.sum()), rel=1e-4)
        tr = float(np.exp(np.log(wrong).mean()) / true)  # geometric mean of wrong options over the true answer
        assert res["truth_ratio"] == pytest.approx(max(0.0, 1.0 - tr), rel=1e-4, abs=1e-6)
        assert 0.0 <= res["rouge"] <= 1.0
    nine = [
        out["splits"][s][k] for s in ("retain", "real_authors", "world_facts") for k in ("prob", "rouge", "truth_ratio")
    ]
    assert min(nine) > 0, nine
    assert out["model_utility"] == pytest.approx(9 / sum(1 / v for v in nine))
    assert out["retain_utility"] == pytest.approx(3 / sum(1 / v for v in nine[:3]))
