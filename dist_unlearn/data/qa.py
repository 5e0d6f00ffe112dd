"""Tokenized question/answer examples for causal-LM training and answer scoring.

An example is ``prompt + answer`` with labels ``-100`` over the prompt, so the loss (and any per-token
answer probability) covers only the answer tokens. How a question becomes a prompt is the tokenizer's
*prompt format* (:func:`set_prompt_format`; config ``data.prompt_format``), the one place every caller
(training streams, evaluation probabilities and truth ratios, ROUGE generations, attacks) gets it from:

* ``plain``: ``[bos] + PROMPT_TEMPLATE.format(question) + " " + answer + [eos]`` (:data:`PROMPT_TEMPLATE`;
  a tokenizer without a BOS token, Qwen-style, gets no ``[bos]``: :func:`prefix_ids`);
* ``chat``: the tokenizer's chat template (``apply_chat_template``): the prompt is the conversation
  ``[{"role": "user", "content": question}]`` rendered with the generation prompt (e.g.
  ``<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n``), the answer is what rendering the
  conversation with ``{"role": "assistant", "content": answer}`` adds after it, trailing whitespace
  removed (e.g. ``A<|im_end|>``), followed by ``eos`` unless it already ends with it (as
  open-unlearning's chat datasets end). The template writes its own BOS, if any.

A tokenizer without a recorded format uses ``chat`` when it has a chat template, else ``plain`` (what
``data.prompt_format=auto`` means).

A *raw-text* item (empty ``question``, the text in ``answer``; e.g. MUSE's forget / retain corpora, see
:mod:`dist_unlearn.data.formats`) has no prompt: :func:`encode_text_windows` cuts its tokens into
consecutive windows of ``max_length`` tokens (``[bos]`` included), each one example whose labels are the
whole window (only ``bos`` is ``-100``). :class:`QADataset` turns such an item into as many examples
as it has windows, so the objectives train on raw text through the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dist_unlearn.config.schema import PROMPT_FORMATS
from dist_unlearn.data.facts import QAItem

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
IGNORE_INDEX = -100
_FORMAT_ATTR = "dist_unlearn_prompt_format"
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


def read_chat_template(value: str) -> str:
    """``data.chat_template`` as template text: the content of the file ``value`` names, else ``value``
    itself when it looks like a Jinja template (holds ``{{`` or ``{%``); ValueError naming the field otherwise."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(
        f"data.chat_template: {value!r} is neither a file nor a Jinja template. "
        "Fix: give the path of a .jinja file, the template text, or leave it empty"
    )


def has_chat_template(tokenizer: Any) -> bool:
    """True when ``tokenizer`` carries a chat template (``tokenizer.chat_template`` set)."""
    return bool(getattr(tokenizer, "chat_template", None))


def set_prompt_format(tokenizer: Any, prompt_format: str = "auto", chat_template: str = "") -> Any:
    """Record on ``tokenizer`` how prompts are built (``data.prompt_format``, ``data.chat_template``);
    returns the tokenizer.

    ``chat_template`` (file path or template text, :func:`read_chat_template`) replaces the tokenizer's
    template. ``auto`` resolves to ``chat`` when the tokenizer then has a template, else ``plain``.
    ValueError (naming the field and the fix) for ``chat`` without any template, or an unknown format.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"data.prompt_format: unknown {prompt_format!r}. Fix: choose from {', '.join(PROMPT_FORMATS)}")
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    resolved = prompt_format
    if resolved == "auto":
        resolved = "chat" if has_chat_template(tokenizer) else "plain"
    if resolved == "chat" and not has_chat_template(tokenizer):
        raise ValueError(
            "data.prompt_format: chat, but the tokenizer has no chat template. "
            "Fix: set data.chat_template=FILE.jinja (or the template text), or data.prompt_format=plain"
        )
    setattr(tokenizer, _FORMAT_ATTR, resolved)
    return tokenizer


def prompt_format_of(tokenizer: Any) -> str:
    """``plain`` or ``chat``: the format :func:`set_prompt_format` recorded, else ``chat`` exactly when the
    tokenizer has a chat template (``auto``)."""
    recorded = getattr(tokenizer, _FORMAT_ATTR, None)
    if recorded is not None:
        return recorded
    return "chat" if has_chat_template(tokenizer) else "plain"


def _user_turn(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def prompt_text(tokenizer: Any, question: str) -> str:
    """The prompt as text (without ``bos`` under ``plain``): ``PROMPT_TEMPLATE`` filled with the question,
    or the chat template's rendering of the user turn with the generation prompt."""
    if prompt_format_of(tokenizer) == "plain":
        return PROMPT_TEMPLATE.format(question=question)
    return tokenizer.apply_chat_template(_user_turn(question), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """Token ids of the prompt the model answers (the labels' ``-100`` part): ``[bos] +`` the plain prompt
    (:func:`prefix_ids`), or the chat prompt's tokens (the template writes its own BOS). Training,
    scoring and generation all use it."""
    ids = tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]
    return [*prefix_ids(tokenizer), *ids] if prompt_format_of(tokenizer) == "plain" else list(ids)


def answer_ids(tokenizer: Any, question: str, answer: str) -> list[int]:
    """Token ids of the answer, scored and trained on, ending with ``eos`` (see the module doc).

    ``plain``: ``" " + answer`` then ``eos``. ``chat``: the text the assistant turn adds after
    :func:`prompt_text` (trailing whitespace removed), then ``eos`` unless its last token is ``eos``.
    ValueError when the template does not render the answer as a continuation of the prompt.
    """
    eos = _special_id(tokenizer, "eos_token_id")
    if prompt_format_of(tokenizer) == "plain":
        return [*tokenizer(" " + answer, add_special_tokens=False)["input_ids"], eos]
    prompt = prompt_text(tokenizer, question)
    turns = [*_user_turn(question), {"role": "assistant", "content": answer}]
    full = tokenizer.apply_chat_template(turns, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "data.chat_template: the template does not render the assistant turn after the generation prompt "
            f"(prompt {prompt!r}, conversation {full!r}). Fix: use a template whose add_generation_prompt "
            "output prefixes the answered conversation, or data.prompt_format=plain"
        )
    ids = list(tokenizer(full[len(prompt) :].rstrip(), add_special_tokens=False)["input_ids"])
    return ids if ids and ids[-1] == eos else [*ids, eos]


def leaves_room_for_an_answer(prompt_tokens: int, max_length: int) -> bool:
    """Whether a prompt of ``prompt_tokens`` tokens (with ``bos``) leaves at least one of ``max_length`` for
    the answer: the rule :func:`encode_qa` enforces and :func:`length_fit` reports on."""
    return prompt_tokens <= max_length - 1


def encode_qa(tokenizer: Any, question: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Tokenize one QA pair in the tokenizer's prompt format (:func:`prompt_format_of`).

    Returns ``{"input_ids": [L], "labels": [L]}`` with ``L <= max_length``: ``input_ids`` is
    :func:`prompt_ids` ``+`` :func:`answer_ids` (plain: ``[bos] + prompt + " " + answer + [eos]``, no
    ``bos`` when the tokenizer has none), ``labels`` is ``-100`` over the prompt and equal to
    ``input_ids`` elsewhere. Truncation is from the right and always keeps at least one answer token;
    ValueError if the prompt alone exceeds ``max_length - 1``, or if the tokenizer has no eos token.
    """
    answer = answer_ids(tokenizer, question, answer)
    prompt = prompt_ids(tokenizer, question)
    prefix_len = len(prompt)
    if not leaves_room_for_an_answer(prefix_len, max_length):
        raise ValueError(
            f"prompt needs {prefix_len} tokens (with bos, if any) but max_length={max_length} leaves no room for "
            f"an answer token; question: {question!r}. Fix: raise data.max_length"
        )
    input_ids = [*prompt, *answer][:max_length]
    labels = ([IGNORE_INDEX] * prefix_len + answer)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


@dataclass(frozen=True)
class LengthFit:
    """How QA examples fit ``max_length`` tokens (:func:`length_fit`)."""

    examples: int
    longest: int
    """Tokens of the longest ``prompt + answer`` (with ``bos``/``eos``)."""
    truncated: int
    """Examples whose answer :func:`encode_qa` cuts at ``max_length`` (scored and trained on in part)."""
    prompt_too_long: str | None
    """A question whose prompt alone leaves no room for an answer token (:func:`encode_qa` refuses it)."""


def length_fit(tokenizer: Any, items: Sequence[Any], max_length: int) -> LengthFit:
    """Tokenize each QA item's prompt and true answer as :func:`encode_qa` does and count what does not fit
    in ``max_length`` tokens. Raw-text items (empty question) are cut into windows and always fit."""
    longest, truncated, too_long, count = 0, 0, None, 0
    for item in items:
        if not item.question:
            continue
        prompt = len(prompt_ids(tokenizer, item.question))
        total = prompt + len(answer_ids(tokenizer, item.question, item.answer))
        count += 1
        longest = max(longest, total)
        truncated += total > max_length
        if too_long is None and not leaves_room_for_an_answer(prompt, max_length):
            too_long = item.question
    return LengthFit(count, longest, truncated, too_long)


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
