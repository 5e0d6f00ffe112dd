"""Registry of unlearning objectives: a forget term, an optional retain term and their weights.

``loss = γ·L_forget(D_f) + α·L_retain(D_r)`` with γ = ``forget_weight`` and α = ``retain_weight``.
Objectives are independent of any trainer: call one with a model (plain module, DDP module or a
DeepSpeed engine), a forget batch, a retain batch and, when ``needs_reference``, the reference
model's summed log-probabilities of the forget answers::

    objective = get_objective("npo_gd", beta=0.1)
    out = objective(engine, forget_batch, retain_batch, reference_logprob=ref_lp)
    engine.backward(out.loss)

Batches are the dicts of :func:`dist_unlearn.data.qa.collate_qa` (``input_ids``, ``attention_mask``,
``labels`` ``[b, T]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dist_unlearn.models.logprobs import SequenceStats, forward_sequence_stats
from dist_unlearn.unlearning import terms

Batch = dict[str, torch.Tensor]


@dataclass
class ObjectiveOutput:
    """The scalar loss to backpropagate and detached values to log."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ForgetTerm:
    """A forget loss ``fn(stats, reference_logprob) -> scalar`` and whether it needs π_ref."""

    fn: Callable[[SequenceStats, torch.Tensor | None], torch.Tensor]
    needs_reference: bool = False


@dataclass
class UnlearningObjective:
    """``γ·L_forget + α·L_retain``; see the module docstring for the call convention."""

    name: str
    forget: ForgetTerm
    retain: Callable[[SequenceStats], torch.Tensor] | None
    forget_weight: float = 1.0
    retain_weight: float = 1.0

    @property
    def needs_reference(self) -> bool:
        return self.forget.needs_reference

    @property
    def uses_retain(self) -> bool:
        return self.retain is not None and self.retain_weight != 0.0

    def __call__(
        self,
        model: torch.nn.Module,
        forget_batch: Batch,
        retain_batch: Batch | None = None,
        reference_logprob: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        if self.needs_reference and reference_logprob is None:
            raise ValueError(f"objective '{self.name}' needs reference_logprob (π_ref log-probs of the forget batch)")
        forget_stats = forward_sequence_stats(model, forget_batch)
        forget_loss = self.forget.fn(forget_stats, reference_logprob)
        loss = self.forget_weight * forget_loss
        logs = {
            "forget_loss": float(forget_loss.detach()),
            "forget_nll": float(forget_stats.mean_nll.detach().mean()),
        }
        if self.uses_retain:
            if retain_batch is None:
                raise ValueError(f"objective '{self.name}' has a retain term but got no retain batch")
            assert self.retain is not None
            retain_stats = forward_sequence_stats(model, retain_batch)
            retain_loss = self.retain(retain_stats)
            loss = loss + self.retain_weight * retain_loss
            logs["retain_loss"] = float(retain_loss.detach())
            logs["retain_nll"] = float(retain_stats.mean_nll.detach().mean())
        logs["loss"] = float(loss.detach())
        return ObjectiveOutput(loss, logs)


def _ga(**_: Any) -> ForgetTerm:
    return ForgetTerm(lambda stats, _ref: terms.gradient_ascent_term(stats))


def _npo(beta: float = 0.1, **_: Any) -> ForgetTerm:
    return ForgetTerm(lambda stats, ref: terms.npo_term(stats, ref, beta), needs_reference=True)


def _simnpo(beta: float = 2.5, delta: float = 0.0, **_: Any) -> ForgetTerm:
    return ForgetTerm(lambda stats, _ref: terms.simnpo_term(stats, beta, delta))


# name -> (forget-term factory, accepted params, retain term or None)
_SPECS: dict[str, tuple[Callable[..., ForgetTerm], frozenset[str], Callable[[SequenceStats], torch.Tensor] | None]] = {
    "ga": (_ga, frozenset(), None),
    "grad_diff": (_ga, frozenset(), terms.nll_term),
    "npo": (_npo, frozenset({"beta"}), None),
    "npo_gd": (_npo, frozenset({"beta"}), terms.nll_term),
    "simnpo": (_simnpo, frozenset({"beta", "delta"}), None),
    "simnpo_gd": (_simnpo, frozenset({"beta", "delta"}), terms.nll_term),
}

OBJECTIVES: tuple[str, ...] = tuple(_SPECS)
"""Names accepted by :func:`get_objective`."""


def get_objective(
    name: str, forget_weight: float = 1.0, retain_weight: float = 1.0, **params: Any
) -> UnlearningObjective:
    """Build the objective ``name`` (one of :data:`OBJECTIVES`) with its method parameters.

    Raises:
        ValueError: unknown name, or a parameter the method does not take (the message lists both).
    """
    if name not in _SPECS:
        raise ValueError(f"unknown unlearning method '{name}'. Known methods: {', '.join(OBJECTIVES)}")
    factory, accepted, retain = _SPECS[name]
    unknown = sorted(set(params) - accepted)
    if unknown:
        allowed = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"method '{name}' does not take parameter(s) {', '.join(unknown)}; it accepts: {allowed}")
    return UnlearningObjective(name, factory(**params), retain, forget_weight, retain_weight)


def objective_from_config(cfg: Any, name: str) -> UnlearningObjective:
    """The objective ``name`` of a run config: ``method.forget_weight``/``retain_weight`` as defaults,
    overridden by ``method.params.<name>`` (which may also set ``forget_weight``/``retain_weight``)."""
    params = {"forget_weight": cfg.method.forget_weight, "retain_weight": cfg.method.retain_weight}
    params.update(cfg.method.params.get(name, {}))
    return get_objective(name, **params)
