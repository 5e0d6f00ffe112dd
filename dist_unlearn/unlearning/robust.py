"""Robustness options that compose with any unlearning objective (``method.robust``).

**Relearning: sharpness-aware unlearning (``sam``).** Fan, Jia, Zhang, Ramakrishna, Hong and Liu 2025,
"Towards LLM Unlearning Resilient to Relearning Attacks: A Sharpness-Aware Minimization Perspective and
Beyond" (ICML 2025, arXiv:2502.05374). A relearning attack is a small weight change that undoes the
forgetting; the paper treats it as a worst-case perturbation δ of the weights and solves

    min_θ  max_{‖δ‖₂ ≤ ρ}  γ·L_f(θ + δ)  +  α·L_r(θ)

where L_f is the objective's forget term (the loss being minimised: e.g. −NLL for GA, the NPO loss)
and L_r its retain term. **Only the forget term is perturbed**; the retain term is taken at θ (as in
the paper's formulation and its released code, which takes the forget gradient at θ + δ and the
retain gradient at θ and adds them). The inner maximum is solved with one normalised ascent step
(SAM, Foret et al. 2021):

    g = ∇_θ L_f(θ),   δ = ρ · g / ‖g‖₂,
    update direction  =  γ·∇L_f(θ + δ)  +  α·∇L_r(θ),

and the optimizer steps from θ (the weights are restored exactly before the step; they are not moved
by δ). ‖g‖₂ is the norm over every trainable weight of the whole model. Per step this costs three
forward/backward passes (two of the forget term, one of the retain term) instead of one. The paper
uses ρ = 0.01 on MUSE and 0.1 on WMDP; the default here is 0.01. ``γ > 0`` does not change δ (it is
normalised), so δ is computed from the unweighted L_f.

Distributed (:class:`SharpnessAware` on a DeepSpeed engine): DeepSpeed averages gradients over ranks,
so every quantity is that of one process on the global batch. Under ZeRO-3 each rank holds a flat
partition of every parameter (``ds_tensor``) and of its gradient (``safe_get_local_grad``): the
squared norms of the local gradient partitions are summed with one ``all_reduce``, and δ is added to
this rank's partition of the weights (``ds_tensor``), from which the next forward gathers them (the
whole weights ZeRO-3 keeps gathered, e.g. the small ones below ``stage3_param_persistence_threshold``,
are released first, and again before θ is restored, so no stale copy is used). At ZeRO 0-2 and on a
plain module every rank sees whole gradients (``safe_get_full_grad``) and perturbs whole weights.
Only trainable parameters (``requires_grad``) are perturbed: with LoRA only the adapters. The forget
gradient at θ + δ is kept as a copy of this rank's gradient share (fp32) while the retain gradient is
computed; that and a copy of the perturbed weight shares are the memory overhead.

**Quantization: SURE (``sure``).** Zhang, Wang, Li, Wu, Tang, Liu, He, Yin and Wang 2025,
"Catastrophic Failure of LLM Unlearning via Quantization" (ICLR 2025, arXiv:2410.16454). 4-bit
quantization maps weights within one quantization step of each other to the same value, so an
unlearning update smaller than that step is undone by quantizing. SURE updates only the weights that
the forget loss depends on most (a saliency mask) with a larger learning rate, so those weights move
further than the quantization step while the rest of the model (and its utility) stays as it was:

    θ_{t+1} = θ_t − (k·η)·Adam(m ⊙ ∇L(θ_t)),   m = saliency mask of fraction x,

with ``x = fraction`` and ``k = lr_multiplier``. Defaults from the paper's released setup: saliency
threshold at the 90th percentile (x = 0.1) and learning rate 1e-4 against the baselines' 1e-5
(k = 10). The mask is the project's SalUn mask (:mod:`dist_unlearn.unlearning.saliency`: per weight,
|∇L_f| at the starting weights, one global top-x threshold, exact under ZeRO-3). The paper ranks
whole modules (its code: output rows of each weight matrix) by the gradient norm and recomputes the
mask every step; ours is per weight and fixed at θ₀. SURE is therefore ``method.saliency = x`` with
the learning rate multiplied by k; this module only resolves those two numbers
(:func:`robust_plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dist_unlearn.unlearning.batch import Batch, UnlearnBatch
from dist_unlearn.unlearning.context import StepContext
from dist_unlearn.unlearning.objectives import ObjectiveOutput, UnlearningObjective, _GivenForgetLogprobs
from dist_unlearn.unlearning.reference import Reference
from dist_unlearn.unlearning.saliency import _backward, _clear_gradients, _is_engine, _Slot, _slots

ROBUST_METHODS = ("none", "sam", "sure")
"""``method.robust`` names: none, sharpness-aware unlearning (relearning), SURE (quantization)."""

SAM_RHO = 0.01
"""Default ρ of sharpness-aware unlearning (Fan et al. 2025 on MUSE; they use 0.1 on WMDP)."""
SURE_FRACTION = 0.1
"""Default saliency fraction of SURE (Zhang et al. 2025: threshold at the 90th percentile)."""
SURE_LR_MULTIPLIER = 10.0
"""Default learning-rate multiplier of SURE (Zhang et al. 2025: 1e-4 against the baselines' 1e-5)."""


class SharpnessAware:
    """Sharpness-aware unlearning (Fan et al. 2025); see the module docstring for the formula.

    Usage, in place of ``out = objective(model, batch, reference=ref); engine.backward(out.loss)``::

        sam = SharpnessAware(rho=0.01)
        out = sam.backward(engine, objective, batch, reference=ref)  # gradients now hold the SAM direction
        engine.step()

    Works on a DeepSpeed engine (ZeRO 0-3; collective: every rank calls it) or a plain module (one
    process; then call ``optimizer.step()``). ``out.loss`` is ``γ·L_f(θ+δ) + α·L_r(θ)`` (detached);
    ``out.logs`` holds ``forget_loss`` (at θ), ``forget_loss_perturbed`` (at θ + δ), ``retain_loss``,
    ``forget_nll``, ``retain_nll``, ``sam_grad_norm`` (‖∇L_f(θ)‖₂) and ``loss``.
    """

    def __init__(self, rho: float = SAM_RHO) -> None:
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
            raise ValueError(f"method.robust.rho: the SAM radius ρ must be a finite number > 0, got {rho!r}")
        self.rho = float(rho)

    def __repr__(self) -> str:
        return f"SharpnessAware(rho={self.rho:g})"

    def backward(
        self,
        model: Any,
        objective: UnlearningObjective,
        batch: UnlearnBatch | Batch,
        reference: Reference | torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Leave ``γ·∇L_f(θ + δ) + α·∇L_r(θ)`` in ``model``'s gradients, the weights exactly at θ.

        Args:
            model: a DeepSpeed engine (any ZeRO stage) or a plain module; gradients must be clear.
            objective: any registered objective; its forget term is perturbed, its retain term is not.
            batch: this rank's sub-batches (as for ``objective(model, batch)``).
            reference: π_ref when the objective needs one (a Reference, or a ``[b]`` tensor of the forget
                answers' ``log π_ref`` as for the objective's simple call form).
        Returns:
            The detached SAM loss and the logged terms (class docstring).
        """
        if not isinstance(batch, UnlearnBatch):
            batch = UnlearnBatch(forget=batch)
        if isinstance(reference, torch.Tensor):
            reference = _GivenForgetLogprobs(reference)
        if objective.needs_reference and reference is None:
            needed = sorted(objective.needs.reference)
            raise ValueError(f"objective '{objective.name}' needs a Reference (π_ref {needed})")
        if objective.uses_retain and batch.retain is None:
            raise ValueError(f"objective '{objective.name}' has a retain term but got no retain batch")
        logs: dict[str, float] = {}

        # 1. g = ∇L_f(θ) and its global norm
        ctx = self._context(model, objective, batch, reference)
        forget = objective.forget(ctx)
        logs["forget_loss"] = float(forget.detach())
        with torch.no_grad():
            logs["forget_nll"] = float(ctx.stats("forget").mean_nll.mean())
        _backward(model, forget)
        slots, partitioned = _slots(model)
        grads = [slot.get() for slot in slots]
        _clear_gradients(model)
        squared = torch.stack([g.double().pow(2).sum() for g in grads]).sum().reshape(1)
        if partitioned:
            dist.all_reduce(squared)
        norm = float(squared.sqrt())
        logs["sam_grad_norm"] = norm
        scale = self.rho / norm if norm > 0 and math.isfinite(norm) else 0.0

        # 2. ∇L_f at θ + δ, δ = ρ·g/‖g‖ on every rank's share of the trainable weights, then restore θ
        saved = _perturb(model, slots, [g.mul_(scale) for g in grads])  # δ in place of g (one copy)
        del grads
        try:
            ctx = self._context(model, objective, batch, reference)
            perturbed = objective.forget(ctx)
            _backward(model, objective.forget_weight * perturbed)
        finally:
            _restore(model, slots, saved)
        logs["forget_loss_perturbed"] = float(perturbed.detach())
        loss = objective.forget_weight * float(perturbed.detach())

        # 3. + α·∇L_r(θ)
        if objective.uses_retain:
            assert objective.retain is not None
            forget_grads = [slot.get() for slot in slots]
            _clear_gradients(model)
            ctx = self._context(model, objective, batch, reference)
            retain = objective.retain(ctx)
            _backward(model, objective.retain_weight * retain)
            for slot, g in zip(slots, forget_grads, strict=True):
                slot.set(slot.get() + g)
            logs["retain_loss"] = float(retain.detach())
            with torch.no_grad():
                logs["retain_nll"] = float(ctx.stats("retain").mean_nll.mean())
            loss += objective.retain_weight * logs["retain_loss"]
        logs["loss"] = loss
        return ObjectiveOutput(torch.tensor(loss), logs)

    @staticmethod
    def _context(
        model: Any, objective: UnlearningObjective, batch: UnlearnBatch, reference: Reference | None
    ) -> StepContext:
        return StepContext(model, batch, reference, objective.layer_names(model), objective.name)


def _release_gathered(model: Any) -> None:
    """ZeRO-3: drop every gathered whole weight, persistent ones included, so that the next forward gathers
    them again from the partitions (``ds_tensor``), which are what :func:`_perturb` changes. Not collective."""
    if not (_is_engine(model) and model.zero_optimization_stage() == 3):
        return
    offload = getattr(model.optimizer, "parameter_offload", None)
    if offload is not None:
        offload.partition_all_parameters()
    else:
        model.empty_partition_cache()


@torch.no_grad()
def _perturb(model: Any, slots: list[_Slot], deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """θ ← θ + δ on this rank's share of every trainable weight; returns copies to restore exactly.

    ZeRO-3: the share is the flat partition ``ds_tensor`` (its first ``valid`` elements); the gathered
    weights are released first so that the next forward sees the perturbed partitions. Otherwise the
    whole weight ``param.data``."""
    _release_gathered(model)
    saved = []
    for slot, delta in zip(slots, deltas, strict=True):
        if slot.partitioned:
            local = slot.param.ds_tensor.data.view(-1)
            saved.append(local.clone())
            local[: slot.valid] += delta.to(local.dtype)
        else:
            saved.append(slot.param.data.clone())
            slot.param.data += delta.view(slot.param.shape).to(slot.param.data.dtype)
    return saved


@torch.no_grad()
def _restore(model: Any, slots: list[_Slot], saved: list[torch.Tensor]) -> None:
    """Put back the weights copied by :func:`_perturb` (bit-exact); ZeRO-3 releases the perturbed gathers."""
    _release_gathered(model)
    for slot, kept in zip(slots, saved, strict=True):
        if slot.partitioned:
            slot.param.ds_tensor.data.view(-1).copy_(kept)
        else:
            slot.param.data.copy_(kept)


@dataclass(frozen=True)
class RobustPlan:
    """What ``method.robust`` changes in a run.

    sam: the SAM step to use instead of a plain backward (``None`` unless ``robust=sam``).
    saliency: the saliency fraction of the run (``method.saliency``, or SURE's fraction).
    lr: the unlearning learning rate (``train.lr``, times SURE's multiplier).
    """

    name: str
    sam: SharpnessAware | None
    saliency: float
    lr: float


def robust_plan(cfg: Any) -> RobustPlan:
    """The robustness settings of a run config (``cfg.method.robust``, ``cfg.method.saliency``, ``cfg.train.lr``).

    ``none``: as configured. ``sam``: a :class:`SharpnessAware` step of radius ``method.robust.rho``.
    ``sure``: saliency fraction ``method.robust.fraction`` and learning rate
    ``train.lr × method.robust.lr_multiplier`` (the config loader refuses ``sure`` together with
    ``method.saliency < 1``, which would set the fraction twice).
    """
    robust, saliency, lr = cfg.method.robust, cfg.method.saliency, cfg.train.lr
    if robust.name == "sam":
        return RobustPlan("sam", SharpnessAware(robust.rho), saliency, lr)
    if robust.name == "sure":
        return RobustPlan("sure", None, robust.fraction, lr * robust.lr_multiplier)
    if robust.name != "none":
        raise ValueError(f"method.robust.name: unknown {robust.name!r}; one of {', '.join(ROBUST_METHODS)}")
    return RobustPlan("none", None, saliency, lr)


def unlearning_backward(
    model: Any,
    objective: UnlearningObjective,
    batch: UnlearnBatch,
    reference: Reference | None = None,
    sam: SharpnessAware | None = None,
) -> ObjectiveOutput:
    """One step's gradients: ``objective`` then backward, or the SAM step when ``sam`` is given.

    The one entry point of the CLI loop and the HF Trainer: afterwards the gradients of ``model`` (an
    engine or a plain module) are the step's, ready for a saliency mask and the optimizer step.
    """
    if sam is not None:
        return sam.backward(model, objective, batch, reference)
    out = objective(model, batch, reference=reference)
    _backward(model, out.loss)
    return out


__all__ = [
    "ROBUST_METHODS",
    "SAM_RHO",
    "SURE_FRACTION",
    "SURE_LR_MULTIPLIER",
    "RobustPlan",
    "SharpnessAware",
    "robust_plan",
    "unlearning_backward",
]
