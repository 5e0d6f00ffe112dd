"""Build the DeepSpeed config dict of a run: our defaults, then the user's file or inline block, then
the fields this package owns (batch sizes, ZeRO stage, precision)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    world_size: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    dtype: str = "fp32",
    user_config: str | dict[str, Any] | None = None,
    offload_optimizer: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config for one engine.

    Args:
        zero_stage: 0-3; always wins over the user's block (``deepspeed.zero_stage=N`` switches stage).
        micro_batch_size: per-rank examples per step (forget stream); gradient accumulation is 1.
        world_size: number of ranks, to state ``train_batch_size`` consistently.
        lr, weight_decay, warmup_steps, grad_clip: AdamW (torch implementation, no JIT build) with a
            linear warm-up to ``lr`` then constant; a constant tail keeps a resumed run identical to
            an uninterrupted one whatever the total step count.
        dtype: fp32, bf16 or fp16 (mixed precision through DeepSpeed's wrappers).
        user_config: a JSON path or a mapping merged over the defaults (its own optimizer and
            scheduler are kept if given).
        offload_optimizer: ZeRO-Offload of optimizer state to CPU memory.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True},
        },
        "zero_optimization": {
            "stage": zero_stage,
            "stage3_gather_16bit_weights_on_model_save": True,
            # small models keep whole parameters on every rank unless the threshold is 0
            "stage3_param_persistence_threshold": 0,
        },
    }
    if warmup_steps > 0:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                "warmup_num_steps": warmup_steps,
                "warmup_type": "linear",
            },
        }
    if user_config is not None:
        if isinstance(user_config, str | Path):
            user_config = json.loads(Path(user_config).read_text())
        config = deep_merge(config, user_config)
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = micro_batch_size * world_size
    config["zero_optimization"]["stage"] = zero_stage
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    config["bf16"] = {**config.get("bf16", {}), "enabled": dtype == "bf16"}
    config["fp16"] = {"initial_scale_power": 16, **config.get("fp16", {}), "enabled": dtype == "fp16"}
    return config


def torch_dtype(name: str) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` to the torch dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
