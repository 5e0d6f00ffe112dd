"""Tokenized question/answer examples for causal-LM training and answer scoring.

An example is ``[bos] + prompt + " " + answer + [eos]`` where the prompt is :data:`PROMPT_TEMPLATE`
filled with the question. Labels are ``-100`` over ``bos`` and the prompt, so the loss (and any
per-token answer probability) covers only the answer tokens and ``eos``. A tokenizer without a BOS
token (Qwen-style) gets no ``[bos]``: the example starts with the prompt (:func:`prefix_ids`).

A *raw-text* item (empty ``question``, the text in ``answer``; e.g. MUSE's forget / retain corpora, see
:mod:`dist_unlearn.data.formats`) has no prompt: :func:`encode_text_windows` cuts its tokens into
consecutive windows of ``max_length`` tokens (``[bos]`` included), each one example whose labels are the
whole window (only ``bos`` is ``-100``). :class:`QADataset` turns such an item into as many examples
as it has windows, so the objectives train on raw text through the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from dist_unlearn.data.facts import QAItem

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
IGNORE_INDEX = -100
_ANSWER_FIELDS = ("answer", "paraphrased_answer")


def _special_id(tokenizer: Any, name: str) -> int:
    """The id of the tokenizer's ``name`` special token (e.g. "eos_token_id"); ValueError if unset."""
    token_id = getattr(tokenizer, name, None)
    if token_id is None:
        raise ValueError(f"tokenizer has no {name}; encode_qa needs an eos token to end the answer")
    return int(token_id)


def prefix_ids(tokenizer: Any) -> list[int]:
    """What precedes the prompt: ``[bos_token_id]``, or ``[]`` for a tokenizer without a BOS token (Qwen-style
    tokenizers have none; their models start from the first text token). Training, scoring and generation
    all use it, so the prompt a model answers is the one it was trained on."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


def encode_qa(tokenizer: Any, question: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Tokenize one QA pair.

    Returns ``{"input_ids": [L], "labels": [L]}`` with ``L <= max_length``: ``input_ids`` is
    ``[bos] + prompt + answer + [eos]`` (answer text prefixed with a space; no ``bos`` when the tokenizer
    has none, :func:`prefix_ids`), ``labels`` is ``-100`` over ``bos`` + prompt and equal to ``input_ids``
    elsewhere. Truncation is from the right and always keeps at least one answer token; ValueError if
    ``bos`` + prompt alone exceed ``max_length - 1``, or if the tokenizer has no eos token.
    """
    eos = _special_id(tokenizer, "eos_token_id")
    prompt = tokenizer(PROMPT_TEMPLATE.format(question=question), add_special_tokens=False)["input_ids"]
    prompt_ids = [*prefix_ids(tokenizer), *prompt]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    prefix_len = len(prompt_ids)
    if prefix_len > max_length - 1:
        raise ValueError(
            f"prompt needs {prefix_len} tokens (with bos, if any) but max_length={max_length} leaves no room for "
            f"an answer token; question: {question!r}"
        )
    input_ids = [*prompt_ids, *answer_ids, eos][:max_length]
    labels = ([IGNORE_INDEX] * prefix_len + [*answer_ids, eos])[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def encode_text_windows(tokenizer: Any, text: str, max_length: int) -> list[dict[str, list[int]]]:
    """Raw text as training windows (no prompt, no eos: the text goes on in the next window).

    The text's tokens (no special tokens) are cut into consecutive, non-overlapping pieces of
    ``w = max_length − len(prefix)`` tokens (``prefix`` = ``[bos]`` or ``[]``, :func:`prefix_ids`; the
    last piece may be shorter); window ``j`` is ``{"input_ids": prefix + piece_j, "labels": [-100]·len(prefix)
    + piece_j}``, so every text token is a target exactly once. ``[]`` for a text without tokens.
    """
    prefix = prefix_ids(tokenizer)
    width = max_length - len(prefix)
    if width < 1:
        raise ValueError(f"max_length={max_length} leaves no room for a text token after bos")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [
        {"input_ids": [*prefix, *ids[i : i + width]], "labels": [IGNORE_INDEX] * len(prefix) + ids[i : i + width]}
        for i in range(0, len(ids), width)
    ]


class QADataset(Dataset):
    """Map-style dataset of tokenized QA items (tokenized once, at construction).

    ``answer_field`` selects the target text: "answer" (default) or "paraphrased_answer".
    ``__getitem__(i)`` returns ``{"input_ids": list[int], "labels": list[int], "index": i}``.
    A raw-text item (empty ``question``) gives one example per :func:`encode_text_windows` window;
    ``items[i]`` is then the item example ``i`` came from (repeated per window).
    """

    def __init__(self, items: Sequence[QAItem], tokenizer: Any, max_length: int, answer_field: str = "answer") -> None:
        if answer_field not in _ANSWER_FIELDS:
            raise ValueError(f"answer_field must be one of {_ANSWER_FIELDS}, got {answer_field!r}")
        self.answer_field = answer_field
        self.max_length = max_length
        self.items, self._encoded = [], []
        for item in items:
            text = getattr(item, answer_field)
            encoded = (
                encode_text_windows(tokenizer, text, max_length)
                if item.question == ""
                else [encode_qa(tokenizer, item.question, text, max_length)]
            )
            self.items.extend([item] * len(encoded))
            self._encoded.extend(encoded)

    def __len__(self) -> int:
        return len(self._encoded)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        encoded = self._encoded[index]
        return {"input_ids": list(encoded["input_ids"]), "labels": list(encoded["labels"]), "index": index}


def collate_qa(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch.

    Returns ``input_ids`` [b, T] (padded with ``pad_token_id``), ``attention_mask`` [b, T] (1 on real
    tokens), ``labels`` [b, T] (-100 on padding) and ``index`` [b] (the examples' ``index``, or their
    position when absent); all ``torch.long``; ``T`` is the longest example.
    """
    if not examples:
        raise ValueError("collate_qa needs at least one example")
    batch = len(examples)
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids, labs = example["input_ids"], example["labels"]
        if len(ids) != len(labs):
            raise ValueError(f"example {row}: {len(ids)} input_ids but {len(labs)} labels")
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.as_tensor(labs, dtype=torch.long)
    index = torch.as_tensor([int(example.get("index", row)) for row, example in enumerate(examples)])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


def encode_answers(tokenizer: Any, question: str, answers: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Encode several candidate answers to one question as a padded batch (as :func:`collate_qa`).

    Row ``k`` holds answer ``answers[k]``; ``index`` [n] is ``0..n-1``. Useful for truth-ratio style
    scoring (true / paraphrased vs perturbed answers).
    """
    if not answers:
        raise ValueError("encode_answers needs at least one answer")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = _special_id(tokenizer, "eos_token_id")
    examples = [{**encode_qa(tokenizer, question, answer, max_length), "index": k} for k, answer in enumerate(answers)]
    return collate_qa(examples, pad_token_id=int(pad))
