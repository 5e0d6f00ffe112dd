"""Weight-saliency mask: updates restricted to the weights the forget loss depends on most.

SalUn (Fan et al. 2024, "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency",
ICLR) and WAGLE (Jia et al. 2024, "WAGLE: Strategic Weight Attribution for Effective and Modular
Unlearning in Large Language Models") restrict unlearning to the salient weights. Here the saliency of
weight ``j`` is the magnitude of the forget-loss gradient at the starting weights θ₀,

    s_j = |∂ L_f(θ₀) / ∂θ_j|,   L_f(θ) = (1/N) Σ_{i ∈ D_f} NLL_θ(y_i|x_i) / |y_i|

(the GA term's gradient up to sign), and the mask keeps the top fraction ``x`` of all trainable
weights, with one global threshold τ over every parameter tensor:

    m_j = [s_j ≥ τ],   τ = the ⌈x·P⌉-th largest s_j,   P = number of trainable weights.

Every optimizer step then uses ``g ⊙ m`` in place of the gradient ``g`` (apply the mask between
``engine.backward`` and ``engine.step``); with Adam(W) and no weight decay the weights outside the
mask stay exactly at θ₀ (their moments stay zero, so their update is ``0/(0+ε) = 0``).

Parameters whose forget gradient is identically zero at θ₀ are not ranked. The case that matters is
LoRA: PEFT starts every adapter with ``B = 0`` (so that ``W + BA = W``), hence
``∂L/∂A = Bᵀ (∂L/∂(BA)) = 0`` exactly for every ``lora_A``, while ``lora_B`` has a real gradient. A
zero there is structural, not a measured lack of influence; ranking it would drop every ``lora_A``
weight from any mask with ``x`` below the share of non-zero gradients (and keep all of them above it).
So τ is the ``⌈x·R⌉``-th largest saliency over the ``R`` weights of tensors with a non-zero gradient,
those tensors get ``m_j = [s_j ≥ τ]``, and tensors with an identically zero gradient are left
unmasked (trained as without saliency) with a warning naming them. SalUn and WAGLE rank full weights
and do not treat this case; this rule is ours. If no tensor has a non-zero gradient the mask is
refused (``ValueError``).

Distributed: under ZeRO-3 every rank holds only a flat partition of each parameter and of its
gradient (``ds_tensor``, ``⌈numel/world⌉`` elements, the last one padded). The mask lives on those
partitions (``bool``, the size of the local gradient partition) and is applied through DeepSpeed's
``safe_get_local_grad`` / ``safe_set_local_grad``. The threshold is exact and global without
gathering the magnitudes: non-negative float32 values order like their int32 bit patterns, so a
binary search over the 31-bit patterns finds τ with one ``all_reduce`` of a count per probe
(:func:`global_kth_largest`). At ZeRO 0-2 every rank sees whole gradients
(``safe_get_full_grad`` / ``safe_set_full_grad``), and the same code runs with no reduction. A plain
``nn.Module`` (no DeepSpeed) takes the ZeRO 0 path, which gives the single-process mask.

Data parallel (a DeepSpeed engine at any stage, or a ``DistributedDataParallel`` module, e.g. the HF
Trainer's DDP path): rank ``r`` of ``w`` scores only the forget examples ``r, r+w, ...`` with the loss
``(w/N) Σ_{i on rank} NLL_i/|y_i|``; the backward averages gradients over ranks (DeepSpeed's reduction or
DDP's all-reduce), so every rank ends with ``(1/N) Σ_{i ∈ D_f} ∇ NLL_i/|y_i|``, the gradient of ``L_f``
above, and at ZeRO 0-2 and DDP every rank then computes the same mask as one process. A plain module
inside a process group averages nothing, so it scores the whole forget set on its own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dist_unlearn.models.logprobs import forward_sequence_stats

Batch = dict[str, torch.Tensor]
_BITS_OF_INF = 0x7F800000  # int32 pattern of +inf; finite non-negative floats lie below it


def _is_engine(model: Any) -> bool:
    return hasattr(model, "zero_optimization_stage") and hasattr(model, "module")


def _is_ddp(model: Any) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def data_parallel_world(model: Any) -> tuple[int, int]:
    """``(rank, world)`` over which ``model``'s backward averages gradients: the process group for a
    DeepSpeed engine or a ``DistributedDataParallel`` module, ``(0, 1)`` for a plain module (its
    backward reduces nothing across ranks, so it must see every example itself)."""
    return _world() if _is_engine(model) or _is_ddp(model) else (0, 1)


@dataclass
class _Slot:
    """One trainable parameter as this rank sees its gradient.

    partitioned: ZeRO-3 flat partition (``start``: first element of the flattened parameter held
    here; ``valid``: how many of the partition's elements are real, the rest is padding); otherwise
    the whole gradient (``start = 0``, ``valid = numel``).
    """

    name: str
    param: torch.nn.Parameter
    partitioned: bool
    start: int
    valid: int

    @property
    def device(self) -> torch.device:
        """Where this rank's share of the parameter lives (read without needing a gradient)."""
        return self.param.ds_tensor.device if self.partitioned else self.param.device

    def get(self) -> torch.Tensor:
        """The gradient elements this rank owns, flat ``[valid]`` (fp32 copy)."""
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        if self.partitioned:
            return safe_get_local_grad(self.param).reshape(-1)[: self.valid].float().clone()
        grad = safe_get_full_grad(self.param)
        if grad is None:
            raise RuntimeError(f"saliency: parameter {self.name} has no gradient (call it after backward)")
        return grad.reshape(-1).float().clone()

    def set(self, value: torch.Tensor) -> None:
        """Write ``value`` (``[valid]``) back as this rank's gradient of the parameter."""
        from deepspeed.utils import safe_get_local_grad, safe_set_full_grad, safe_set_local_grad

        if self.partitioned:
            local = safe_get_local_grad(self.param)
            full = local.reshape(-1).clone()
            full[: self.valid] = value.to(full.dtype)
            safe_set_local_grad(self.param, full.view_as(local))
        else:  # ZeRO 1/2 keep fp32 gradient fragments; a plain .grad is cast by copy_
            safe_set_full_grad(self.param, value.view(self.param.shape))


def _slots(model: Any) -> tuple[list[_Slot], bool]:
    """The trainable parameters of ``model`` (engine, DDP module or plain module; named as in the
    module inside a wrapper) and whether they are partitioned over ranks (ZeRO-3 with more than one rank)."""
    module = model.module if _is_engine(model) or _is_ddp(model) else model
    rank, world = _world()
    zero3 = _is_engine(model) and model.zero_optimization_stage() == 3
    slots = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if zero3:
            part = p.ds_tensor.numel()
            start = rank * part
            slots.append(_Slot(name, p, True, start, max(0, min(part, p.ds_numel - start))))
        else:
            slots.append(_Slot(name, p, False, 0, p.numel()))
    if not slots:
        raise ValueError("saliency: the model has no trainable parameters")
    return slots, zero3 and world > 1


def _sum_over_ranks(value: int, partitioned: bool) -> int:
    if not partitioned:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def global_kth_largest(values: torch.Tensor, k: int, partitioned: bool) -> float:
    """The exact ``k``-th largest of the non-negative float32 ``values`` held by all ranks together.

    ``values`` is this rank's share (disjoint shares when ``partitioned``; otherwise every rank holds
    all values and nothing is reduced). Non-negative IEEE floats order like their int32 bit patterns,
    so a binary search over patterns ``t`` for the largest with ``#{v ≥ t} ≥ k`` finds the value in
    31 probes, each one ``all_reduce`` of a single count; no magnitudes are gathered.
    """
    total = _sum_over_ranks(values.numel(), partitioned)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    bits = values.float().clamp(min=0).nan_to_num(0.0, posinf=0.0).contiguous().view(torch.int32)
    lo, hi = 0, _BITS_OF_INF + 1  # count(lo) = total ≥ k, count(hi) = 0 < k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _sum_over_ranks(int((bits >= mid).sum()), partitioned) >= k:
            lo = mid
        else:
            hi = mid
    return float(torch.tensor([lo], dtype=torch.int32).view(torch.float32).item())


class SaliencyMask:
    """A 0/1 mask over the trainable weights, held as each rank's share (see the module doc).

    Build it with :func:`forget_saliency_mask` (or :meth:`from_gradients` after your own backward);
    call :meth:`apply` after every ``backward`` and before ``step``.
    """

    def __init__(
        self,
        slots: list[_Slot],
        masks: list[torch.Tensor],
        partitioned: bool,
        threshold: float,
        unranked: Sequence[str] = (),
    ) -> None:
        self._slots, self._masks, self._partitioned = slots, masks, partitioned
        self.threshold = threshold
        """τ: the smallest saliency kept."""
        self.total = _sum_over_ranks(sum(s.valid for s in slots), partitioned)
        """P: trainable weights in the whole model."""
        self.unranked = tuple(unranked)
        """Names of the parameters with an identically zero gradient, left unmasked (e.g. LoRA ``lora_A``)."""
        skip = set(self.unranked)
        self.ranked = _sum_over_ranks(sum(s.valid for s in slots if s.name not in skip), partitioned)
        """R: weights of the parameters that were ranked (gradient not identically zero)."""
        self.selected = _sum_over_ranks(sum(int(m.sum()) for m in masks), partitioned)
        """Weights inside the mask: ⌈x·R⌉ ranked ones (more only when several saliencies equal τ) plus
        every weight of the unranked parameters."""

    @property
    def fraction(self) -> float:
        """Selected share of all trainable weights."""
        return self.selected / self.total

    @classmethod
    def from_gradients(cls, model: Any, fraction: float) -> SaliencyMask:
        """The top-``fraction`` mask of the gradient magnitudes currently held by ``model`` (an engine
        between backward and step, or a plain module after ``loss.backward()``). Collective under ZeRO-3."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"saliency fraction must be in (0, 1], got {fraction}")
        slots, partitioned = _slots(model)
        magnitudes = [slot.get().abs() for slot in slots]
        nonzero = torch.tensor([int((m > 0).sum()) for m in magnitudes], dtype=torch.int64)
        if partitioned:
            dist.all_reduce(nonzero)
        ranked = [bool(n > 0) for n in nonzero.tolist()]
        if not any(ranked):
            raise ValueError(
                "saliency: the forget-loss gradient is zero for every trainable weight, so no weight can be "
                "ranked. Fix: check that the forget examples have answer tokens, or set method.saliency=1"
            )
        unranked = [slot.name for slot, r in zip(slots, ranked, strict=True) if not r]
        flat = torch.cat([m for m, r in zip(magnitudes, ranked, strict=True) if r] or [torch.zeros(0)])
        total = _sum_over_ranks(flat.numel(), partitioned)
        threshold = global_kth_largest(flat, max(1, math.ceil(fraction * total)), partitioned)
        masks = [
            m >= threshold if r else torch.ones_like(m, dtype=torch.bool)
            for m, r in zip(magnitudes, ranked, strict=True)
        ]
        if unranked and _world()[0] == 0:
            shown = ", ".join(unranked[:4]) + (f", ... ({len(unranked)} in all)" if len(unranked) > 4 else "")
            lora = (
                " (LoRA starts with lora_B = 0, so every lora_A gradient is exactly 0)"
                if any("lora_A" in n for n in unranked)
                else ""
            )
            warnings.warn(
                f"saliency: {len(unranked)} parameter tensors have an identically zero forget gradient{lora}; "
                f"they are not ranked and stay trainable outside the mask: {shown}",
                stacklevel=2,
            )
        return cls(slots, masks, partitioned, threshold, unranked)

    def apply(self, model: Any = None) -> None:
        """Zero the gradient outside the mask: ``g ← g ⊙ m`` on this rank's share. Call between
        ``engine.backward(loss)`` and ``engine.step()`` on every rank. ``model`` is accepted for
        readability (the mask already knows its parameters)."""
        for slot, mask in zip(self._slots, self._masks, strict=True):
            grad = slot.get()
            slot.set(grad * mask.to(grad.device))  # no copy unless the gradient lives elsewhere (offload)

    def full_masks(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole mask (``bool``, parameter shape), by parameter name. Collective under
        ZeRO-3 (partitions are all-gathered); for saving or inspecting, not needed for training."""
        out = {}
        for slot, mask in zip(self._slots, self._masks, strict=True):
            if not self._partitioned:
                out[slot.name] = mask.view(getattr(slot.param, "ds_shape", slot.param.shape)).clone()
                continue
            part = slot.param.ds_tensor.numel()
            padded = torch.zeros(part, dtype=torch.uint8)
            padded[: slot.valid] = mask.to(torch.uint8)
            pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
            dist.all_gather(pieces, padded)
            out[slot.name] = torch.cat(pieces)[: slot.param.ds_numel].bool().view(slot.param.ds_shape)
        return out


def _backward(model: Any, loss: torch.Tensor) -> None:
    if _is_engine(model):
        model.backward(loss)
    else:
        loss.backward()


def _clear_gradients(model: Any) -> None:
    if _is_engine(model) and model.zero_optimization():
        model.optimizer.zero_grad(set_to_none=True)
    else:
        module = model.module if _is_engine(model) else model
        module.zero_grad(set_to_none=True)


def forget_saliency_mask(model: Any, forget_batch: Batch, num_examples: int, fraction: float) -> SaliencyMask:
    """SalUn's mask from one backward of the forget NLL at the current weights; gradients cleared after.

    Args:
        model: a DeepSpeed engine (any ZeRO stage), a ``DistributedDataParallel`` module (both
            collective) or a plain module (single process).
        forget_batch: this rank's share of the forget examples (``collate_qa`` dict, ``[b, T]``).
        num_examples: N, the forget examples over all ranks together (for an engine or DDP; ``b`` otherwise).
        fraction: x ∈ (0, 1], the share of trainable weights kept.
    Returns:
        The mask of ``|∇ (1/N) Σ_i NLL_i/|y_i||`` (module doc); DeepSpeed and DDP average gradients over
        the ``w`` ranks, so each rank's loss is ``(w/N) Σ_{i on rank} NLL_i/|y_i|``.
    """
    world = data_parallel_world(model)[1]
    stats = forward_sequence_stats(model, forget_batch)
    loss = stats.mean_nll.sum() * (world / num_examples)
    _backward(model, loss)
    mask = SaliencyMask.from_gradients(model, fraction)
    _clear_gradients(model)
    return mask


def rank_share(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Every ``world``-th index starting at ``rank``: a disjoint split of the forget set over ranks."""
    return list(indices)[rank::world]


def saliency_mask_for_run(
    model: Any, forget_set: Any, pad_token_id: int, fraction: float, device: torch.device | str = "cpu"
) -> SaliencyMask | None:
    """The mask of a run (``method.saliency``) from every forget example, or ``None`` when ``fraction == 1``.

    Each rank of an engine or DDP module scores every ``world``-th example of ``forget_set`` (a
    ``QADataset``) in one batch and the backward averages over ranks, so the gradient is that of the
    whole forget set (a plain module scores all of it). Collective for an engine or DDP module. Call it
    before loading a checkpoint: the saliency belongs to the starting weights θ₀.
    """
    from dist_unlearn.data.qa import collate_qa

    if fraction >= 1.0:
        return None
    rank, world = data_parallel_world(model)
    share = rank_share(range(len(forget_set)), rank, world)
    if not share:
        raise ValueError(f"saliency needs a forget example on every rank: {len(forget_set)} examples, {world} ranks")
    batch = {k: v.to(device) for k, v in collate_qa([forget_set[i] for i in share], pad_token_id).items()}
    mask = forget_saliency_mask(model, batch, len(forget_set), fraction)
    if rank == 0:
        unranked = f"; {len(mask.unranked)} tensors with zero gradient left unmasked" if mask.unranked else ""
        print(
            f"saliency: updating {mask.selected}/{mask.total} weights ({mask.fraction:.2%}), "
            f"|forget gradient| >= {mask.threshold:.3g}{unranked}",
            flush=True,
        )
    return mask
