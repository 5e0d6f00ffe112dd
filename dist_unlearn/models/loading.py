"""Load a causal LM and its tokenizer from a local directory or a hub name, with dtype and attention
implementation chosen by the caller."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def choose_attn_implementation(requested: str = "auto") -> str:
    """``flash_attention_2`` when requested or (for ``auto``) when flash-attn is importable with CUDA,
    else ``sdpa``; ``eager`` and ``sdpa`` are honoured as given."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package: "
                "pip install 'dist-unlearn[flash-attn]' on a CUDA machine, or use model.attn_implementation=sdpa"
            )
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "auto") -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with the chosen dtype and attention implementation."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=choose_attn_implementation(attn_implementation)
    )


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with the model; a pad token is set to eos when the tokenizer has none."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
