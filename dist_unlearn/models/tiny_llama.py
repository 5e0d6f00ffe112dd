"""The embedded model: a byte-level BPE tokenizer trained on a corpus plus a tiny randomly initialised Llama.

Everything is built locally (nothing is downloaded), deterministic given the corpus and the seed, and
saves / loads with the usual ``save_pretrained`` / ``from_pretrained`` calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # imported where used: a process that only checks prepared models never loads the Llama classes
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
_BYTE_ALPHABET_SIZE = 256


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int = 1024, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``.

    The full 256-byte alphabet is always in the vocabulary, so any text encodes without ``<unk>`` and
    ``decode(encode(s)) == s``. Special tokens ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` get ids 0..3 and are
    never added automatically (``tokenizer("x")["input_ids"]`` has no specials). Padding is on the right.
    The vocabulary may end up smaller than ``vocab_size`` when the corpus has few merges to offer.
    """
    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("train_tokenizer needs a non-empty corpus")
    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (byte alphabet + specials), got {vocab_size}")
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
    seed: int = 0,
    pad_token_id: int | None = 0,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    intermediate_size: int | None = None,
) -> LlamaForCausalLM:
    """A small randomly initialised ``LlamaForCausalLM`` (float32, deterministic given ``seed``).

    ``intermediate_size`` defaults to ``4 * hidden_size``; embeddings are tied; dropout is 0; grouped-query
    attention uses ``num_heads // 2`` key/value heads when ``num_heads`` is even (else ``num_heads``).
    The default special-token ids match :func:`train_tokenizer` (pad 0, bos 1, eos 2). The global torch
    RNG state is left untouched.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if min(vocab_size, hidden_size, num_layers, num_heads, max_position_embeddings) < 1:
        raise ValueError("all sizes (vocab, hidden, layers, heads, positions) must be >= 1")
    num_kv_heads = num_heads // 2 if num_heads % 2 == 0 else num_heads
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def build_embedded_model(
    corpus: Iterable[str],
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
    max_position_embeddings: int = 256,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Train a tokenizer on ``corpus`` and build a matching tiny Llama (vocabulary = ``len(tokenizer)``)."""
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size, model_max_length=max_position_embeddings)
    model = build_tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model, tokenizer
