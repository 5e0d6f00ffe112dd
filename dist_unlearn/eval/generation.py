"""Greedy and sampled answers to QA prompts, generated sharded over ranks, scored by ROUGE-L recall.

The prompt is exactly the training prefix (:func:`dist_unlearn.data.qa.prompt_ids`: ``[bos] +
PROMPT_TEMPLATE`` in the plain format, the chat template's user turn and generation prompt in the chat
format).
Each question is generated on its own (no padding, so the text does not depend on how questions are
batched or sharded), with ``model.generate`` of the plain ``transformers`` model. A model whose weights
are ZeRO-3-partitioned over several ranks (:func:`dist_unlearn.models.inference.load_inference_model`)
generates with ``synced_gpus``: its forwards are collective, so a rank whose answer has ended keeps
running forwards until every rank's has, and every rank generates for the same number of questions
(:func:`~dist_unlearn.distributed.sharded.sharded_map` pads the shares).

Sampling for question ``i`` is seeded with ``derive_seed(seed, "sample", i)``, so the samples are the
same on any number of ranks. ROUGE-L recall is ``LCS(answer, generation)/|answer|`` over the
``rouge-score`` package's tokens (Lin, 2004). A generation *leaks* when its recall is ≥ ``leak_rouge``
(default 1: the whole answer appears in order).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from dist_unlearn.data.facts import QAItem
from dist_unlearn.data.qa import prompt_ids as qa_prompt_ids
from dist_unlearn.distributed.seeding import derive_seed
from dist_unlearn.distributed.sharded import sharded_map
from dist_unlearn.eval.modes import eval_mode
from dist_unlearn.models.chunked_lm import unwrap_model
from dist_unlearn.models.inference import generation_sync


@functools.cache
def _scorer() -> Any:
    """The ROUGE-L scorer, made on first use (``rouge_score`` imports nltk: seconds of start-up that a
    process which never scores, such as a Ray driver, need not pay)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_recall(reference: str, prediction: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (``rouge-score``)."""
    return float(_scorer().score(reference, prediction)["rougeL"].recall)


def rouge_l_f1(reference: str, prediction: str) -> float:
    """ROUGE-L F1 ``2PR/(P+R)`` with ``P = LCS/|prediction|``, ``R = LCS/|reference|`` (``rouge-score``
    tokens, no stemming; Lin, 2004); MUSE's VerbMem / KnowMem score."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


@torch.no_grad()
def generate_token_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    max_new_tokens: int = 16,
    num_samples: int = 0,
    seed: int = 0,
    temperature: float = 1.0,
    device: torch.device | str = "cpu",
    prompt_ids: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """New token ids per question, sharded over ranks (collective), ``-1``-padded.

    ``prompt_ids`` (one token-id list per row, ``questions`` then unused) replaces the QA prompt, e.g.
    MUSE's text prefixes and few-shot prompts. Returns ``[N, max_new_tokens]`` greedy continuations when
    ``num_samples == 0``, else
    ``[N, num_samples · max_new_tokens]`` (sample ``s`` in columns ``s·max_new_tokens ...``).
    """
    lm = unwrap_model(model)
    sync = generation_sync(model)
    copies = max(1, num_samples)
    count = len(questions) if prompt_ids is None else len(prompt_ids)

    def generate(indices: Sequence[int]) -> torch.Tensor:
        out = torch.full((len(indices), copies * max_new_tokens), -1.0)
        for row, i in enumerate(indices):
            ids = qa_prompt_ids(tokenizer, questions[i]) if prompt_ids is None else list(prompt_ids[i])
            prompt = torch.tensor([ids], device=device)
            kwargs: dict[str, Any] = {"do_sample": False}
            if num_samples:
                torch.manual_seed(derive_seed(seed, "sample", i))
                kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            seqs = lm.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                num_return_sequences=copies,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sync,
                **kwargs,
            )[:, prompt.shape[1] :]
            for s in range(copies):
                new = seqs[s]
                out[row, s * max_new_tokens : s * max_new_tokens + new.numel()] = new.float().cpu()
        return out

    with eval_mode(model):
        return sharded_map(count, 1, generate, device=device)


def decode(tokenizer: Any, ids: torch.Tensor, max_new_tokens: int) -> list[list[str]]:
    """Texts from :func:`generate_token_ids` output: ``[N][copies]`` (special tokens and padding removed)."""
    texts = []
    for row in ids.long():
        chunks = row.view(-1, max_new_tokens)
        texts.append(
            [tokenizer.decode([t for t in c.tolist() if t >= 0], skip_special_tokens=True).strip() for c in chunks]
        )
    return texts


def generation_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[QAItem],
    max_new_tokens: int = 16,
    num_samples: int = 0,
    leak_rouge: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Greedy ROUGE-L recall and leak rate of a split, plus sampled leak rates when ``num_samples > 0``.

    Returns ``rouge`` (mean greedy recall), ``greedy_leak`` (fraction of questions whose greedy answer
    leaks), ``rouge_per_example`` and, with sampling, ``sampled_leak`` (leaking samples / all samples),
    ``sampled_any_leak`` (questions with at least one leaking sample), their counts and the greedy texts.
    """
    questions = [item.question for item in items]
    greedy = decode(
        tokenizer, generate_token_ids(model, tokenizer, questions, max_new_tokens, device=device), max_new_tokens
    )
    recall = [rouge_l_recall(item.answer, texts[0]) for item, texts in zip(items, greedy, strict=True)]
    out: dict[str, Any] = {
        "rouge": sum(recall) / max(1, len(recall)),
        "greedy_leak": sum(r >= leak_rouge for r in recall) / max(1, len(recall)),
        "rouge_per_example": recall,
        "greedy_text": [t[0] for t in greedy],
    }
    if num_samples:
        ids = generate_token_ids(model, tokenizer, questions, max_new_tokens, num_samples, seed, device=device)
        samples = decode(tokenizer, ids, max_new_tokens)
        leaks = [
            [rouge_l_recall(item.answer, s) >= leak_rouge for s in texts]
            for item, texts in zip(items, samples, strict=True)
        ]
        out["sampled_leaks"] = sum(map(sum, leaks))
        out["sampled_total"] = sum(map(len, leaks))
        out["sampled_leak"] = out["sampled_leaks"] / max(1, out["sampled_total"])
        out["sampled_any_leak"] = sum(any(row) for row in leaks) / max(1, len(leaks))
    return out
