"""Continual unlearning with one LoRA adapter per forget request, kept orthogonal to earlier ones.

O3 (Gao et al. 2025, "On Large Language Model Continual Unlearning") trains, for each new unlearning
request t, its own LoRA adapter and regularises it to be orthogonal to the adapters of requests < t, so
that a later request does not undo (or interfere with) earlier ones; the orthogonality term follows
O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").
With LoRA ``ΔW = (α/r)·B A`` (``A [r, d_in]``, ``B [d_out, r]``) the rows of ``A`` span the input
subspace an adapter reads; the penalty for the new adapter ``n`` is

    L_orth = Σ_{o < n} Σ_{modules m} ‖A_n^m (A_o^m)ᵀ‖_F²          ([r, r] per module and pair)

added as ``λ·L_orth`` to the unlearning loss (only ``A_n`` receives its gradient; earlier adapters
are frozen). O3's OOD detector (which decides at inference whether an input is near forgotten data
and only then applies the adapters) is not implemented: adapters here are applied unconditionally.

The adapters are ``peft`` adapters of one ``PeftModel``; :func:`activate_adapters` applies any subset
of them together (``Σ_k ΔW_k``) and chooses which one trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_a_matrices(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """``A [r, d_in]`` of ``adapter`` for every LoRA-wrapped module of ``model``, by module name."""
    out = {name: m.lora_A[adapter].weight for name, m in _lora_layers(model) if adapter in m.lora_A}
    if not out:
        raise ValueError(f"model has no LoRA adapter named {adapter!r}")
    return out


def orthogonality_penalty(model: torch.nn.Module, new: str, earlier: Sequence[str]) -> torch.Tensor:
    """``Σ_{o ∈ earlier} Σ_m ‖A_new^m (A_o^m)ᵀ‖_F²`` (module doc); a 0-d tensor, 0 when ``earlier`` is empty.

    Differentiable in ``A_new`` (and in ``A_o`` if those require grad). Needs whole ``A`` matrices:
    not for ZeRO-3, which partitions parameters outside the forward.
    """
    a_new = lora_a_matrices(model, new)
    total = next(iter(a_new.values())).new_zeros(())
    for old in earlier:
        a_old = lora_a_matrices(model, old)
        for name, a in a_new.items():
            total = total + (a @ a_old[name].detach().T.to(a)).pow(2).sum()
    return total


def normalized_overlap(model: torch.nn.Module, first: str, second: str) -> float:
    """``Σ_m ‖A_1 A_2ᵀ‖_F² / Σ_m ‖A_1‖_F²‖A_2‖_F²`` ∈ [0, 1]: 0 for orthogonal row spaces in every module."""
    a1, a2 = lora_a_matrices(model, first), lora_a_matrices(model, second)
    num = sum(float((a1[m] @ a2[m].T).pow(2).sum()) for m in a1)
    den = sum(float(a1[m].pow(2).sum() * a2[m].pow(2).sum()) for m in a1)
    return num / den if den > 0 else 0.0


def activate_adapters(peft_model: Any, names: Sequence[str], trainable: str | None = None) -> None:
    """Apply exactly the adapters ``names`` (their updates add up); only ``trainable`` (if given) requires grad.

    ``names = []`` runs the base model alone (every adapter disabled for the forward).
    """
    if trainable is not None and trainable not in names:
        raise ValueError(f"trainable adapter {trainable!r} must be among the active ones {list(names)}")
    if names:
        peft_model.base_model.set_adapter(list(names))
    for _, layer in _lora_layers(peft_model):
        layer.enable_adapters(bool(names))
    marker = f".{trainable}." if trainable is not None else None
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(marker is not None and marker in name)


def add_request_adapter(peft_model: Any, name: str, like: str) -> None:
    """Add a fresh LoRA adapter ``name`` with the settings of the existing adapter ``like``."""
    import copy

    peft_model.add_adapter(name, copy.deepcopy(peft_model.peft_config[like]))


def split_requests(people: Sequence[str], num_requests: int) -> list[list[str]]:
    """Split ``people`` in order into ``num_requests`` consecutive non-empty groups (sizes differ by ≤ 1)."""
    if not 1 <= num_requests <= len(people):
        raise ValueError(
            f"continual.num_requests={num_requests} needs between 1 and {len(people)} forget people "
            f"(there are {len(people)}). Fix: set continual.num_requests to at most {len(people)}"
        )
    base, extra = divmod(len(people), num_requests)
    groups, start = [], 0
    for k in range(num_requests):
        size = base + (1 if k < extra else 0)
        groups.append(list(people[start : start + size]))
        start += size
    return groups
