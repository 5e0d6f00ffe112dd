"""Reference models π_ref for objectives that compare against the model before unlearning.

One interface, five strategies (``method.reference``), chosen per run by memory budget:

============== ===================================================================== ===============
mode           what is held                                                          serves
============== ===================================================================== ===============
none           nothing (reference-free methods never load one)                       —
adapter_disabled the training engine itself, run with its LoRA adapters switched off  seq, logits, hidden
               (no second copy; exact while LoRA's B starts at zero)
cached         π_ref's answer log-probs (and, if small, activations) computed once   seq, hidden
               before training and any checkpoint load, sharded over ranks, keyed
               by dataset index
sharded        a frozen second DeepSpeed ZeRO-3 engine (``requires_grad=False``, no   seq, logits, hidden
               optimizer state): each rank stores 1/W of the weights
quantized      a frozen 4-bit (bitsandbytes nf4) copy of the starting model           seq, logits, hidden
               (close to, not equal to, the full-precision π_ref)
============== ===================================================================== ===============

Every method is collective-safe under ZeRO-3: a reference forward goes through the (reference)
engine's own ``forward``, and objectives call it the same number of times on every rank.

Kinds: ``seq`` = summed answer log-probs ``log π_ref(y|x)`` ``[b]``; ``hidden`` = module outputs at
named layers ``[b, T, H]``; ``logits`` = π_ref's output head applied to π_ref's final hidden states, one
chunk of scored positions at a time (see :func:`dist_unlearn.models.chunked_lm.token_values`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dist_unlearn.config.schema import REFERENCE_STRATEGIES, RunConfig
from dist_unlearn.data.qa import QADataset, collate_qa
from dist_unlearn.distributed.env import initialize_deepspeed
from dist_unlearn.distributed.sharded import sharded_map
from dist_unlearn.eval.answers import score_dataset
from dist_unlearn.eval.modes import eval_mode
from dist_unlearn.models.chunked_lm import HiddenStates, forward_hidden, output_head, unwrap_model
from dist_unlearn.models.logprobs import forward_sequence_stats
from dist_unlearn.unlearning.batch import Batch

REFERENCE_MODES = REFERENCE_STRATEGIES  # the config lists them (config/schema.py): one source
SERVES: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "adapter_disabled": frozenset({"seq", "logits", "hidden"}),
    "cached": frozenset({"seq", "hidden"}),
    "sharded": frozenset({"seq", "logits", "hidden"}),
    "quantized": frozenset({"seq", "logits", "hidden"}),
}
"""Which kinds of π_ref quantities each mode can provide."""

MAX_CACHED_ELEMENTS = 1 << 25
"""Largest activation cache (values, fp32: 128 MiB per rank) the ``cached`` mode accepts."""


class Reference(ABC):
    """Interface of every reference strategy; see the module docstring. ``mode`` names the strategy
    (``none`` builds no reference at all: :func:`build_reference` returns None)."""

    mode: str = "none"

    @abstractmethod
    def sequence_logprob(self, name: str, batch: Batch) -> torch.Tensor:
        """``log π_ref(y_i|x_i)`` summed over answer tokens, ``[b]``, no gradient. ``name`` is the
        sub-batch (``forget``, ``idk``, ...); cached references look rows up by ``batch["index"]``."""

    @abstractmethod
    def hidden(self, name: str, batch: Batch, layer_names: Sequence[str] = ()) -> HiddenStates:
        """π_ref's final hidden states ``[b, T, H]`` and the outputs of ``layer_names``, no gradient."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """π_ref's output head on π_ref hidden states ``[c, H] -> [c, V]`` (fp32 at least), no gradient."""


class ModelReference(Reference):
    """π_ref as a module or engine run under ``no_grad`` (modes ``adapter_disabled``, ``sharded``, ``quantized``).

    Args:
        mode: the strategy name (reported in the run summary).
        model: the reference module or DeepSpeed engine; for ``adapter_disabled`` the training engine.
        disable_adapter: run it inside PEFT's ``disable_adapter()`` (the base weights only).
    """

    def __init__(self, mode: str, model: torch.nn.Module, disable_adapter: bool = False) -> None:
        self.mode, self.model, self.disable_adapter = mode, model, disable_adapter
        if disable_adapter and not hasattr(unwrap_model(model), "disable_adapter"):
            raise ValueError(
                "method.reference=adapter_disabled needs a LoRA model. Fix: set model.lora.r (e.g. model.lora.r=8) "
                "or choose method.reference=cached|sharded"
            )

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.disable_adapter:
                stack.enter_context(unwrap_model(self.model).disable_adapter())
            yield

    def sequence_logprob(self, name: str, batch: Batch) -> torch.Tensor:
        with self._frozen():
            return forward_sequence_stats(self.model, batch).logprob.detach()

    def hidden(self, name: str, batch: Batch, layer_names: Sequence[str] = ()) -> HiddenStates:
        own = _own_names(self.model, layer_names)
        with self._frozen():
            out = forward_hidden(self.model, batch, list(own))
        return HiddenStates(out.final.detach(), {own[k]: v.detach() for k, v in out.layers.items()})

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._frozen():
            z = output_head(self.model)(hidden.to(_param_dtype(self.model, hidden.dtype)))
        return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _own_names(model: torch.nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Map requested layer names (as named in the *trained* model, maybe PEFT-prefixed) to this model's
    module names by the longest common dotted suffix; returns ``{own_name: requested_name}``."""
    modules = {n for n, _ in unwrap_model(model).named_modules()}
    out: dict[str, str] = {}
    for requested in names:
        parts = requested.split(".")
        own = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in modules), None)
        if own is None:
            own = next((m for m in sorted(modules, key=len) if m.endswith("." + requested)), None)
        if own is None:
            raise ValueError(f"the reference model has no module matching {requested!r}")
        out[own] = requested
    return out


