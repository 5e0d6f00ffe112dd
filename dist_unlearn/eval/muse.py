"""MUSE's memorisation metrics (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language
Models", arXiv:2407.06460; reference code ``muse_bench``: ``eval.py`` and ``metrics/{verbmem,knowmem}.py``).

* **VerbMem** (criterion C1, no verbatim memorisation), on the forget set:
  ``VerbMem = 100 · mean_x ROUGE-L-F1(x[l+1:], f(x[:l]))``: the model greedily continues the first ``l``
  tokens of each forget excerpt for ``128`` new tokens (``verbmem_max_new_tokens = 128`` in MUSE's code)
  and the continuation is scored against the true one, cut to its first 128 tokens (MUSE counts its
  ``[bos]`` among them: :func:`verbmem_examples_from_pairs`). MUSE ships the
  excerpts as ``verbmem/forget`` (``prompt``, ``gt``), used as given; without that file the excerpts are
  built from the raw forget texts: consecutive pieces of ``l + 128`` tokens, prompt = the first
  ``l = 32`` tokens (the prompt length stated for MUSE in our brief; MUSE's code takes the prompt from
  its files, so ``l`` could not be checked against the code).
* **KnowMem** (C2 on the forget set, C4 utility preservation on the retain set):
  ``KnowMem = 100 · mean_(q,a) ROUGE-L-F1(a, f(icl + "Question: q\\nAnswer: "))``: a greedy answer of at
  most 32 new tokens (``knowmem_max_new_tokens = 32``) to MUSE's few-shot prompt, the in-context
  examples ``icl`` being ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per ``*_qa_icl`` pair (zero-shot when the
  directory has none), the answer cut before the first ``"\\n\\n"``, ``"\\nQuestion"`` or
  ``"Question:"``.

ROUGE-L is the F1 of the ``rouge-score`` package without stemming for *both* metrics: MUSE's logger
aggregates ``mean_rougeL`` = the mean of ``score['rougeL'].fmeasure`` and ``eval.py`` reports that key
(×100) for VerbMem and KnowMem alike (open-unlearning's MUSE port scores KnowMem by ROUGE-L recall
instead; that is not what MUSE's own code reports). PrivLeak is in :mod:`dist_unlearn.eval.metrics`
(:func:`~dist_unlearn.eval.metrics.privleak`; the suite scores it on ``privleak/forget`` vs
``privleak/holdout`` when present, else on the raw forget vs holdout texts).

Generation is :func:`~dist_unlearn.eval.generation.generate_token_ids` (one prompt at a time, greedy,
sharded over ranks: collective). Prompts start with ``[bos]`` when the tokenizer has one (MUSE encodes
with ``add_special_tokens=True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dist_unlearn.data.facts import QAItem
from dist_unlearn.data.qa import prefix_ids
from dist_unlearn.eval.generation import generate_token_ids, rouge_l_f1

VERBMEM_PROMPT_TOKENS = 32
"""``l``: prompt tokens of a VerbMem excerpt built from raw text (MUSE's files carry their own prompts)."""
VERBMEM_MAX_NEW_TOKENS = 128
"""MUSE's ``verbmem_max_new_tokens``: generated tokens, and the true continuation's length in tokens."""
KNOWMEM_MAX_NEW_TOKENS = 32
"""MUSE's ``knowmem_max_new_tokens``."""
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")
"""The answer is cut before each of these in turn (MUSE's ``get_prefix_before_words_occur``)."""


def verbmem_score(references: Sequence[str], continuations: Sequence[str]) -> float:
    """VerbMem from texts: ``100 · mean ROUGE-L-F1(reference_i, continuation_i)`` (0 for no excerpt)."""
    if len(references) != len(continuations):
        raise ValueError(f"{len(references)} references but {len(continuations)} continuations")
    scores = [rouge_l_f1(ref, out) for ref, out in zip(references, continuations, strict=True)]
    return 100.0 * sum(scores) / max(1, len(scores))


def knowmem_answer(generation: str) -> str:
    """The answer part of a KnowMem generation: cut before ``"\\n\\n"``, ``"\\nQuestion"``, ``"Question:"``."""
    for stop in KNOWMEM_STOPS:
        generation = generation.split(stop)[0]
    return generation


def knowmem_score(answers: Sequence[str], generations: Sequence[str]) -> float:
    """KnowMem from texts: ``100 · mean ROUGE-L-F1(answer_i, knowmem_answer(generation_i))``."""
    if len(answers) != len(generations):
        raise ValueError(f"{len(answers)} answers but {len(generations)} generations")
    scores = [rouge_l_f1(a, knowmem_answer(g)) for a, g in zip(answers, generations, strict=True)]
    return 100.0 * sum(scores) / max(1, len(scores))


def knowmem_prompt(question: str, icl: Sequence[QAItem] = ()) -> str:
    """MUSE's few-shot prompt: ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per example, then the question."""
    shots = "".join(f"Question: {item.question}\nAnswer: {item.answer}\n\n" for item in icl)
    return shots + f"Question: {question}\nAnswer: "


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def verbmem_examples_from_texts(
    tokenizer: Any,
    texts: Sequence[str],
    prompt_tokens: int = VERBMEM_PROMPT_TOKENS,
    continuation_tokens: int = VERBMEM_MAX_NEW_TOKENS,
) -> list[tuple[list[int], str]]:
    """VerbMem excerpts of raw texts: ``(prompt ids, true continuation)`` pairs.

    Each text's tokens are cut into consecutive pieces of ``prompt_tokens + continuation_tokens`` (the
    last may be shorter but needs at least one continuation token); the prompt is ``[bos]`` (if any) and
    the first ``prompt_tokens`` tokens, the continuation the decoded rest.
    """
    out = []
    size = prompt_tokens + continuation_tokens
    for text in texts:
        ids = _ids(tokenizer, text)
        for start in range(0, len(ids), size):
            piece = ids[start : start + size]
            if len(piece) > prompt_tokens:
                prompt = [*prefix_ids(tokenizer), *piece[:prompt_tokens]]
                out.append((prompt, tokenizer.decode(piece[prompt_tokens:], skip_special_tokens=True)))
    return out


def verbmem_examples_from_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS
) -> list[tuple[list[int], str]]:
    """VerbMem excerpts from MUSE's ``verbmem/forget`` ``(prompt, gt)`` records: the prompt encoded after
    ``[bos]``, the true continuation cut as MUSE's ``gt_short``: ``gt`` encoded *with* ``[bos]``, cut to
    ``max_new_tokens`` ids, decoded without special tokens (so ``max_new_tokens − 1`` text tokens for a
    tokenizer with a BOS token, e.g. LLaMA's 127)."""
    prefix = prefix_ids(tokenizer)
    return [
        (
            [*prefix, *_ids(tokenizer, prompt)],
            tokenizer.decode(_ids(tokenizer, gt)[: max_new_tokens - len(prefix)], skip_special_tokens=True),
        )
        for prompt, gt in pairs
    ]


