"""Models, batches and single training steps that the contrastive benchmark times and measures.

Three ways to compute the gradient of the same InfoNCE loss (temperature ``tau``) over ``B`` queries and
``B`` positive passages (in-batch negatives) with the same encoder:

- ``plain``: encode all ``2B`` sequences with autograd, loss, one backward (activation memory ``O(B)``);
- ``gradcache``: :class:`~dist_unlearn.contrastive.GradCache` (Gao et al. 2021) with ``chunk`` rows per forward
  and :class:`~dist_unlearn.contrastive.InfoNCELoss` (activation memory ``O(chunk)``), rows sorted by length,
  each chunk's padding cut to its longest row and the last chunk's graph kept (:data:`GRADCACHE_OPTIONS`);
- ``st``: ``sentence_transformers``' ``CachedMultipleNegativesRankingLoss`` (scale ``1/tau``,
  ``mini_batch_size=chunk``) on a ``SentenceTransformer`` loaded from the same directory, called directly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dist_unlearn.contrastive import GradCache, InfoNCELoss
from dist_unlearn.models.encoders import encode_batch, encoder_path, tokenize

TINY_BERT = "tiny-bert"
"""``--model`` value for a small randomly initialised ``BertModel`` (see :func:`tiny_bert_config`)."""

TEMPERATURE = 0.05
METHODS = ("plain", "gradcache", "st")
TEXTS = ("facts", "varied")
GRADCACHE_OPTIONS = {"sort_by_length": True, "trim_padding": True, "keep_last_graph": True}
"""How the ``gradcache`` method runs GradCache (the options the sentence-transformers loss uses too)."""
VARIED_WORDS = {"queries": (8, 30), "passages": (15, 60)}
"""Words per text (inclusive range) of the ``varied`` texts: queries of 8-30 words, passages of 15-60."""


def tiny_bert_config(vocab_size: int) -> dict[str, int]:
    """The small BERT used for memory scaling: hidden 128, 2 layers, 2 heads, FFN 512, max 64 positions."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 512,
        "max_position_embeddings": 64,
    }


