"""One evaluation suite for every caller: ``dist-unlearn eval``, the end of ``dist-unlearn run`` (and its
periodic evaluations) and ``dist-unlearn bench unlearning``.

:func:`evaluate_model` scores the forget, retain and holdout splits of a QA benchmark with a model (plain
module, PEFT model or DeepSpeed engine; collective: every rank calls it, each scores its slice):

* per split: answer probability ``exp(log π(y|x)/|y|)`` (mean), exact memorisation, extraction strength,
  truth-ratio statistic, and with generation greedy ROUGE-L recall and greedy leak rate;
* forget split with ``sampled_generations = N``: leak rate over ``N`` sampled answers per question with
  its Wilson 95 % upper bound, next to the greedy leak rate;
* membership inference, forget (members) vs holdout (non-members): AUC of LOSS, zlib, Min-K%, Min-K%++
  (``mia_auc``), and MUSE's Min-40% AUC in MUSE's orientation (``privleak_auc``, holdout positive);
* ``model_utility`` = TOFU's (Maini et al., 2024): harmonic mean of 9 numbers, probability, ROUGE-L and
  TR statistic on each of retain, real authors and world facts (only when the benchmark has the last two
  sets, as a TOFU directory does; on those the probability is normalised over the answer options);
  ``retain_utility`` = ours: harmonic mean of retain probability, retain ROUGE-L recall and retain TR
  statistic (without generation: of probability and TR statistic, ``retain_utility_no_rouge``);
* with a ``reference`` (the oracle's / retrained model's own :func:`evaluate_model` result): forget
  quality (KS p-value of the forget truth ratios), ``privleak`` = MUSE's PrivLeak (Shi et al., 2024:
  relative change of the Min-40% ``privleak_auc``; target ≈ −100, retrained model 0), and
  ``mia_auc_gap`` = our relative gap of each attack's ``mia_auc`` (headline: Min-K%++ at
  ``eval.min_k``; positive = under-unlearned), which is not MUSE's PrivLeak;
* MUSE (a :class:`~dist_unlearn.data.formats.MuseBenchmark`, ``data.source=muse:DIR``): the splits are raw
  texts (scored per token window: probability, memorisation, the attacks; no QA generation), PrivLeak's
  Min-40% AUC is on MUSE's ``privleak`` forget vs holdout texts, and with generation
  ``verbmem_forget``, ``knowmem_forget`` and ``knowmem_retain`` (MUSE's VerbMem / KnowMem, 0-100,
  ROUGE-L F1; :mod:`dist_unlearn.eval.muse`).

Formulas: :mod:`dist_unlearn.eval.metrics`, :mod:`dist_unlearn.eval.mia`, :mod:`dist_unlearn.eval.generation`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_unlearn.config.schema import SHARD_WEIGHTS_AUTO_BYTES
from dist_unlearn.data.facts import FactsBenchmark, QAItem
from dist_unlearn.data.formats import MuseBenchmark
from dist_unlearn.data.qa import IGNORE_INDEX, QADataset
from dist_unlearn.eval import metrics
from dist_unlearn.eval.answers import score_dataset
from dist_unlearn.eval.generation import generation_metrics
from dist_unlearn.eval.mia import mia_scores, score_answers
from dist_unlearn.eval.muse import KNOWMEM_MAX_NEW_TOKENS, VERBMEM_MAX_NEW_TOKENS, VERBMEM_PROMPT_TOKENS, muse_metrics

SPLITS = ("forget", "retain", "holdout")
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")
HEADLINE_MIA = "min_k_pp"
"""Attack of the headline ``mia_auc`` / ``mia_auc_gap`` (ours). MUSE's PrivLeak always uses Min-40%."""
PRIVLEAK_ATTACK = "min_k_40"
TOFU_OPTION_SETS = ("real_authors", "world_facts")
"""TOFU's evaluation sets beside retain that enter its model utility (scored when the benchmark has them)."""
UTILITY_NUMBERS = ("prob", "rouge", "truth_ratio")
"""MUSE's PrivLeak attack: Min-K% with k = 0.4 (:data:`dist_unlearn.eval.mia.MUSE_MIN_K`)."""


