"""Unlearning metrics as pure functions of per-example numbers (arrays in, floats out).

Definitions (TOFU: Maini et al., 2024, arXiv:2401.06121; MUSE: Shi et al., 2024, arXiv:2407.06460):

* **Truth ratio** of one question, with length-normalised log-probs ``ℓ = log π(y|x)/|y|``:
  ``TR = exp(mean_k ℓ(perturbed_k) − ℓ(paraphrased))`` (geometric mean of the perturbed answers'
  per-token probabilities over the paraphrased answer's). Forget split statistic: ``mean min(TR, 1/TR)``;
  other splits: ``mean max(0, 1 − TR)``.
* **Forget quality**: p-value of the two-sample Kolmogorov–Smirnov test between the forget-split TR of
  the unlearned model and of the oracle (retain-only) model (``scipy.stats.ks_2samp``); 1 = same
  distribution, → 0 = clearly different.
* **Model utility** (TOFU, Maini et al., 2024, and its reference code): harmonic mean of 9
  numbers, answer probability, ROUGE-L recall and truth-ratio statistic ``mean max(0, 1 − TR)`` on each
  of the retain (``retain_perturbed``), real-authors and world-facts sets; on the last two the
  probability is normalised over the options, ``p(a)/(p(a) + Σ_k p(a_k))`` with ``p = exp(ℓ)`` the
  per-token probability of the true answer ``a`` and of the perturbed answers ``a_k``
  (:func:`option_normalised_prob`), and the truth ratio uses the true answer in place of a paraphrase.
  0 when any of them is 0.
* **Retain utility** (ours, not TOFU's): harmonic mean of the 3 retain numbers only (retain
  probability, ROUGE-L recall, TR statistic), for benchmarks without real-authors / world-facts sets.
* **AUC** of a membership-inference score (higher = "member"): ``P(s_member > s_nonmember) +
  ½ P(tie)`` (Mann–Whitney U / (n_m·n_n)).
* **PrivLeak** (MUSE, Shi et al., 2024, criterion C3 "no privacy leakage"; reference code
  ``muse_bench``): ``(AUC_unlearned − AUC_retrained) / AUC_retrained · 100`` where each AUC is MUSE's
  ``forget_holdout_Min-40%``: the Min-K% attack with ``k = 0.4`` separating forget from holdout, with
  the *holdout* set as the positive side (:func:`muse_auc`). A model that saw the forget set gives its
  forget texts higher likelihood, so its AUC is near 0 and its PrivLeak near −100; the retrained
  model (never saw the forget set) is 0 by construction. Negative = under-unlearned (forget set still
  looks like training data), positive = over-unlearned.
* **MIA AUC gap** (ours, not MUSE's): ``(AUC − AUC_oracle) / AUC_oracle · 100`` of any attack's AUC
  with the forget set as members (:func:`auc`), e.g. Min-K%++ at ``eval.min_k``; positive =
  under-unlearned. Same form as PrivLeak but another attack and the opposite orientation, so the
  numbers are not comparable with MUSE's.
* **Exact memorisation** (Tirumala et al., 2022, arXiv:2205.10770): fraction of answer tokens the
  argmax prediction gets right under teacher forcing.
* **Extraction strength** (Carlini et al., 2021, arXiv:2012.07805, as used by open-unlearning):
  ``ES = 1 − k*/|y|`` with ``k*`` the shortest answer prefix after which greedy decoding reproduces the
  rest of the answer; with teacher-forced hits ``h_1..h_|y|`` this is ``k* = `` position of the last miss.
* **Leak-rate bound**: Wilson score upper bound ``(p̂ + z²/2n + z·sqrt(p̂(1−p̂)/n + z²/4n²))/(1 + z²/n)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def truth_ratio(perturbed_norm_logprob: np.ndarray, paraphrased_norm_logprob: np.ndarray) -> np.ndarray:
    """Per-question truth ratio.

    Args:
        perturbed_norm_logprob: ``[n, k]`` length-normalised log-probs ``log π(y_k|x)/|y_k|`` of the
            ``k`` perturbed (wrong) answers.
        paraphrased_norm_logprob: ``[n]`` the same for the paraphrased answer.
    Returns:
        ``[n]`` ``TR = exp(mean_k ℓ_k − ℓ_para)``.
    """
    pert = np.asarray(perturbed_norm_logprob, dtype=np.float64)
    para = np.asarray(paraphrased_norm_logprob, dtype=np.float64)
    if pert.ndim != 2 or pert.shape[0] != para.shape[0] or pert.shape[1] == 0:
        raise ValueError(f"truth_ratio needs perturbed [n, k>0] and paraphrased [n]; got {pert.shape}, {para.shape}")
    return np.exp(pert.mean(axis=1) - para)


def truth_ratio_stat(tr: np.ndarray, forget: bool) -> float:
    """TOFU's split statistic: ``mean min(TR, 1/TR)`` on the forget split, ``mean max(0, 1 − TR)`` else."""
    tr = np.asarray(tr, dtype=np.float64)
    if forget:
        return float(np.minimum(tr, 1.0 / tr).mean())
    return float(np.clip(1.0 - tr, 0.0, None).mean())


