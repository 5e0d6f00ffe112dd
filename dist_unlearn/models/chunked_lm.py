"""Memory-lean token-level losses for causal LMs: never materialise the full ``[tokens × vocab]`` logits.

The model's decoder runs once and yields the final hidden states ``h`` ``[b, T, H]`` (the causal-LM
forward is asked for the last position's logits only, ``logits_to_keep=1``). Only the *scored* positions
(label ≠ -100) are kept, ``[n, H]``, and the output head (``lm_head``) is applied to chunks of ``c`` of
them at a time. A per-token function ``fn(logits_chunk [c, V], *aligned_chunks) -> [c] | [c, k]`` turns
each chunk into the numbers a loss needs (token log-prob, KL to a reference, a distillation CE, ...).
Under autograd each chunk runs inside :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): its
logits are freed after the forward and recomputed in the backward, so the peak is one chunk's
``[c, V]`` logits and their gradient instead of ``[b·T, V]``. The result is exact (same arithmetic,
chunk by chunk); it works on plain modules, PEFT models and DeepSpeed engines at every ZeRO stage
(the head is called as a module, so ZeRO-3 gathers its weight for each call and for each recompute).

One mechanism serves every caller: :func:`token_values` is used by the sequence statistics of every
objective and metric (:func:`dist_unlearn.models.logprobs.forward_sequence_stats`), by KL/distillation
retain and forget terms, and by the token-level membership-inference scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

CHUNK_ELEMENTS = 1 << 23
"""Default logits elements per chunk (8 M fp32 values = 32 MiB): ``c = max(1, CHUNK_ELEMENTS // V)``."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model inside a DeepSpeed engine or DDP wrapper (PEFT models stay wrapped)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The output projection (``lm_head``) of a causal LM, a PEFT model or a wrapped engine."""
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no output embeddings (not a causal LM?)")
    return head


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The body of a causal LM whose output ``last_hidden_state`` feeds the head (``model.model`` for Llama)."""
    inner = unwrap_model(model)
    while hasattr(inner, "get_base_model") and inner is not inner.get_base_model():  # PEFT
        inner = inner.get_base_model()
    prefix = getattr(inner, "base_model_prefix", "")
    body = getattr(inner, prefix, None) if prefix else None
    if not isinstance(body, torch.nn.Module):
        raise ValueError(f"cannot find the decoder of {type(inner).__name__} (base_model_prefix={prefix!r})")
    return body


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = unwrap_model(model)
    while hasattr(inner, "get_base_model") and inner is not inner.get_base_model():
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


@dataclass
class HiddenStates:
    """Outputs of :func:`forward_hidden`.

    final: ``[b, T, H]``, the input of the output head at every position.
    layers: module name → that module's output tensor (first element when it returns a tuple), for the
        names asked for (e.g. ``model.layers.3`` for RMU-style objectives).
    """

    final: torch.Tensor
    layers: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def _capture_outputs(root: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    captured: dict[str, torch.Tensor] = {}
    modules = dict(root.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in {type(root).__name__}; see model.named_modules()")

    def hook_for(name: str) -> Callable:
        def hook(_module: torch.nn.Module, _args: tuple, output: object) -> None:
            captured[name] = output[0] if isinstance(output, tuple) else output  # type: ignore[assignment]

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_hidden(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], layer_names: Sequence[str] = ()
) -> HiddenStates:
    """Run ``model`` (module, PEFT model or DeepSpeed engine) through its own ``forward`` and return the
    final hidden states plus the outputs of ``layer_names`` (names as in ``unwrap_model(model).named_modules()``).

    The forward goes through ``model(...)`` itself, so DeepSpeed's hooks (ZeRO-3 gathering, autocast)
    run as usual; the full logits are not computed when the model accepts ``logits_to_keep``.
    """
    decoder = _decoder(model)
    root = unwrap_model(model)
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    with _capture_outputs(root, list(layer_names)) as captured:
        final: dict[str, torch.Tensor] = {}

        def grab_final(_m: torch.nn.Module, _a: tuple, output: object) -> None:
            final["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # type: ignore[union-attr,index]

        handle = decoder.register_forward_hook(grab_final)
        try:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        finally:
            handle.remove()
    return HiddenStates(final["h"], dict(captured))


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where hidden state ``t`` predicts a scored label ``t+1``.

    Returns ``(mask [b, T-1] bool, targets [n])`` with ``n = mask.sum()``.
    """
    target = labels[:, 1:]
    mask = target.ne(IGNORE_INDEX)
    return mask, target[mask]


def chunk_size_for(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk's logits hold about ``chunk_elements`` values."""
    return max(1, chunk_elements // max(1, vocab_size))


def token_values(
    fn: Callable[..., torch.Tensor],
    head: torch.nn.Module,
    hidden: torch.Tensor,
    *aligned: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Apply ``fn(head(hidden[i:j]), *(a[i:j] for a in aligned))`` chunk by chunk and concatenate.

    Args:
        fn: per-token function of logits ``[c, V]`` (half precision upcast to fp32) and the aligned
            chunks, returning ``[c]`` or ``[c, k]``.
        head: the output projection module.
        hidden: ``[n, H]`` hidden states of the scored positions.
        aligned: tensors whose first dimension is ``n`` (targets, reference hidden states, ...).
        chunk_size: tokens per chunk; default :func:`chunk_size_for` the head's vocabulary.
    Returns:
        ``[n]`` or ``[n, k]``. Differentiable w.r.t. ``hidden`` and the head's parameters; under autograd
        each chunk's logits are recomputed in the backward instead of stored.
    """
    n = hidden.shape[0]
    if chunk_size is None:
        chunk_size = chunk_size_for(int(getattr(head, "out_features", 0) or _vocab_of(head, hidden)))

    # (a composite head without its own ``weight``, e.g. a logit difference of two heads, applies its parts itself)
    frozen_partitioned = (
        hasattr(head, "weight") and _is_partitioned(head) and not any(p.requires_grad for p in head.parameters())
    )

    def one_chunk(h: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        logits = _gathered_linear(head, h) if frozen_partitioned else head(h)
        return fn(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, *rest)

    needs_graph = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    num_chunks = _agreed_chunk_count(n, chunk_size, head, hidden.device)
    padding = max(0, num_chunks - n)  # every chunk gets at least one row, so every rank calls the head alike
    if padding:
        hidden = torch.cat([hidden, hidden.new_zeros(padding, *hidden.shape[1:])])
        aligned = tuple(torch.cat([a, a.new_zeros(padding, *a.shape[1:])]) for a in aligned)
    bounds = _chunk_bounds(n + padding, num_chunks)
    pieces = []
    for start, stop in bounds:
        args = (hidden[start:stop], *(a[start:stop] for a in aligned))
        pieces.append(checkpoint(one_chunk, *args, use_reentrant=False) if needs_graph else one_chunk(*args))
    if not pieces:
        return hidden.new_zeros(0)
    return torch.cat(pieces, dim=0)[:n]


def _is_partitioned(head: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in head.parameters())


def _gathered_linear(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A frozen ZeRO-3-partitioned linear head (e.g. the base ``lm_head`` under LoRA) applied with a
    temporarily gathered copy of its weight (collective). The module's own hooks do not re-gather a
    frozen weight when the chunk is recomputed in the backward, so the copy is what autograd keeps."""
    import contextlib

    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # only gather what is partitioned now: a tied weight still in use by the embedding is already whole,
    # and re-partitioning it on exit would fail ("still active in submodules")
    missing = [p for p in head.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
    with deepspeed.zero.GatheredParameters(missing) if missing else contextlib.nullcontext():
        weight = head.weight.detach().clone()
        bias = head.bias.detach().clone() if getattr(head, "bias", None) is not None else None
    return torch.nn.functional.linear(h.to(weight.dtype), weight, bias)


def _chunk_bounds(rows: int, num_chunks: int) -> list[tuple[int, int]]:
    """``num_chunks`` contiguous, non-empty (when ``rows ≥ num_chunks``), near-equal row ranges."""
    if num_chunks == 0:
        return []
    edges = [round(i * rows / num_chunks) for i in range(num_chunks + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _agreed_chunk_count(n: int, chunk_size: int, head: torch.nn.Module, device: torch.device) -> int:
    """Chunks to use: ``ceil(n / chunk_size)``, raised to the largest over ranks when the head's weight is
    ZeRO-3 partitioned (each head call gathers it collectively, so all ranks must call it equally often)."""
    count = -(-n // chunk_size)
    partitioned = _is_partitioned(head)
    dist = torch.distributed
    if partitioned and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        agreed = torch.tensor([count], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        count = int(agreed.item())
    return count


def _vocab_of(head: torch.nn.Module, hidden: torch.Tensor) -> int:
    with torch.no_grad():
        return int(head(hidden[:1]).shape[-1]) if hidden.shape[0] else 1


def target_logprob_and_hit(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per token ``[log softmax(z)[y], 1{argmax z = y}]``, shape ``[c, 2]`` (the second column has no gradient)."""
    logp = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    hit = (logits.detach().argmax(-1) == target).to(logp.dtype)
    return torch.stack([logp, hit], dim=-1)


def scatter_per_sequence(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place per-token ``values`` ``[n, ...]`` back into ``[b, T-1, ...]`` (zeros where ``mask`` is False)."""
    out = values.new_zeros((*mask.shape, *values.shape[1:]))
    return out.index_put((mask,), values) if values.numel() else out