def load_tokenizer() -> Any:
    """The bundled all-MiniLM-L6-v2 tokenizer (also used for the tiny random BERT)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(encoder_path("embedded"))


def load_encoder(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """An HF encoder in train mode (dropout on) and a description for the JSON.

    ``name``: ``embedded`` (bundled all-MiniLM-L6-v2), a local directory / hub name, or ``tiny-bert``.
    """
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(seed)
    if name == TINY_BERT:
        config = tiny_bert_config(load_tokenizer().vocab_size)
        model = BertModel(BertConfig(**config), add_pooling_layer=False)
        info: dict[str, Any] = {"name": TINY_BERT, "init": "random", **config}
    else:
        model = AutoModel.from_pretrained(encoder_path(name))
        cfg = model.config
        info = {"name": name, "path": encoder_path(name), "hidden_size": cfg.hidden_size}
        info["num_hidden_layers"] = cfg.num_hidden_layers
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model.train(), info


def pair_texts(n: int) -> tuple[list[str], list[str]]:
    """``n`` (question, passage) pairs from the fictitious-facts retrieval data, cycled when ``n`` > 240."""
    from dist_unlearn.data import generate_facts

    items = list(generate_facts(num_people=60, questions_per_person=4).items)
    chosen = [items[i % len(items)] for i in range(n)]
    return [item.question for item in chosen], [item.paraphrased_answer for item in chosen]


def varied_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` made-up (query, passage) pairs of varied length: queries of 8-30 words, passages of 15-60 words.

    Words are drawn (seeded) from the alphabetic words of the fictitious-facts texts (about 1.9 word pieces each
    for the MiniLM tokenizer); each passage repeats part of its query so that the pairs are related. Only the
    lengths matter for timing: every chunk gets rows of mixed lengths.
    """
    import random

    questions, answers = pair_texts(240)
    words = {word.strip(".,?!;:'\"()").lower() for text in questions + answers for word in text.split()}
    vocabulary = sorted(word for word in words if word.isalpha())
    rng = random.Random(seed)
    queries, passages = [], []
    for _ in range(n):
        query = rng.choices(vocabulary, k=rng.randint(*VARIED_WORDS["queries"]))
        length = rng.randint(*VARIED_WORDS["passages"])
        overlap = query[: min(len(query), length) // 2]
        passages.append(" ".join(overlap + rng.choices(vocabulary, k=length - len(overlap))))
        queries.append(" ".join(query))
    return queries, passages


def make_batch(tokenizer: Any, n: int, max_length: int, device: str, texts: str = "facts") -> tuple[dict, dict]:
    """Tokenized queries and passages ``[n, T]`` (``input_ids``, ``attention_mask``) on ``device``.

    ``texts``: ``facts`` (the fictitious-facts questions and answers, near-equal lengths) or ``varied``
    (:func:`varied_texts`). Padded to the longest row of each side, truncated at ``max_length`` tokens.
    """
    if texts not in TEXTS:
        raise ValueError(f"texts must be one of {TEXTS}, got {texts!r}")
    queries, passages = pair_texts(n) if texts == "facts" else varied_texts(n)
    return tokenize(tokenizer, queries, max_length, device), tokenize(tokenizer, passages, max_length, device)


def autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on the device type of ``model``'s parameters; a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def sync(device: str) -> None:
    """Wait for queued CUDA work (no-op on the CPU) so that wall-clock times are complete."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Stepper:
    """One training step (zero grads, gradient of InfoNCE over the batch, optimizer step) for one method.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``): the encoder's forwards run under ``torch.autocast`` to it, the
    weights, gradients and AdamW stay float32. ``gradcache``: GradCache's ``autocast_dtype`` (the loss on float32
    copies of the representations); ``plain``: the two encodes under autocast, the loss on float32 copies;
    ``st``: sentence-transformers' loss call and its backward (where its cached replay forwards run) under
    autocast.
    """

    method: str
    model: nn.Module
    chunk: int
    autocast_dtype: torch.dtype | None = None
    optimizer: torch.optim.Optimizer = field(init=False)
    _grad: Callable[[dict, dict], Tensor] = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self._grad = self._make_grad()

    def _make_grad(self) -> Callable[[dict, dict], Tensor]:
        if self.method == "st":
            return st_gradient(self.model, self.chunk, self.autocast_dtype)
        loss_fn = InfoNCELoss(temperature=TEMPERATURE, cross_rank=False)
        if self.method == "gradcache":
            cache = GradCache(
                self.model,
                chunk_size=self.chunk,
                loss_fn=loss_fn,
                encode=encode_batch,
                autocast_dtype=self.autocast_dtype,
                **GRADCACHE_OPTIONS,
            )
            return cache.step

        def plain(queries: dict, docs: dict) -> Tensor:
            with autocast(self.model, self.autocast_dtype):
                q, d = encode_batch(self.model, queries), encode_batch(self.model, docs)
            loss = loss_fn(q.float(), d.float())
            loss.backward()
            return loss.detach()

        return plain

    def gradient(self, queries: dict, docs: dict) -> Tensor:
        """Leave the batch gradient in the parameters (zeroed in place first, buffers kept); return the loss."""
        self.optimizer.zero_grad(set_to_none=False)
        return self._grad(queries, docs)

    def step(self, queries: dict, docs: dict) -> float:
        """A full training step; returns the loss."""
        loss = self.gradient(queries, docs)
        self.optimizer.step()
        return float(loss)


def load_st_model(name: str, device: str) -> nn.Module:
    """``SentenceTransformer`` loaded from the same directory as ``load_encoder(name)``, in train mode."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(encoder_path(name), device=device).train()


def st_gradient(
    st_model: nn.Module, chunk: int, autocast_dtype: torch.dtype | None = None
) -> Callable[[dict, dict], Tensor]:
    """``CachedMultipleNegativesRankingLoss`` (``scale = 1/tau``, ``mini_batch_size = chunk``) as a gradient
    function: ``loss([queries, docs], None).backward()``, exactly what its trainer does per step; with
    ``autocast_dtype`` both under ``torch.autocast`` (its chunk replays run in a backward hook)."""
    try:
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    except ImportError:  # older releases
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    loss_fn = CachedMultipleNegativesRankingLoss(st_model, scale=1.0 / TEMPERATURE, mini_batch_size=chunk)

    def gradient(queries: dict, docs: dict) -> Tensor:
        with autocast(st_model, autocast_dtype):
            loss = loss_fn([dict(queries), dict(docs)], None)
            loss.backward()
        return loss.detach()

    return gradient


def timed_step(stepper: Stepper, queries: dict, docs: dict, device: str) -> float:
    """Seconds of one full training step."""
    sync(device)
    start = time.perf_counter()
    stepper.step(queries, docs)
    sync(device)
    return time.perf_counter() - start


def interleaved_times(
    steppers: dict[str, Stepper], queries: dict, docs: dict, repeats: int, device: str
) -> dict[str, list[float]]:
    """Step times per method, the methods alternating within each repeat (so background load hits all
    alike), after one untimed warm-up step each."""
    for stepper in steppers.values():
        stepper.step(queries, docs)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, stepper in steppers.items():
            times[name].append(timed_step(stepper, queries, docs, device))
    return times