def _param_dtype(model: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    head = output_head(model)
    for p in head.parameters():
        return p.dtype if p.is_floating_point() else default
    return default


class CachedReference(Reference):
    """Precomputed π_ref values keyed by dataset index (mode ``cached``).

    Args:
        logprobs: sub-batch name → ``[N]`` summed answer log-probs of that dataset.
        activations: sub-batch name → layer name → ``(values [N, L, H], lengths [N])`` (right-padded to
            the dataset's ``max_length`` ``L``).
    """

    mode = "cached"

    def __init__(
        self,
        logprobs: dict[str, torch.Tensor],
        activations: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
    ) -> None:
        self.logprobs, self.activations = logprobs, activations or {}

    def sequence_logprob(self, name: str, batch: Batch) -> torch.Tensor:
        if name not in self.logprobs:
            raise ValueError(f"the cached reference holds no log-probs for '{name}' (cached: {sorted(self.logprobs)})")
        index = batch["index"].cpu()
        return self.logprobs[name][index].to(batch["input_ids"].device)

    def hidden(self, name: str, batch: Batch, layer_names: Sequence[str] = ()) -> HiddenStates:
        stored = self.activations.get(name, {})
        missing = [n for n in layer_names if n not in stored]
        if not layer_names or missing:
            raise ValueError(
                f"the cached reference holds activations only for {name}:{sorted(stored)}; asked for "
                f"{list(layer_names) or 'final hidden states'}. Fix: method.reference=sharded (or adapter_disabled)"
            )
        index, width = batch["index"].cpu(), batch["input_ids"].shape[1]
        device = batch["input_ids"].device
        layers = {n: stored[n][0][index, :width].to(device) for n in layer_names}
        return HiddenStates(torch.empty(0, device=device), layers)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "method.reference=cached stores no reference logits (token-level KL/UNDIAL need them). "
            "Fix: method.reference=sharded, quantized, or adapter_disabled with model.lora.r>0"
        )


def cached_reference(
    model: torch.nn.Module,
    seq_datasets: dict[str, QADataset],
    pad_token_id: int,
    hidden_datasets: dict[str, QADataset] | None = None,
    layer_names: Sequence[str] = (),
    device: torch.device | str = "cpu",
    max_elements: int = MAX_CACHED_ELEMENTS,
) -> CachedReference:
    """Compute the cache once with ``model`` (call it before any checkpoint is loaded).

    Collective: the datasets are scored sharded over ranks and all-gathered, so every rank holds the
    whole table (``[N]`` log-probs per dataset; ``[N, L, H]`` activations per dataset and layer).

    Raises:
        ValueError: the activations would exceed ``max_elements`` values (message names the fix).
    """
    # sorted: every rank must score the datasets in the same order (collectives; set order varies per process)
    logprobs = {
        name: score_dataset(model, seq_datasets[name], pad_token_id, device=device)[:, 0]
        for name in sorted(seq_datasets)
    }
    activations: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    hidden_size = int(getattr(unwrap_model(model).config, "hidden_size", 0))
    for name, ds in sorted((hidden_datasets or {}).items()):
        size = len(ds) * ds.max_length * hidden_size * max(1, len(layer_names))
        if size > max_elements:
            raise ValueError(
                f"method.reference=cached: caching π_ref activations of '{name}' needs {size * 4 / 2**20:.0f} MiB "
                f"(limit {max_elements * 4 / 2**20:.0f} MiB). Fix: method.reference=sharded (or adapter_disabled)"
            )
        activations[name] = _cache_activations(model, ds, pad_token_id, layer_names, hidden_size, device)
    return CachedReference(logprobs, activations)