@dataclass(frozen=True)
class EvalSettings:
    """What :func:`evaluate_model` computes (the ``eval`` config section, see its field docs)."""

    max_examples: int = 0
    generate: bool = True
    sampled_generations: int = 8
    max_new_tokens: int = 16
    leak_rouge: float = 1.0
    min_k: float = 0.2
    max_length: int = 64
    seed: int = 0
    batch_size: int = 32
    splits: tuple[str, ...] = SPLITS
    """Splits to score (attacked models: forget and holdout only)."""
    verbmem_prompt_tokens: int = VERBMEM_PROMPT_TOKENS
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS
    knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS
    """MUSE's lengths (:mod:`dist_unlearn.eval.muse`); used only on a MUSE benchmark."""
    dtype: str = "fp32"
    """dtype the evaluated models are loaded in (:func:`load_for_eval`; a run's ``model.dtype``)."""
    shard_weights: str = "auto"
    """With several ranks, load them ZeRO-3-partitioned: ``true``, ``false`` or ``auto`` (by size,
    :func:`partitions`; ``eval.shard_weights``)."""


def settings_from_config(cfg: Any, **changes: Any) -> EvalSettings:
    """:class:`EvalSettings` from a run config (``eval``, ``data.max_length``, ``train.seed``, ``model.dtype``)."""
    e = cfg.eval
    settings = EvalSettings(
        max_examples=e.max_examples,
        generate=e.generate,
        sampled_generations=e.sampled_generations,
        max_new_tokens=e.max_new_tokens,
        leak_rouge=e.leak_rouge,
        min_k=e.min_k,
        max_length=cfg.data.max_length,
        seed=cfg.train.seed,
        dtype=cfg.model.dtype,
        shard_weights=e.shard_weights,
    )
    return dataclasses.replace(settings, **changes)


def partitions(path: str, mode: str) -> bool:
    """Whether ``eval.shard_weights=mode`` partitions the model at ``path``: ``true``/``false`` as said;
    ``auto`` when its weight files (``*.safetensors``, ``*.bin``) hold at least
    :data:`~dist_unlearn.config.schema.SHARD_WEIGHTS_AUTO_BYTES`, or when ``path`` is not a local directory
    (a hub name: its size is not known before it loads)."""
    if mode != "auto":
        return mode == "true"
    directory = Path(path)
    if not directory.is_dir():
        return True
    size = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in directory.glob(pattern))
    return size >= SHARD_WEIGHTS_AUTO_BYTES


