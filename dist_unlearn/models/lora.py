"""LoRA adapters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) through ``peft``: ``W x + (alpha / r) · B A x`` with ``A [r, d_in]``, ``B [d_out, r]``
trainable and ``W`` frozen (possibly quantized)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

# default target modules per model family (attention projections)
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "bert": ("query", "key", "value"),
}
KINDS = ("causal_lm", "encoder")


def default_targets(model: Any) -> list[str]:
    """Attention projections of ``model``'s family: Llama-like ``q/k/v/o_proj``, BERT ``query/key/value``.

    Other architectures: every ``*_proj`` / ``query``/``key``/``value`` linear found, else peft's own
    defaults (an empty list is returned and peft decides, or raises with its message)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for family in DEFAULT_TARGETS.values():
        if set(family) <= names:
            return list(family)
    return []


def add_lora(model: Any, kind: str, r: int, alpha: int = 16, dropout: float = 0.0, targets: Sequence[str] = ()) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with LoRA adapters; only adapter weights require grad.

    Args:
        kind: ``causal_lm`` (task ``CAUSAL_LM``) or ``encoder`` (``FEATURE_EXTRACTION``).
        r, alpha, dropout: rank, scale numerator (scale = alpha / r) and dropout on the adapter input.
        targets: module names to adapt; empty = :func:`default_targets`.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    task = TaskType.CAUSAL_LM if kind == "causal_lm" else TaskType.FEATURE_EXTRACTION
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets) or default_targets(model) or None,
        task_type=task,
        bias="none",
    )
    return get_peft_model(model, config)


def is_peft_model(module: Any) -> bool:
    """True for a ``peft.PeftModel`` (without importing peft when it is not loaded: no model can be one then)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, peft.PeftModel)