def forget_quality(tr_unlearned: np.ndarray, tr_oracle: np.ndarray) -> float:
    """KS-test p-value between the forget-split truth ratios of the unlearned and the oracle model."""
    a, b = np.asarray(tr_unlearned, dtype=np.float64), np.asarray(tr_oracle, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs at least one truth ratio from each model")
    from scipy import stats  # here, not at import: scipy.stats costs a second or two of every start-up

    return float(stats.ks_2samp(a, b).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean ``n / Σ 1/v`` of non-negative values; 0 when any value is 0 (model utility)."""
    vals = np.asarray(list(values), dtype=np.float64)
    if vals.size == 0 or (vals < 0).any():
        raise ValueError(f"harmonic_mean needs non-negative values, got {vals.tolist()}")
    if (vals == 0).any():
        return 0.0
    return float(vals.size / (1.0 / vals).sum())


def option_normalised_prob(answer_norm_logprob: np.ndarray, perturbed_norm_logprob: np.ndarray) -> float:
    """TOFU's probability on real authors / world facts: mean over questions of ``p(a)/(p(a) + Σ_k p(a_k))``.

    Args:
        answer_norm_logprob: ``[n]`` length-normalised log-prob ``ℓ = log π(a|x)/|a|`` of the true answer.
        perturbed_norm_logprob: ``[n, k]`` the same for the ``k`` wrong options.
    """
    a = np.asarray(answer_norm_logprob, dtype=np.float64)
    pert = np.asarray(perturbed_norm_logprob, dtype=np.float64)
    if pert.ndim != 2 or pert.shape[0] != a.shape[0] or a.size == 0:
        raise ValueError(f"option_normalised_prob needs answer [n>0] and perturbed [n, k]; got {a.shape}, {pert.shape}")
    true = np.exp(a)
    return float((true / (true + np.exp(pert).sum(axis=1))).mean())


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC AUC of separating members (higher score) from non-members, ties counted ½ (Mann–Whitney)."""
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError("auc needs at least one member and one non-member score")
    from scipy import stats

    ranks = stats.rankdata(np.concatenate([m, n]))  # average ranks for ties
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def muse_auc(forget_scores: np.ndarray, holdout_scores: np.ndarray) -> float:
    """AUC in MUSE's orientation: the holdout set is the positive side.

    MUSE scores each text by ``−mean(lowest 40 % token log-probs)`` and computes
    ``roc_curve(labels, −score)`` with forget labelled 0 and holdout 1 (Shi et al., 2024, reference
    code ``muse_bench``). With scores where higher = "member" (our :mod:`~dist_unlearn.eval.mia`
    convention) this is ``P(s_holdout > s_forget) + ½ P(tie)`` = ``1 − auc(forget, holdout)``: near 0
    for a model trained on the forget set, near 0.5 for one that never saw it.
    """
    return auc(holdout_scores, forget_scores)


def privleak(auc_unlearned: float, auc_retrained: float) -> float:
    """MUSE PrivLeak in percent: ``(AUC_unlearned − AUC_retrained) / AUC_retrained · 100``.

    Both AUCs must be :func:`muse_auc` of MUSE's Min-40% attack on forget vs holdout (Shi et al.,
    2024); then the target model scores near −100 and the retrained model 0.
    """
    if auc_retrained <= 0:
        raise ValueError(f"privleak needs a positive retrained-model AUC, got {auc_retrained}")
    return float((auc_unlearned - auc_retrained) / auc_retrained * 100.0)


def auc_gap(auc_model: float, auc_oracle: float) -> float:
    """Our relative MIA AUC gap in percent, ``(AUC − AUC_oracle) / AUC_oracle · 100``.

    The AUCs are :func:`auc` with the forget set as members (any attack). Not MUSE's PrivLeak (other
    orientation, other attack): a model that saw the forget set scores > 0, the oracle 0.
    """
    if auc_oracle <= 0:
        raise ValueError(f"auc_gap needs a positive oracle AUC, got {auc_oracle}")
    return float((auc_model - auc_oracle) / auc_oracle * 100.0)


def exact_memorization(hits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per example: fraction of scored tokens predicted right by argmax. ``hits``, ``mask``: ``[n, T]``."""
    hits, mask = np.asarray(hits, dtype=np.float64), np.asarray(mask, dtype=bool)
    return (hits * mask).sum(1) / np.maximum(mask.sum(1), 1)


def extraction_strength(hits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per example ``1 − k*/|y|``: ``k*`` = number of answer tokens up to and including the last miss.

    ``hits``, ``mask``: ``[n, T]`` teacher-forced argmax hits and the scored-token mask (scored tokens
    contiguous, as for answers). A fully memorised answer gives 1, a wrong last token gives 0.
    """
    hits, mask = np.asarray(hits, dtype=bool), np.asarray(mask, dtype=bool)
    out = np.zeros(hits.shape[0])
    for i in range(hits.shape[0]):
        h = hits[i][mask[i]]
        if h.size == 0:
            continue
        misses = np.flatnonzero(~h)
        k_star = 0 if misses.size == 0 else int(misses[-1]) + 1
        out[i] = 1.0 - k_star / h.size
    return out


def wilson_upper(successes: int, trials: int, z: float = 1.96) -> float:
    """Upper end of the Wilson score interval for a binomial proportion (95 % for ``z = 1.96``)."""
    if trials <= 0:
        return 1.0
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return float(min(1.0, (centre + spread) / denom))