def load_for_eval(path: str, settings: EvalSettings, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A saved causal LM ready to score: in ``settings.dtype``, eager attention, ZeRO-3-partitioned over the
    ranks when there are several and ``settings.shard_weights`` says so (:func:`partitions`;
    :func:`dist_unlearn.models.inference.load_inference_model`). Collective when partitioned (every rank
    decides alike: the same files)."""
    from dist_unlearn.models.inference import load_inference_model

    return load_inference_model(path, settings.dtype, partitions(path, settings.shard_weights), "eager", device)


def _perturbed_items(items: Sequence[QAItem]) -> tuple[list[QAItem], int]:
    """Items whose answer is each perturbed answer in turn (``k`` per question, ``k`` = the smallest count)."""
    k = min((len(item.perturbed_answers) for item in items), default=0)
    flat = [dataclasses.replace(item, answer=p) for item in items for p in item.perturbed_answers[:k]]
    return flat, k


def _norm_logprob(scores: torch.Tensor) -> np.ndarray:
    return (scores[:, 0] / scores[:, 1].clamp(min=1)).numpy().astype(np.float64)


def truth_ratios(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[QAItem], settings: EvalSettings, device: Any
) -> np.ndarray | None:
    """Per-question truth ratio of ``items`` (``None`` when they carry no perturbed answers)."""
    flat, k = _perturbed_items(items)
    if k == 0:
        return None
    pad = tokenizer.pad_token_id
    para = QADataset(items, tokenizer, settings.max_length, answer_field="paraphrased_answer")
    para_lp = _norm_logprob(score_dataset(model, para, pad, settings.batch_size, device))
    pert_lp = _norm_logprob(
        score_dataset(model, QADataset(flat, tokenizer, settings.max_length), pad, settings.batch_size, device)
    )
    return metrics.truth_ratio(pert_lp.reshape(len(items), k), para_lp)


def option_set_metrics(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[QAItem], settings: EvalSettings, device: Any
) -> dict[str, Any] | None:
    """TOFU's three numbers on a real-authors / world-facts set (``None`` without wrong options).

    ``prob``: :func:`~dist_unlearn.eval.metrics.option_normalised_prob` of the true answer against the
    perturbed ones; ``truth_ratio``: ``mean max(0, 1 − TR)`` with the true answer as the base (TOFU has
    no paraphrases for these sets); ``rouge``: greedy ROUGE-L recall (with generation). Collective.
    """
    flat, k = _perturbed_items(items)
    if k == 0:
        return None
    pad = tokenizer.pad_token_id
    answer = QADataset(items, tokenizer, settings.max_length)
    answer_lp = _norm_logprob(score_dataset(model, answer, pad, settings.batch_size, device))
    pert_lp = _norm_logprob(
        score_dataset(model, QADataset(flat, tokenizer, settings.max_length), pad, settings.batch_size, device)
    ).reshape(len(items), k)
    res: dict[str, Any] = {
        "count": len(items),
        "prob": metrics.option_normalised_prob(answer_lp, pert_lp),
        "truth_ratio": metrics.truth_ratio_stat(metrics.truth_ratio(pert_lp, answer_lp), forget=False),
    }
    if settings.generate:
        gen = generation_metrics(
            model, tokenizer, items, settings.max_new_tokens, 0, settings.leak_rouge, settings.seed, device
        )
        res["rouge"] = gen["rouge"]
    return res


def utilities(splits: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``retain_utility`` (ours: harmonic mean of retain prob, ROUGE-L, TR statistic; without ROUGE-L
    ``retain_utility_no_rouge``) and, when the retain, real-authors and world-facts sets all carry the
    three numbers, TOFU's 9-number ``model_utility`` (see :mod:`dist_unlearn.eval.metrics`)."""
    out: dict[str, float] = {}
    retain = splits.get("retain", {})
    if "truth_ratio" not in retain:
        return out
    if "rouge" in retain:
        out["retain_utility"] = metrics.harmonic_mean([retain["prob"], retain["rouge"], retain["truth_ratio"]])
    out["retain_utility_no_rouge"] = metrics.harmonic_mean([retain["prob"], retain["truth_ratio"]])
    sets = [retain, *(splits.get(name, {}) for name in TOFU_OPTION_SETS)]
    if all(key in s for s in sets for key in UTILITY_NUMBERS):
        out["model_utility"] = metrics.harmonic_mean([s[key] for s in sets for key in UTILITY_NUMBERS])
    return out


def split_items(facts: FactsBenchmark, split: str, max_examples: int = 0) -> list[QAItem]:
    """The first ``max_examples`` (0 = all) items that evaluation scores for ``split``.

    A benchmark with separate evaluation sets (:class:`~dist_unlearn.data.formats.TofuBenchmark`: TOFU's
    ``retain_perturbed`` for ``retain``, while the retain term trains on ``retainN``) gives them through
    ``evaluation_split``; otherwise the training split is scored (``[]`` for a set it does not have).
    """
    if hasattr(facts, "evaluation_split"):
        items = facts.evaluation_split(split)
    elif split in SPLITS:
        items = facts.split(split)
    else:  # a plain benchmark has only its training splits (no real-authors / world-facts sets)
        items = []
    return items[:max_examples] if max_examples else items


def _scored_texts(dataset: QADataset, tokenizer: Any) -> list[str]:
    """The text each row of ``dataset`` scores: the answer of a QA item, the window's text of a raw item."""
    return [
        item.answer if item.question else tokenizer.decode([t for t in dataset[i]["labels"] if t != IGNORE_INDEX])
        for i, item in enumerate(dataset.items)
    ]


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    facts: FactsBenchmark,
    settings: EvalSettings,
    reference: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The whole suite (see module docstring). Collective over the process group.

    Returns a JSON-ready dict: ``splits`` (per-split numbers; ``real_authors`` / ``world_facts`` when the
    benchmark has them), ``mia_auc``, ``privleak_auc``, ``retain_utility``, ``model_utility`` (TOFU's,
    only with real-authors and world-facts sets), optional ``forget_quality`` / ``privleak`` /
    ``mia_auc_gap`` (with ``reference``), and ``per_example`` (forget truth ratios needed when this
    result is itself used as a reference).
    """
    pad = tokenizer.pad_token_id
    out: dict[str, Any] = {"splits": {}, "per_example": {}}
    mia: dict[str, dict[str, torch.Tensor]] = {}
    for split in settings.splits:
        items = split_items(facts, split, settings.max_examples)
        if not items:
            continue
        dataset = QADataset(items, tokenizer, settings.max_length)  # raw text (MUSE): one row per token window
        rows = score_answers(model, dataset, pad, settings.min_k, settings.batch_size, device)
        num_tokens = rows[:, 1].clamp(min=1)
        res: dict[str, Any] = {
            "count": len(items),
            "prob": float((rows[:, 0] / num_tokens).exp().mean()),
            "exact_memorization": float((rows[:, 2] / num_tokens).mean()),
            "extraction_strength": float(rows[:, 5].mean()),
        }
        mia[split] = mia_scores(rows, _scored_texts(dataset, tokenizer))
        tr = truth_ratios(model, tokenizer, items, settings, device)
        if tr is not None:
            res["truth_ratio"] = metrics.truth_ratio_stat(tr, forget=split == "forget")
            if split == "forget":
                out["per_example"]["forget_truth_ratio"] = tr.tolist()
        if settings.generate and any(item.question for item in items):  # raw text (MUSE) has no question
            samples = settings.sampled_generations if split == "forget" else 0
            gen = generation_metrics(
                model, tokenizer, items, settings.max_new_tokens, samples, settings.leak_rouge, settings.seed, device
            )
            res["rouge"], res["greedy_leak"] = gen["rouge"], gen["greedy_leak"]
            if samples:
                res["sampled_leak"] = gen["sampled_leak"]
                res["sampled_leak_upper95"] = metrics.wilson_upper(gen["sampled_leaks"], gen["sampled_total"])
                res["sampled_any_leak"] = gen["sampled_any_leak"]
                res["samples_per_question"] = samples
            out["per_example"][f"{split}_greedy_text"] = gen["greedy_text"]
        out["splits"][split] = res

    if "forget" in mia and "holdout" in mia:
        out.update(membership_aucs(mia["forget"], mia["holdout"]))
    if "retain" in settings.splits:  # TOFU's real-authors / world-facts sets, when the benchmark has them
        for name in TOFU_OPTION_SETS:
            items = split_items(facts, name, settings.max_examples)
            res = option_set_metrics(model, tokenizer, items, settings, device) if items else None
            if res is not None:
                out["splits"][name] = res
    out.update(utilities(out["splits"]))
    if isinstance(facts, MuseBenchmark) and settings.generate:  # VerbMem, KnowMem (MUSE)
        muse = muse_metrics(
            model,
            tokenizer,
            facts,
            settings.max_examples,
            tuple(name for name in ("forget", "retain") if name in settings.splits),
            settings.verbmem_prompt_tokens,
            settings.verbmem_max_new_tokens,
            settings.knowmem_max_new_tokens,
            device,
        )
        out["per_example"]["muse"] = muse.pop("muse")
        out.update(muse)
    if reference is not None:
        out.update(compare_to_reference(out, reference))
    return out


def membership_aucs(forget: dict[str, torch.Tensor], holdout: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``mia_auc`` (each attack of :data:`MIA_ATTACKS`, forget = members) and ``privleak_auc`` (MUSE's
    Min-40% AUC with holdout as the positive side) from :func:`~dist_unlearn.eval.mia.mia_scores` of the
    forget and holdout splits."""
    return {
        "mia_auc": {name: metrics.auc(forget[name].numpy(), holdout[name].numpy()) for name in MIA_ATTACKS},
        "privleak_auc": metrics.muse_auc(forget[PRIVLEAK_ATTACK].numpy(), holdout[PRIVLEAK_ATTACK].numpy()),
    }


def compare_to_reference(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Forget quality, MUSE PrivLeak and our MIA AUC gaps of ``result`` against the oracle's ``reference``.

    A reference AUC of 0 leaves the corresponding number out (the relative change is undefined).
    """
    out: dict[str, Any] = {}
    mine, theirs = result["per_example"].get("forget_truth_ratio"), reference["per_example"].get("forget_truth_ratio")
    if mine is not None and theirs is not None:
        out["forget_quality"] = metrics.forget_quality(np.asarray(mine), np.asarray(theirs))
    if "privleak_auc" in result and reference.get("privleak_auc", 0) > 0:
        out["privleak"] = metrics.privleak(result["privleak_auc"], reference["privleak_auc"])
    if "mia_auc" in result and "mia_auc" in reference:
        out["mia_auc_gap"] = {
            name: metrics.auc_gap(result["mia_auc"][name], reference["mia_auc"][name])
            for name in MIA_ATTACKS
            if reference["mia_auc"][name] > 0
        }
    return out


MUSE_HEADLINE = ("verbmem_forget", "knowmem_forget", "knowmem_retain")
"""MUSE's VerbMem / KnowMem numbers in a result (only on a MUSE benchmark, with generation)."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The report's numbers of one result: forget quality, model utility, ROUGE, MIA AUC, PrivLeak (MUSE's)
    and our Min-K%++ AUC gap."""
    splits = result.get("splits", {})
    tofu_utility, retain_utility = result.get("model_utility"), result.get("retain_utility")
    if "model_utility_no_rouge" in result:  # eval.json before TOFU's 9-number utility: that was ours
        tofu_utility, retain_utility = None, result.get("model_utility", result["model_utility_no_rouge"])
    return {
        "forget_quality": result.get("forget_quality"),
        "model_utility": tofu_utility,
        "retain_utility": retain_utility if retain_utility is not None else result.get("retain_utility_no_rouge"),
        "forget_prob": splits.get("forget", {}).get("prob"),
        "forget_rouge": splits.get("forget", {}).get("rouge"),
        "retain_rouge": splits.get("retain", {}).get("rouge"),
        "mia_auc": result.get("mia_auc", {}).get(HEADLINE_MIA),
        "privleak": _number(result.get("privleak")),  # eval.json files before MUSE's PrivLeak held a dict
        "mia_auc_gap": result.get("mia_auc_gap", {}).get(HEADLINE_MIA),
        "sampled_leak": splits.get("forget", {}).get("sampled_leak"),
        "greedy_leak": splits.get("forget", {}).get("greedy_leak"),
        **{key: _number(result.get(key)) for key in MUSE_HEADLINE},
    }


BEST_METRIC_FALLBACK = "neg_forget_prob"
"""The ``eval.best_metric`` used when the requested one has no value in a run's evaluations: −forget
probability exists in every evaluation (the forget split is always scored)."""

BEST_METRIC_NEEDS = {
    "forget_quality": "an oracle (a model trained without the forget set) and perturbed answers on the forget split",
    "privleak_abs": "an oracle (a model trained without the forget set) and a holdout split",
    "model_utility": "perturbed answers on the retain split (truth ratio)",
    "neg_forget_prob": "nothing beyond the forget split",
}
"""What each ``eval.best_metric`` needs to have a value."""


def best_score(result: dict[str, Any], metric: str) -> float:
    """The value (higher = better) of ``eval.best_metric`` in a result; ``-inf`` when it is missing.

    ``model_utility`` is TOFU's 9-number utility when the benchmark has its sets, else our retain utility
    (the only utility there is)."""
    h = headline(result)
    value = {
        "forget_quality": h["forget_quality"],
        "model_utility": h["model_utility"] if h["model_utility"] is not None else h["retain_utility"],
        "privleak_abs": None if h["privleak"] is None else -abs(h["privleak"]),
        "neg_forget_prob": None if h["forget_prob"] is None else -h["forget_prob"],
    }[metric]
    return float("-inf") if value is None else float(value)


def evaluate_directory(
    cfg: Any,
    model_dir: str,
    oracle_dir: str | None,
    facts: FactsBenchmark,
    device: torch.device | str = "cpu",
    oracle_result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the saved model ``model_dir`` (and the attacks of ``eval.attacks`` on it). Collective.

    The oracle (when given) is evaluated without generation first and serves as the reference of
    forget quality and PrivLeak for the model and for every attacked copy. Returns the content of
    ``eval.json``: ``model_dir``, ``result``, ``attacks`` (name → result) and ``oracle`` (its result).

    The scored model is :func:`~dist_unlearn.models.combined.load_scoring_model` of ``model_dir``: the saved
    model, or the model its ``inference.json`` describes (ULD: target − α·assistant, not the assistant).
    It and the oracle load through :func:`load_for_eval` (``model.dtype``, partitioned over the ranks).
    """
    from dist_unlearn.eval.attacks import attacked_model
    from dist_unlearn.models.combined import load_scoring_model
    from dist_unlearn.models.loading import tokenizer_for_config

    settings = settings_from_config(cfg)
    tokenizer = tokenizer_for_config(model_dir, cfg.data)

    def load(path: str) -> torch.nn.Module:
        return load_for_eval(path, settings, device)

    if oracle_result is None and oracle_dir is not None:
        oracle = load(oracle_dir)
        oracle_result = evaluate_model(
            oracle, tokenizer, facts, dataclasses.replace(settings, generate=False), device=device
        )
        del oracle
    model = load_scoring_model(model_dir, load)  # the saved model, or what its inference.json says (ULD: combined)
    out: dict[str, Any] = {
        "model_dir": str(model_dir),
        "result": evaluate_model(model, tokenizer, facts, settings, oracle_result, device),
        "attacks": {},
        "oracle": oracle_result,
    }
    del model
    attack_settings = dataclasses.replace(settings, sampled_generations=0, splits=("forget", "holdout"))
    for name in cfg.eval.attacks:
        attacked = attacked_model(name, model_dir, tokenizer, facts, cfg, partitions(model_dir, settings.shard_weights))
        out["attacks"][name] = evaluate_model(attacked, tokenizer, facts, attack_settings, oracle_result, device)
        del attacked
    return out
