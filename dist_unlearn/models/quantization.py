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


def keep_portable_weight_layout(model: torch.nn.Module) -> int:
    """Switch off bitsandbytes' CPU weight repacking in every 4-bit linear layer of ``model``.

    On processors with AVX512-BF16, bitsandbytes (>= 0.48) repacks a ``Linear4bit`` weight into a
    CPU-only layout during the first forward that runs outside training mode on an input that does
    not require grad (evaluation, a frozen reference model, GradCache's no-grad pass). That repacking
    assumes ``uint8`` storage of a whole weight; the project stores 4-bit weights in the model dtype
    (so ZeRO-3 can flatten and partition them) and partitions them, so it fails there
    (``shape '[32, 0]' is invalid``) and a later ``state_dict()`` asserts on the dtype. Other
    processors never take the path, so the same code must compute the same thing on both: the
    portable layout is kept everywhere. The module attribute ``support_avx512bf16_for_cpu`` is the
    switch bitsandbytes reads.

    Returns:
        the number of 4-bit layers found (0 for an unquantized model).
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_quantized(
    auto_class: Any, path: str, quantization: str, dtype: torch.dtype, attn_implementation: str
) -> torch.nn.Module:
    """``auto_class.from_pretrained`` with the bitsandbytes config of ``quantization`` and the portable
    4-bit weight layout (:func:`keep_portable_weight_layout`).

    Args:
        auto_class: e.g. ``transformers.AutoModelForCausalLM`` or ``AutoModel``.
        path: local directory or hub name.
        quantization: ``nf4``, ``fp4`` or ``int8``.
        dtype: model dtype (also the 4-bit storage and compute dtype).
        attn_implementation: a resolved attention implementation (``sdpa``, ``eager``, ...).
    """
    model = auto_class.from_pretrained(
        str(path),
        dtype=dtype,
        quantization_config=bnb_config(quantization, dtype),
        attn_implementation=attn_implementation,
    )
    keep_portable_weight_layout(model)
    return model


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