def _cache_activations(
    model: torch.nn.Module,
    dataset: QADataset,
    pad_token_id: int,
    layer_names: Sequence[str],
    hidden_size: int,
    device: torch.device | str,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    width = dataset.max_length

    def score(indices: Sequence[int]) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collate_qa([dataset[i] for i in indices], pad_token_id).items()}
        out = forward_hidden(model, batch, layer_names)
        rows = []
        for name in layer_names:
            h = out.layers[name].float()
            padded = h.new_zeros(h.shape[0], width, hidden_size)
            padded[:, : h.shape[1]] = h
            rows.append(padded.flatten(1))
        return torch.cat(rows, dim=1)

    with torch.no_grad(), eval_mode(model):
        flat = sharded_map(len(dataset), 8, score, device=device)
    lengths = torch.tensor([len(dataset[i]["input_ids"]) for i in range(len(dataset))])
    parts = flat.view(len(dataset), len(layer_names), width, hidden_size)
    return {name: (parts[:, k].contiguous(), lengths) for k, name in enumerate(layer_names)}


def sharded_reference(
    model_path: str | Path,
    micro_batch_size: int,
    dtype: str = "fp32",
    attn_implementation: str = "auto",
    device: torch.device | str = "cpu",
) -> ModelReference:
    """A frozen ZeRO-3 DeepSpeed engine of the model at ``model_path`` with no optimizer.

    Each rank keeps ``1/W`` of the weights (ZeRO-3 partitioning) whatever stage the trained engine
    uses; no gradients, no optimizer state. The model is read in full on each rank before being
    partitioned (for models larger than one host's memory, load under ``deepspeed.zero.Init``).
    Collective: every rank must call it, and then call the reference the same number of times.
    One process without a process group (e.g. a plain ``Trainer`` on one device) has nothing to shard
    over: the reference is then the frozen model itself on ``device`` in ``dtype``, what a 1-rank ZeRO-3
    engine would hold.
    """
    from dist_unlearn.models.loading import load_causal_lm

    model = load_causal_lm(model_path, torch.float32, attn_implementation)
    model.requires_grad_(False)
    model.eval()
    if not torch.distributed.is_initialized():
        weights = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
        return ModelReference("sharded", model.to(device=device, dtype=weights))
    config = {
        "train_micro_batch_size_per_gpu": max(1, micro_batch_size),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
    }
    return ModelReference("sharded", initialize_deepspeed(model, config))


def quantized_reference(
    model_path: str | Path, quantization: str = "nf4", dtype: torch.dtype = torch.float32, device: Any = "cpu"
) -> ModelReference:
    """A frozen bitsandbytes 4-bit (``nf4``/``fp4``) copy of the model at ``model_path`` on every rank.

    About 1/8 of the fp32 weights' memory per rank; its log-probs differ from the full-precision
    π_ref by the quantization error (tests bound it).
    """
    from transformers import AutoModelForCausalLM

    from dist_unlearn.models.loading import choose_attn_implementation
    from dist_unlearn.models.quantization import load_quantized

    if quantization not in ("nf4", "fp4"):
        raise ValueError(f"quantized reference: quantization must be nf4 or fp4, got {quantization!r}")
    model = load_quantized(AutoModelForCausalLM, model_path, quantization, dtype, choose_attn_implementation("auto"))
    model.requires_grad_(False)
    model.eval()
    if torch.device(device).type == "cuda":
        model.to(device)
    return ModelReference("quantized", model)


