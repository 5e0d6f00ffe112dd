"""Load a causal LM for inference (evaluation, attacks, oracles) in a chosen dtype, whole or ZeRO-3-sharded.

:func:`load_inference_model` is the one loader of every scorer (``dist-unlearn eval``, the final and periodic
evaluation of a run, the oracle, ULD's combined model; :func:`dist_unlearn.models.combined.load_scoring_model`).

* ``shard=False`` or one process: ``from_pretrained`` in ``dtype``; every rank holds the whole model.
* ``shard=True`` in a process group of ``W > 1`` ranks: a frozen DeepSpeed ZeRO-3 engine with no optimizer
  (ZeRO-3 inference). Each rank holds ``⌈P/W⌉`` of the ``P`` weights in ``dtype``; every forward gathers
  each layer's weights just before it runs and frees them after, so the forward is *collective*: all ranks
  must run the same number of forwards (:func:`dist_unlearn.distributed.sharded.sharded_map` pads the
  work so they do; generation runs with ``synced_gpus``). The model is built under ``deepspeed.zero.Init``
  (each weight partitioned as soon as its module exists) and each rank reads only its own slice of every
  weight from the ``safetensors`` files (:func:`read_partition`, plain file reads, no memory map), so no
  rank ever holds the whole model: the peak is its partition plus one layer gathered for the forward.
  Checkpoints this fast path cannot read (hub names not in the local cache, ``.bin`` files, key names
  that need ``transformers``' conversions) load through ``transformers``' own ZeRO-3 path instead, in
  which rank 0 reads the whole checkpoint.

The sharded forward computes the same numbers as the whole model in the same dtype (the gathered weights
are the loaded weights, bit for bit).

:func:`sharded_engine` with ``training`` builds the same partitioned model as a trainable engine (an optimizer
whose state is partitioned too): the relearning attack's (:func:`dist_unlearn.models.finetune.trainable_engine`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist_unlearn.distributed.env import get_world_size, initialize_deepspeed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


PERSISTENCE_THRESHOLD = 100_000
"""Weights of at most this many elements stay whole on every rank (DeepSpeed's default
``stage3_param_persistence_threshold``): norms and biases, gathered once instead of at every forward."""


REDUCE_BUCKET_SIZE = 2**24
"""Gradient elements a trainable engine of :func:`sharded_engine` gathers before a reduce-scatter (32 MiB in
bf16); DeepSpeed's default (5·10⁸) allocates a bucket larger than a 158 M-parameter model's gradients."""


def inference_ds_config(dtype: str = "fp32", micro_batch_size: int = 1) -> dict[str, Any]:
    """DeepSpeed config of a ZeRO-3 inference engine in ``dtype`` (``fp32``/``bf16``/``fp16``).

    Memory before speed: no prefetching and no keeping of weights for a later reuse, so at any time a
    rank holds its partition plus the weights of the module that runs (and the small weights ZeRO-3
    keeps whole, :data:`PERSISTENCE_THRESHOLD`); with an optimizer added (:func:`sharded_engine`'s
    ``training``), gradients reduced in buckets of :data:`REDUCE_BUCKET_SIZE` elements."""
    return {
        "train_micro_batch_size_per_gpu": max(1, micro_batch_size),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_prefetch_bucket_size": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_max_live_parameters": 0,
            "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
            "reduce_bucket_size": REDUCE_BUCKET_SIZE,
        },
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
    }


def load_inference_model(
    path: str | Path,
    dtype: str = "fp32",
    shard: bool = True,
    attn_implementation: str = "eager",
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """The causal LM at ``path`` for scoring: frozen, in eval mode, on ``device``.

    Args:
        path: saved model directory or hub name.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (the run's ``model.dtype``, its training dtype).
        shard: partition the weights over the ranks of the process group (ZeRO-3 inference) when it has
            more than one rank; otherwise (or with one rank) each rank holds the whole model.
        attn_implementation: see :func:`dist_unlearn.models.loading.choose_attn_implementation`.
        device: where the whole model goes (a sharded engine uses DeepSpeed's device for this rank).
    Returns:
        A ``transformers`` model, or a ``DeepSpeedEngine`` wrapping one (ZeRO-3; collective forward).
        Collective when sharded: every rank must call it.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard and get_world_size() > 1:
        return sharded_engine(path, dtype, attn_implementation)
    from dist_unlearn.models.loading import load_causal_lm

    model = load_causal_lm(path, DTYPES[dtype], attn_implementation)
    return model.requires_grad_(False).eval().to(device)


def sharded_engine(
    path: str | Path,
    dtype: str = "fp32",
    attn_implementation: str = "eager",
    micro_batch_size: int = 1,
    training: dict[str, Any] | None = None,
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> Any:
    """A ZeRO-3 ``DeepSpeedEngine`` of the causal LM at ``path`` in ``dtype``, built partitioned (see the
    module docstring). Collective.

    Without ``training``: frozen, in eval mode, no optimizer (inference). With ``training`` (DeepSpeed
    config entries such as ``optimizer`` and ``gradient_clipping``, merged over :func:`inference_ds_config`;
    e.g. :func:`dist_unlearn.models.finetune.optimizer_ds_config`) and an optional ``lr_scheduler``
    (``optimizer → scheduler``, as ``deepspeed.initialize`` takes it): trainable, in train mode, its
    optimizer state partitioned like the weights."""
    config = {**inference_ds_config(dtype, micro_batch_size), **(training or {})}
    if "LOCAL_RANK" not in os.environ:  # zero.Init reads it; a user's own process group may not export it
        os.environ["LOCAL_RANK"] = str(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    files = _local_safetensors(path)
    model = _build_partitioned(path, dtype, attn_implementation, config) if files else None
    if model is not None and not _fill_partitions(model, files):
        model = None  # names the fast path cannot match: transformers' own ZeRO-3 loading
    if model is None:
        model = _load_with_transformers_zero3(path, dtype, attn_implementation, config)
    from dist_unlearn.models.loading import contiguous_head_input

    contiguous_head_input(model)
    if training is not None:
        model.requires_grad_(True).train()
        return initialize_deepspeed(model, config, lr_scheduler=lr_scheduler)
    model.requires_grad_(False).eval()
    engine = initialize_deepspeed(model, config)
    engine.eval()  # (DeepSpeedEngine.eval returns None)
    return engine


def _local_safetensors(path: str | Path) -> list[Path]:
    """The ``safetensors`` files of a local model directory (``[]`` for anything else)."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / name for name in names]
    single = root / "model.safetensors"
    return [single] if single.is_file() else []


def _build_partitioned(path: str | Path, dtype: str, attn_implementation: str, config: dict[str, Any]) -> Any:
    """The model of ``path``'s config, built under ``deepspeed.zero.Init`` with no weight initialisation:
    every weight is this rank's (uninitialised) partition."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from dist_unlearn.models.loading import choose_attn_implementation

    model_config = AutoConfig.from_pretrained(str(path))
    with (
        no_init_weights(),
        prevent_arange_dtype_change(),  # rotary position buffers keep the dtype a plain load gives them
        deepspeed.zero.Init(config_dict_or_path=config),  # dtype from config (its `dtype=` is ignored on CPUs)
    ):
        model = AutoModelForCausalLM.from_config(
            model_config, dtype=DTYPES[dtype], attn_implementation=choose_attn_implementation(attn_implementation)
        )
    model.tie_weights()  # tied output head = the embedding's (partitioned) weight, as transformers' ZeRO-3 path does
    return model


def _load_with_transformers_zero3(
    path: str | Path, dtype: str, attn_implementation: str, config: dict[str, Any]
) -> Any:
    """``from_pretrained`` under ``transformers``' ZeRO-3 integration (rank 0 reads the whole checkpoint)."""
    from transformers.integrations import HfDeepSpeedConfig

    from dist_unlearn.models.loading import load_causal_lm

    hf_config = HfDeepSpeedConfig(config)  # transformers sees ZeRO-3 while this object lives
    try:
        return load_causal_lm(path, DTYPES[dtype], attn_implementation)
    finally:
        del hf_config


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """``(data start offset, header)`` of a ``safetensors`` file (8-byte little-endian length + JSON)."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def read_partition(file: Path, start_of_data: int, entry: dict[str, Any], start: int, stop: int) -> torch.Tensor:
    """Elements ``[start, stop)`` of the row-major flattened tensor ``entry`` (a ``safetensors`` header
    entry: ``dtype``, ``shape``, ``data_offsets``), read from ``file`` without reading the rest.

    Returns a 1-D tensor of ``stop − start`` elements in the file's dtype."""
    file_dtype = _ST_DTYPES[entry["dtype"]]
    size = torch.empty(0, dtype=file_dtype).element_size()
    begin = start_of_data + entry["data_offsets"][0] + start * size
    buffer = bytearray((stop - start) * size)
    with open(file, "rb") as handle:
        handle.seek(begin)
        handle.readinto(buffer)
    return torch.frombuffer(buffer, dtype=file_dtype) if buffer else torch.empty(0, dtype=file_dtype)


def _checkpoint_entries(files: list[Path]) -> dict[str, tuple[Path, int, dict[str, Any]]]:
    entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for file in files:
        offset, header = _header(file)
        entries.update({name: (file, offset, e) for name, e in header.items() if name != "__metadata__"})
    return entries


def _fill_partitions(model: torch.nn.Module, files: list[Path]) -> bool:
    """Copy this rank's slice of every weight from ``files`` into its ZeRO-3 partition (``ds_tensor``).

    Rank ``r`` of the parameter's group holds elements ``[r·s, (r+1)·s)`` of the flattened weight, ``s``
    its partition size (the tail past the weight's size is padding, set to 0). Returns ``False`` (nothing
    usable loaded) when a weight has no entry of the same name and size in the checkpoint."""
    dist = torch.distributed
    entries = _checkpoint_entries(files)
    params = list(model.named_parameters())  # tied weights appear once, under their first name
    if any(name not in entries or math.prod(entries[name][2]["shape"]) != p.ds_numel for name, p in params):
        return False
    with torch.no_grad():
        for name, param in params:
            file, offset, entry = entries[name]
            part = param.ds_tensor
            size = part.numel()
            start = size * dist.get_rank(group=getattr(param, "ds_process_group", None))
            stop = min(start + size, param.ds_numel)
            part.zero_()
            if stop > start:
                part[: stop - start].copy_(read_partition(file, offset, entry, start, stop))
    return True


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether any weight of ``model`` (a module, PEFT model, engine or combined model) is ZeRO-3-partitioned."""
    from dist_unlearn.models.chunked_lm import unwrap_model

    return any(hasattr(p, "ds_id") for p in unwrap_model(model).parameters())


def generation_sync(model: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments ``generate`` needs for ``model``: ``synced_gpus=True`` when its weights are
    partitioned over several ranks (every rank keeps running forwards until all ranks have finished
    their sequences, as each forward is collective), else none."""
    return {"synced_gpus": True} if is_partitioned(model) and get_world_size() > 1 else {}