def _greedy_texts(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int, device: Any
) -> list[str]:
    ids = generate_token_ids(model, tokenizer, [], max_new_tokens, device=device, prompt_ids=prompts)
    return [tokenizer.decode([t for t in row.long().tolist() if t >= 0], skip_special_tokens=True) for row in ids]


def verbmem(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[tuple[list[int], str]],
    max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """VerbMem of ``model`` on ``examples`` (``(prompt ids, true continuation)``). Collective.

    Returns ``value`` (VerbMem, 0-100), ``count``, ``rouge_l_f1`` (per excerpt, 0-1) and ``continuations``.
    """
    continuations = _greedy_texts(model, tokenizer, [p for p, _ in examples], max_new_tokens, device)
    refs = [gt for _, gt in examples]
    return {
        "value": verbmem_score(refs, continuations),
        "count": len(examples),
        "rouge_l_f1": [rouge_l_f1(r, c) for r, c in zip(refs, continuations, strict=True)],
        "continuations": continuations,
    }


def knowmem(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[QAItem],
    icl: Sequence[QAItem] = (),
    max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """KnowMem of ``model`` on QA ``items`` with few-shot examples ``icl``. Collective.

    Returns ``value`` (KnowMem, 0-100), ``count``, ``rouge_l_f1`` (per question) and ``answers`` (cut).
    """
    prompts = [[*prefix_ids(tokenizer), *_ids(tokenizer, knowmem_prompt(it.question, icl))] for it in items]
    answers = [knowmem_answer(g) for g in _greedy_texts(model, tokenizer, prompts, max_new_tokens, device)]
    return {
        "value": knowmem_score([it.answer for it in items], answers),
        "count": len(items),
        "rouge_l_f1": [rouge_l_f1(it.answer, a) for it, a in zip(items, answers, strict=True)],
        "answers": answers,
    }


def muse_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    facts: Any,
    max_examples: int = 0,
    knowmem_sets: Sequence[str] = ("forget", "retain"),
    verbmem_prompt_tokens: int = VERBMEM_PROMPT_TOKENS,
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """VerbMem on the forget set and KnowMem on ``knowmem_sets`` of a
    :class:`~dist_unlearn.data.formats.MuseBenchmark`. Collective.

    Returns ``verbmem_forget`` and ``knowmem_<set>`` (0-100, only where the benchmark has the data) and
    ``muse`` (per-metric details: counts, per-example ROUGE-L F1 and texts). ``max_examples`` (0 = all)
    keeps the first excerpts / questions.
    """
    limit = max_examples or None
    pairs = facts.verbmem_pairs()
    if pairs:
        examples = verbmem_examples_from_pairs(tokenizer, pairs[:limit], verbmem_max_new_tokens)
    else:
        texts = [item.answer for item in facts.split("forget")]
        examples = verbmem_examples_from_texts(tokenizer, texts, verbmem_prompt_tokens, verbmem_max_new_tokens)
        examples = examples[:limit]
    out: dict[str, Any] = {"muse": {}}
    if examples:
        res = verbmem(model, tokenizer, examples, verbmem_max_new_tokens, device)
        out["verbmem_forget"], out["muse"]["verbmem_forget"] = res["value"], res
    for name in knowmem_sets:
        items, icl = facts.knowmem_set(name)
        if items:
            res = knowmem(model, tokenizer, items[:limit], icl, knowmem_max_new_tokens, device)
            out[f"knowmem_{name}"], out["muse"][f"knowmem_{name}"] = res["value"], res
    return out