def choose_reference_mode(
    kinds: frozenset[str] | set[str],
    requested: str,
    *,
    lora: bool,
    method: str,
    field: str = "method.reference",
    lora_fix: str = "set model.lora.r (e.g. model.lora.r=8)",
    lora_option: str = "adapter_disabled with model.lora.r>0",
) -> str:
    """The reference strategy for an objective that reads the π_ref ``kinds`` (``objective.needs.reference``).

    A reference-free objective (no kinds) always gets ``none`` (nothing is loaded, whatever was asked).
    Otherwise ``auto`` picks ``adapter_disabled`` with LoRA (no second copy), ``sharded`` when π_ref
    token logits are needed (KL, UNDIAL), else ``cached``. ``field``, ``lora_fix`` and ``lora_option``
    word the error messages for the caller (a config field, or a constructor argument).

    Raises:
        ValueError: the mode cannot serve what the objective needs, or cannot run with this model;
            the message names ``field`` and the fix.
    """
    if not kinds:
        return "none"
    if requested == "auto":
        return "adapter_disabled" if lora else ("sharded" if "logits" in kinds else "cached")
    if requested == "none":
        raise ValueError(
            f"{field}: '{method}' needs a reference model but {field}=none. "
            f"Fix: {field}=auto (or cached/sharded/adapter_disabled/quantized)"
        )
    if requested not in SERVES:
        raise ValueError(f"{field}: unknown mode {requested!r}. Fix: one of auto, {', '.join(REFERENCE_MODES)}")
    missing = sorted(set(kinds) - SERVES[requested])
    if missing:
        raise ValueError(
            f"{field}: '{method}' needs π_ref {', '.join(missing)} which {field}={requested} cannot "
            "provide (cached holds sequence log-probs and small activations, not token logits). "
            f"Fix: {field}=sharded (or quantized, or {lora_option})"
        )
    if requested == "adapter_disabled" and not lora:
        raise ValueError(
            f"{field}: '{method}' with {field}=adapter_disabled needs LoRA adapters. "
            f"Fix: {lora_fix}, or {field}=cached|sharded"
        )
    if requested == "quantized" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{field}=quantized needs bitsandbytes. Fix: pip install bitsandbytes, or {field}=sharded")
    return requested


def build_reference(
    mode: str,
    engine: torch.nn.Module,
    *,
    model_path: str | Path | None = None,
    pad_token_id: int = 0,
    seq_datasets: dict[str, QADataset] | None = None,
    hidden_datasets: dict[str, QADataset] | None = None,
    layer_names: Sequence[str] = (),
    micro_batch_size: int = 1,
    dtype: str = "fp32",
    device: torch.device | str = "cpu",
) -> Reference | None:
    """The reference of ``mode`` (one of :data:`REFERENCE_MODES`) for a training ``engine``.

    Args:
        engine: the model being trained (module or DeepSpeed engine) in its starting state; used by
            ``adapter_disabled`` (same engine) and ``cached`` (scores the datasets now).
        model_path: the starting model's directory (``sharded``, ``quantized``).
        seq_datasets / hidden_datasets / layer_names: what ``cached`` precomputes (sub-batch name →
            dataset, indexed like the batches' ``index``).
        micro_batch_size, dtype: ``sharded`` engine settings.
    Returns:
        ``None`` for ``none``, else a :class:`Reference`. Collective for ``cached`` and ``sharded``.
    """
    if mode == "none":
        return None
    if mode == "adapter_disabled":
        return ModelReference(mode, engine, disable_adapter=True)
    if mode == "cached":
        return cached_reference(engine, seq_datasets or {}, pad_token_id, hidden_datasets, layer_names, device=device)
    if model_path is None:
        raise ValueError(f"method.reference={mode} needs the starting model's path")
    if mode == "sharded":
        return sharded_reference(model_path, micro_batch_size, dtype, device=device)
    if mode == "quantized":
        return quantized_reference(model_path, "nf4", device=device)
    raise ValueError(f"method.reference: unknown mode {mode!r}; one of {', '.join(REFERENCE_MODES)}")


def resolve_reference_mode(cfg: RunConfig, name: str, objective: Any) -> str:
    """The reference strategy of method ``name`` in this run (``objective``: its built objective).

    A reference-free objective always gets ``none`` (nothing is loaded, whatever ``method.reference``
    says). Otherwise ``auto`` picks ``adapter_disabled`` with LoRA (no second copy), ``sharded`` when
    π_ref token logits are needed (KL, UNDIAL), else ``cached``.

    Raises:
        ValueError: the mode cannot serve what the objective needs, or cannot run with this model;
            the message names ``method.reference`` and the fix.
    """
    return choose_reference_mode(
        objective.needs.reference, cfg.method.reference, lora=cfg.model.lora.r > 0, method=name
    )
