"""Export the trained weights of a DeepSpeed engine as a Hugging Face model directory.

Under ZeRO-3 the parameters are partitioned, so they are gathered first (collective); rank 0 then
writes ``save_pretrained`` output into ``DIR.tmp`` and renames it to ``DIR``.

A ``peft`` LoRA model (quantized base or not) is exported merged, as a plain model that
``AutoModel*.from_pretrained`` loads without peft or bitsandbytes: only the trained adapter weights are
gathered; rank 0 reloads the base model from its original path unquantized in fp32, loads the adapters
into it, merges them (``W + alpha/r · B A``), casts to the export dtype and saves. The adapters alone are
also saved under ``DIR/adapter`` (``PeftModel.from_pretrained`` format). For a quantized base the merged
model uses the original full-precision base weights rather than their 4-/8-bit approximation that the
adapters were trained against (the usual QLoRA practice); the difference is the quantization error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist_unlearn.distributed.env import barrier, get_rank
from dist_unlearn.io import atomic_path
from dist_unlearn.models.lora import is_peft_model


def gather_full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full (unpartitioned) state dict on rank 0, ``None`` elsewhere. Collective under ZeRO-3."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = {k: v.detach() for k, v in engine.module.state_dict().items()}
    return state if get_rank() == 0 else None


def gather_trainable_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The parameters that require grad (e.g. LoRA adapters), whole, on rank 0; ``None`` elsewhere.
    Collective under ZeRO-3 (the parameters are gathered on every rank, copied on rank 0)."""
    named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    if engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            state = {name: p.detach().to("cpu", copy=True) for name, p in named} if get_rank() == 0 else None
        return state
    return {name: p.detach().cpu().clone() for name, p in named} if get_rank() == 0 else None


def merged_lora_model(peft_model: Any, adapter_state: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """The base of ``peft_model`` reloaded unquantized (fp32) from its original path, with
    ``adapter_state`` (names as in ``peft_model.named_parameters()``) loaded and merged; cast to ``dtype``.
    Returns ``(merged_model, adapter_model)``; the adapter model's base is the merged model."""
    from peft import TaskType, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    config = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    auto = AutoModelForCausalLM if config.task_type == TaskType.CAUSAL_LM else AutoModel
    base = auto.from_pretrained(config.base_model_name_or_path, dtype=torch.float32)
    fresh = get_peft_model(base, config)
    result = fresh.load_state_dict(adapter_state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights do not fit the reloaded base model: {result.unexpected_keys[:3]}")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise RuntimeError(f"adapter weights missing from the trained model: {missing[:3]}")
    merged = copy.deepcopy(fresh).merge_and_unload()
    merged.to(dtype)
    merged.config.dtype = dtype
    return merged, fresh


def export_hf_model(
    engine: Any,
    tokenizer: Any,
    out_dir: str | Path,
    dtype: torch.dtype,
    extra_files: Callable[[Path], Any] | None = None,
) -> Path:
    """Write ``engine.module`` (weights cast to ``dtype``) and ``tokenizer`` to ``out_dir`` atomically.

    A LoRA (``peft``) module is written merged into its base, plus ``adapter/`` (see the module doc).
    ``extra_files(directory)``, when given, adds files to the model directory before it is renamed into place
    (e.g. the sentence-transformers module files). Collective: every rank calls it.
    """
    out_dir = Path(out_dir)
    module = engine.module
    lora = is_peft_model(module)
    state = gather_trainable_state_dict(engine) if lora else gather_full_state_dict(engine)
    if state is not None:
        with atomic_path(out_dir) as staging:
            if lora:
                merged, adapter_model = merged_lora_model(module, state, dtype)
                merged.save_pretrained(staging)
                adapter_model.save_pretrained(staging / "adapter")
            else:
                state = {k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in state.items()}
                module.config.dtype = dtype
                module.save_pretrained(staging, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            if extra_files is not None:
                extra_files(staging)
    barrier()
    return out_dir
