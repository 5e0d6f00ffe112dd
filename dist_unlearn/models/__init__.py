"""Models: the embedded tiny Llama and its locally trained tokenizer."""

from dist_unlearn.models.tiny_llama import (
    SPECIAL_TOKENS,
    build_embedded_model,
    build_tiny_llama,
    train_tokenizer,
)

__all__ = ["SPECIAL_TOKENS", "build_embedded_model", "build_tiny_llama", "train_tokenizer"]
