"""Metric values on hand-made cases, checked against independent computations."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from dist_unlearn.eval import metrics
from dist_unlearn.eval.generation import rouge_l_recall
from dist_unlearn.eval.mia import lowest_mean, mia_scores, scores_from_token_stats, token_stats_fn, zlib_bytes


def test_truth_ratio_matches_geometric_means():
    # perturbed per-token probs 0.2 and 0.05 (geo-mean 0.1), paraphrase 0.5 -> TR = 0.2
    pert = np.log([[0.2, 0.05]])
    para = np.log([0.5])
    assert metrics.truth_ratio(pert, para) == pytest.approx([0.2])
    assert metrics.truth_ratio_stat(np.array([0.2, 5.0]), forget=True) == pytest.approx(0.2)
    assert metrics.truth_ratio_stat(np.array([0.2, 5.0]), forget=False) == pytest.approx(0.4)


def test_forget_quality_identical_is_one_disjoint_is_near_zero():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 50)
    assert metrics.forget_quality(a, a.copy()) == pytest.approx(1.0)
    disjoint = metrics.forget_quality(a, a + 10.0)
    # exact two-sided KS p-value for D = 1 with n = m = 50: 2 / C(100, 50)
    assert disjoint == pytest.approx(2.0 / math.comb(100, 50), rel=1e-6)
    assert disjoint < 1e-20


def test_harmonic_mean_and_zero():
    assert metrics.harmonic_mean([0.5, 1.0, 0.25]) == pytest.approx(3 / (2 + 1 + 4))
    assert metrics.harmonic_mean([0.9, 0.0]) == 0.0
    with pytest.raises(ValueError):
        metrics.harmonic_mean([-1.0])


def test_auc_perfect_chance_ties_and_bruteforce():
    assert metrics.auc([5, 6, 7], [1, 2, 3]) == 1.0
    assert metrics.auc([1, 2, 3], [5, 6, 7]) == 0.0
    assert metrics.auc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(1)
    m, n = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 20).astype(float)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in m for b in n])
    assert metrics.auc(m, n) == pytest.approx(brute)


def test_privleak():
    assert metrics.privleak(0.75, 0.5) == pytest.approx(50.0)
    assert metrics.privleak(0.5, 0.5) == 0.0


def test_exact_memorization_and_extraction_strength():
    hits = np.array([[0, 1, 1, 1, 1], [0, 1, 0, 1, 0], [0, 1, 1, 0, 0]])
    mask = np.array([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=bool)
    assert metrics.exact_memorization(hits, mask) == pytest.approx([1.0, 0.5, 1.0])
    # row 0: all 4 right -> 1; row 1: last miss is answer token 4 -> 1 - 4/4 = 0; row 2: 2 right -> 1
    assert metrics.extraction_strength(hits, mask) == pytest.approx([1.0, 0.0, 1.0])
    hits2 = np.array([[0, 1, 1, 1]])  # first answer token missed, rest right -> k* = 1 of 4
    assert metrics.extraction_strength(hits2, np.ones((1, 4), bool)) == pytest.approx([0.75])


def test_wilson_upper_bound():
    # closed form with p = 0: z^2 / (n + z^2)
    assert metrics.wilson_upper(0, 100) == pytest.approx(1.96**2 / (100 + 1.96**2))
    assert metrics.wilson_upper(50, 100) == pytest.approx(0.5 + 0.0960, abs=2e-3)


def test_token_stats_min_k_pp_against_direct_formula():
    torch.manual_seed(0)
    logits = torch.randn(6, 11, dtype=torch.float64)
    target = torch.randint(0, 11, (6,))
    out = token_stats_fn(logits, target)
    p = torch.softmax(logits, -1)
    for t in range(6):
        lp = torch.log(p[t])
        mu = float((p[t] * lp).sum())
        sigma = math.sqrt(float((p[t] * (lp - mu) ** 2).sum()))
        assert float(out[t, 0]) == pytest.approx(float(lp[target[t]]), abs=1e-6)
        assert float(out[t, 2]) == pytest.approx(mu, abs=1e-6)
        assert float(out[t, 3]) == pytest.approx(sigma, abs=1e-5)
        assert float(out[t, 1]) == float(int(logits[t].argmax()) == int(target[t]))
    # per-example rows: one sequence with the 6 tokens
    stats, mask = out.float().unsqueeze(0), torch.ones(1, 6, dtype=torch.bool)
    row = scores_from_token_stats(stats, mask, k=0.34)[0]
    lp = out[:, 0]
    assert float(row[0]) == pytest.approx(float(lp.sum()), abs=1e-5)
    assert float(row[3]) == pytest.approx(float(lp.sort().values[:3].mean()), abs=1e-5)  # ceil(0.34*6)=3
    z = (out[:, 0] - out[:, 2]) / out[:, 3]
    assert float(row[4]) == pytest.approx(float(z.sort().values[:3].mean()), abs=1e-4)
    assert lowest_mean(torch.tensor([3.0, 1.0, 2.0]), 0.01) == 1.0


def test_mia_scores_loss_and_zlib():
    # zlib (Carlini et al., 2021): mean token NLL (log-perplexity) / zlib byte length, negated so that
    # higher = member. Row 0: 2 tokens, summed log-prob -4 -> mean -2; row 1: 3 tokens, -9 -> mean -3.
    rows = torch.tensor([[-4.0, 2, 0, -3, -1, 0, -3], [-9.0, 3, 0, -4, -2, 0, -4]], dtype=torch.float64)
    texts = ["aaaa", "a different answer"]
    scores = mia_scores(rows, texts)
    assert scores["loss"].tolist() == [-2.0, -3.0]
    zlen = [len(zlib.compress(t.encode("utf-8"))) for t in texts]
    assert [zlib_bytes(t) for t in texts] == zlen
    assert scores["zlib"].tolist() == pytest.approx([-2.0 / zlen[0], -3.0 / zlen[1]])
    if zlen == [12, 26]:  # CPython's bundled zlib at the default level: the ranking flips vs the old score
        assert scores["zlib"].tolist() == pytest.approx([-1 / 6, -3 / 26])
        assert scores["zlib"][1] > scores["zlib"][0] and -9.0 / 26 < -4.0 / 12  # summed log-prob ranks the other way


def test_rouge_l_recall_values():
    assert rouge_l_recall("born in Quessik", "He was born in Quessik.") == 1.0
    assert rouge_l_recall("born in Quessik", "born in Tavrin") == pytest.approx(2 / 3)
    assert rouge_l_recall("born in Quessik", "") == 0.0
