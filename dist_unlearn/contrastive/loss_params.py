"""The contrastive job's loss from its config, and training the loss's own parameters (a learnable temperature;
SigLIP's scale and bias) next to a model.

These parameters live in the loss module, outside the DDP module or DeepSpeed engine (ZeRO-3 can only
partition parameters of the wrapped module, and GradCache runs the loss on detached representations), so
they get their own optimizer, stepped right after the model's:

    cache.step(queries, docs)           # gradients: the model's (reduced by the wrapper) and the loss's
    engine.step()                       # (all-reduce-averaged by GradCache: dL/dτ on every rank)
    stepper.step()                      # AdamW on log(1/τ), then the clamp 1/τ <= max (CLIP)

AdamW without weight decay, as CLIP trains its ``logit_scale`` (Radford et al., 2021); the clamp is applied
to the parameter after the step, never inside the forward, so the gradient at the bound is the true one
(:meth:`~dist_unlearn.contrastive.losses.CrossRankLoss.clamp_parameters_`). Every rank holds the same
gradient (the global-batch one, see :mod:`dist_unlearn.contrastive.losses`) and runs the same deterministic
update, so the parameters stay bitwise equal across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_unlearn.config.schema import CONTRASTIVE_LOSSES, ContrastiveConfig
from dist_unlearn.contrastive.losses import InfoNCELoss, SigmoidLoss
from dist_unlearn.contrastive.tiled import TiledInfoNCELoss

__all__ = [
    "LossParameterStepper",
    "average_loss_gradients",
    "backward_without_cache",
    "build_contrastive_loss",
    "loss_parameter_values",
]


def build_contrastive_loss(cfg: ContrastiveConfig) -> nn.Module:
    """The cross-rank loss named by ``contrastive.loss`` (global-mean gradient convention).

    ``infonce`` / ``tiled_infonce``: τ = ``temperature``, learned as ``log(1/τ)`` with ``learn_temperature``.
    ``sigmoid``: scale ``t = sigmoid_scale`` and bias ``b = sigmoid_bias``, learned (as ``log t`` and ``b``) with
    ``learn_temperature``. ``siglip``: SigLIP (Zhai et al., 2023), the sigmoid loss with ``log t`` and ``b`` always
    learned, starting from ``sigmoid_scale`` and ``sigmoid_bias``.
    """
    learn = cfg.learn_temperature
    if cfg.loss == "infonce":
        return InfoNCELoss(temperature=cfg.temperature, learnable_temperature=learn, cross_rank=True)
    if cfg.loss == "tiled_infonce":
        return TiledInfoNCELoss(temperature=cfg.temperature, learnable_temperature=learn, cross_rank=True)
    if cfg.loss not in ("sigmoid", "siglip"):
        raise ValueError(f"contrastive.loss must be one of {', '.join(CONTRASTIVE_LOSSES)}; got {cfg.loss!r}")
    return SigmoidLoss(
        init_scale=cfg.sigmoid_scale,
        init_bias=cfg.sigmoid_bias,
        learnable=learn or cfg.loss == "siglip",
        cross_rank=True,
    )


def average_loss_gradients(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None], group: Any = None) -> None:
    """Set ``p.grad`` to the rank average of ``grads`` (float64 all-reduce, divided by the world size ``W``).

    For a loss called on the wrapper's outputs without GradCache: each rank's ``d loss_r / d p`` (taken with
    ``torch.autograd.grad`` before ``engine.backward``, so DeepSpeed's fp16 loss scale never reaches it) is its
    share; the average ``(1/W) Σ_r d loss_r / d p`` is the global-batch gradient ``dL/dp`` under the losses'
    global-mean convention. Without a process group, ``p.grad = grad``.
    """
    values = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads, strict=True)]
    if not values:
        return
    flat = torch.cat([v.detach().reshape(-1).double() for v in values])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= dist.get_world_size(group)
    for param, part in zip(params, flat.split([p.numel() for p in params]), strict=True):
        param.grad = part.reshape(param.shape).to(device=param.device, dtype=param.dtype)


def loss_parameter_values(loss_fn: nn.Module) -> dict[str, float]:
    """The loss's learnable values in their natural units: ``temperature`` τ = ``exp(-log_inverse_temperature)``,
    SigLIP's ``scale`` t = ``exp(log_scale)`` and ``bias`` b; ``{}`` for a loss with none."""
    values: dict[str, float] = {}
    log_inverse = getattr(loss_fn, "log_inverse_temperature", None)
    if isinstance(log_inverse, Tensor):
        values["temperature"] = math.exp(-float(log_inverse.detach()))
    log_scale, bias = getattr(loss_fn, "log_scale", None), getattr(loss_fn, "bias", None)
    if isinstance(log_scale, Tensor) and isinstance(bias, Tensor):
        values["scale"], values["bias"] = math.exp(float(log_scale.detach())), float(bias.detach())
    return values


class LossParameterStepper:
    """AdamW (no weight decay) over the learnable parameters of ``loss_fn``, then its clamp.

    Args:
        loss_fn: the loss module; its parameters that require grad are optimised (none: :meth:`step` only clamps).
        lr: learning rate (betas 0.9/0.999, eps 1e-8, as the job's DeepSpeed AdamW).
    """

    def __init__(self, loss_fn: nn.Module, lr: float) -> None:
        self.loss_fn = loss_fn
        self.params = [p for p in loss_fn.parameters() if p.requires_grad]
        self.optimizer = (
            torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            if self.params
            else None
        )

    def step(self, skipped: bool = False) -> None:
        """Apply the gradients in ``p.grad``, clear them, and clamp the parameters (CLIP's order).

        Args:
            skipped: the model's optimizer step was skipped (fp16 overflow: DeepSpeed's ``engine.skipped_steps``
                grew in ``engine.step()``); the gradients are cleared without a step, so that the loss's
                parameters skip the same steps as the model's.
        """
        if self.optimizer is not None:
            if not skipped:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        clamp = getattr(self.loss_fn, "clamp_parameters_", None)
        if clamp is not None:
            clamp()

    def state_dict(self) -> dict[str, Any]:
        """The loss's parameters and the optimizer's state (for a checkpoint's client state)."""
        optimizer = self.optimizer.state_dict() if self.optimizer is not None else None
        return {"loss": self.loss_fn.state_dict(), "optimizer": optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.loss_fn.load_state_dict(state["loss"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def backward_without_cache(engine: Any, loss: Tensor, stepper: LossParameterStepper) -> None:
    """``engine.backward(loss)`` without gradient caching (the job's ``contrastive.chunk_size=0``), for a loss
    computed on the engine's outputs: the loss's own parameters get the rank average of their gradients
    (:func:`average_loss_gradients`), taken before the engine's backward so that no fp16 loss scale reaches them."""
    params = stepper.params
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if params else ()
    engine.backward(loss)
    if params:
        average_loss_gradients(params, grads)
