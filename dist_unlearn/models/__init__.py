"""Models: the embedded tiny Llama and its locally trained tokenizer.

The names below load their module on first use (PEP 562): importing a submodule such as
``dist_unlearn.models.logprobs`` then does not import transformers' model classes.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SPECIAL_TOKENS", "build_embedded_model", "build_tiny_llama", "train_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("dist_unlearn.models.tiny_llama"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
