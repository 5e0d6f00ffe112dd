"""Load a causal LM or encoder and its tokenizer from a local directory or a hub name, with dtype,
attention implementation, bitsandbytes quantization and LoRA adapters chosen by the caller.

:func:`load_model_for_training` is the one loading path of both jobs (unlearning and contrastive);
:func:`model_for_config` applies a run's ``model`` section to it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from dist_unlearn.config.schema import LoraSettings, ModelConfig
from dist_unlearn.data.qa import set_prompt_format
from dist_unlearn.models.lora import KINDS, add_lora
from dist_unlearn.models.quantization import load_quantized, prepare_quantized

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    """``AutoModelForCausalLM.from_pretrained`` with the chosen dtype and attention implementation, its output
    head given :func:`contiguous_head_input`."""
    return contiguous_head_input(
        AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=choose_attn_implementation(attn_implementation)
        )
    )


def _contiguous_first_input(_module: torch.nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_head_input(model: torch.nn.Module) -> torch.nn.Module:
    """Make the output head of ``model`` copy a non-contiguous input to a contiguous one before it runs
    (a forward pre-hook); returns ``model``.

    ``transformers`` applies the head to ``hidden[:, -k:, :]`` when called with ``logits_to_keep=k`` (the
    chunked scorer's forward, :func:`dist_unlearn.models.chunked_lm.forward_hidden`, and every ``generate``
    step): a strided view of ``[b, 1, H]`` rows. On a CPU with AVX512-BF16, torch (2.13, oneDNN) multiplies
    such a bf16/fp16 view by the ``[V, H]`` weight through a batched product that materialises one copy of the
    weight per row: for the 32k × 1024 head of a 158.6 M Llama in bf16, 62.5 MiB per sequence, 250 MiB for a
    batch of 4 (a contiguous input, fp32, or oneDNN held to AVX2 needs none). Copying the ``b × H`` input
    first costs a few KiB. Every causal LM this package loads, for training or inference, gets the hook."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_first_input)
    return model


def load_model_for_training(
    path: str | Path,
    kind: str = "causal_lm",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    quantization: str = "none",
    lora: LoraSettings | None = None,
) -> torch.nn.Module:
    """Load a model ready to hand to ``deepspeed.initialize``.

    Args:
        path: local directory or hub name.
        kind: ``causal_lm`` (``AutoModelForCausalLM``) or ``encoder`` (``AutoModel``, e.g. BERT/MiniLM).
        dtype: dtype of the weights as loaded (for a quantized model also the 4-bit storage and compute
            dtype, and the dtype of the frozen non-quantized weights after kbit preparation is fp32).
        attn_implementation: see :func:`choose_attn_implementation`.
        quantization: ``none``, ``nf4``, ``fp4`` or ``int8`` (bitsandbytes; base weights frozen).
        lora: LoRA settings; ``None`` or ``r == 0`` = no adapters (all weights train, unless quantized).
    Returns:
        The module: a ``peft.PeftModel`` whose only trainable parameters are the LoRA weights when
        LoRA is on, else the plain ``transformers`` model. Pass ``[p for p in model.parameters() if
        p.requires_grad]`` as ``model_parameters``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    use_lora = lora is not None and lora.r > 0
    if quantization != "none" and not use_lora:
        raise ValueError("quantized base weights are frozen: set model.lora.r, e.g. model.lora.r=8")
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    attn = choose_attn_implementation(attn_implementation)
    if quantization == "none":
        model = auto.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
    else:
        model = prepare_quantized(load_quantized(auto, path, quantization, dtype, attn))
    if kind == "causal_lm":
        contiguous_head_input(model)
    if use_lora:
        model = add_lora(model, kind, lora.r, lora.alpha, lora.dropout, lora.targets)
    return model


def model_for_config(path: str | Path, model_cfg: ModelConfig, kind: str = "causal_lm") -> torch.nn.Module:
    """:func:`load_model_for_training` with a run's ``model`` section.

    Unquantized weights load in fp32 (DeepSpeed keeps fp32 master weights and casts for bf16/fp16
    itself); quantized models load in ``model.dtype`` so that the 4-bit storage dtype is the dtype
    DeepSpeed runs the module in (a later cast would corrupt the packed weights).
    """
    dtype = torch.float32 if model_cfg.quantization == "none" else _DTYPES[model_cfg.dtype]
    return load_model_for_training(
        path, kind, dtype, model_cfg.attn_implementation, model_cfg.quantization, model_cfg.lora
    )


def load_tokenizer(path: str | Path, prompt_format: str = "auto", chat_template: str = "") -> Any:
    """The tokenizer saved with the model; a pad token is set to eos when the tokenizer has none.

    ``prompt_format`` / ``chat_template`` (``data.prompt_format`` / ``data.chat_template``) are recorded on
    it (:func:`dist_unlearn.data.qa.set_prompt_format`), so every QA example, score and generation built
    with it shares one prompt format."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return set_prompt_format(tokenizer, prompt_format, chat_template)


def tokenizer_for_config(path: str | Path, data_cfg: Any) -> Any:
    """:func:`load_tokenizer` with the run config's ``data.prompt_format`` and ``data.chat_template``."""
    return load_tokenizer(path, data_cfg.prompt_format, data_cfg.chat_template)
