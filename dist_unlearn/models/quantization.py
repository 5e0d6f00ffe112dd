"""bitsandbytes quantization of frozen base weights (QLoRA-style) for training.

``nf4``/``fp4`` store each linear layer's weight in 4 bits (Dettmers et al., 2023, "QLoRA",
arXiv:2305.14314); ``int8`` uses LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339). The packed
4-bit weights are stored in a tensor of the model dtype (``bnb_4bit_quant_storage``) so that DeepSpeed
ZeRO-3 can flatten and partition them like any other parameter; the matmuls compute in the model
dtype. Quantized weights are frozen: train adapters (:mod:`dist_unlearn.models.lora`) on top.
bitsandbytes >= 0.46 quantizes on CPU, so the same path runs with and without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_unlearn.config.schema import QUANTIZATIONS


def bnb_config(quantization: str, dtype: torch.dtype) -> Any | None:
    """The ``transformers.BitsAndBytesConfig`` for ``quantization`` (``None`` for ``none``).

    Args:
        quantization: ``none``, ``nf4``, ``fp4`` or ``int8``.
        dtype: the model dtype; 4-bit weights are stored in and computed with it.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization: {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
        bnb_4bit_use_double_quant=False,
    )


def prepare_quantized(model: Any, gradient_checkpointing: bool = False) -> Any:
    """``peft.prepare_model_for_kbit_training`` (freezes everything, casts norms and other small
    floating parameters to fp32), then make the embedding outputs require grad so that gradients reach
    adapters even when every base parameter is frozen (needed with activation checkpointing).
    Gradient checkpointing is off by default: it saves memory on a GPU but only costs time on CPU."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model
