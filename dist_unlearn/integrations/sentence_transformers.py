"""A ``SentenceTransformerTrainer`` loss: gradient caching with cross-rank InfoNCE, exact under DDP and DeepSpeed.

:class:`GradCacheInfoNCELoss` runs :class:`~dist_unlearn.contrastive.GradCache` (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup") around :class:`~dist_unlearn.contrastive.InfoNCELoss`
(negatives shared across all ranks, hard negatives, symmetric option, learnable temperature) so that
``per_device_train_batch_size`` can be far larger than one forward fits in memory.

How it fits the Trainer, which calls ``accelerator.backward(loss)`` exactly once on what the loss returns:
``forward`` runs GradCache's :meth:`~dist_unlearn.contrastive.GradCache.step_deferred`: every chunk of
``mini_batch_size`` rows is encoded without grad, the loss and its gradient ``G = ∂L/∂reps`` are computed on
the whole (cross-rank) batch, and every chunk but the last is re-encoded with grad and backpropagated as the
surrogate ``Σ r ⊙ G`` (under DDP inside ``no_sync``; under DeepSpeed through ``engine.backward`` with the
gradient-accumulation boundary off for ZeRO-0/1/2, plain for ZeRO-3). The returned loss carries the **last**
chunk's surrogate, so the Trainer's single ``backward`` (``engine.backward`` under DeepSpeed) adds the last
share and does the one reduction across ranks. Its value is this rank's InfoNCE loss (the rank average is the
global-batch loss, see :mod:`dist_unlearn.contrastive.losses`), so the Trainer logs the true loss.
sentence-transformers' own ``CachedMultipleNegativesRankingLoss`` instead replays every chunk from a backward
hook, i.e. inside the Trainer's backward, which DeepSpeed's ZeRO-1/2/3 gradient hooks do not support.

The learnable temperature ``log(1/tau)`` is made a parameter **of the model** (registered on the
``SentenceTransformer`` as ``dist_unlearn_log_inverse_temperature`` and emitted by a forward hook as
``features["dist_unlearn_log_inverse_temperature"]``), not only of the loss. So:

- it is in the Trainer's optimizer with no extra step (the Trainer optimizes the model's parameters; under
  DeepSpeed, ZeRO partitions and steps it like any weight; sentence-transformers also adds a loss's own
  parameters, and this one is the same tensor);
- its gradient goes through the model's backward: the surrogate gets ``log(1/tau)_last · g`` where ``g`` is the
  global-batch ``∂L/∂log(1/tau)`` (computed in GradCache's loss phase and averaged over ranks), and DDP/ZeRO
  average it again (identical on every rank), so after the step it moved exactly as on one process;
- it reaches the loss as it was inside the forward, also under ZeRO-3 where the parameter lives in partitions.
  ``SentenceTransformer.save`` writes the modules only, so the saved model has no temperature (it is not used
  at inference); it is in the Trainer's checkpoints.

It is bounded by ``max_inverse_temperature`` (CLIP's clamp, never in the forward: see
:mod:`dist_unlearn.contrastive.losses`): the parameter is clamped in place at the start of each training step,
i.e. after the previous optimizer step (under DeepSpeed in the fp32 master copy and the working copy).

Requirements, checked before any gradient work (one message naming the argument and the fix):
``TrainingArguments.gradient_accumulation_steps`` 1 (grow ``per_device_train_batch_size`` instead: memory is
bounded by ``mini_batch_size``), no ``fp16`` loss scaling outside DeepSpeed (use ``bf16`` or DeepSpeed's fp16),
a DeepSpeed engine with ``gradient_accumulation_steps: 1``. Columns: ``(anchor, positive, negative_1, ...,
negative_h)``; the same number of columns on every rank. Dropout is fine (each chunk's RNG state is replayed).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dist_unlearn.contrastive.grad_cache import GradCache, model_kind, split_batch
from dist_unlearn.contrastive.losses import InfoNCELoss

__all__ = ["TEMPERATURE_KEY", "GradCacheInfoNCELoss"]

TEMPERATURE_KEY = "dist_unlearn_log_inverse_temperature"
"""Name of the learnable ``log(1/tau)`` on the ``SentenceTransformer`` and of its copy in the features."""


def _unwrapped(model: Any) -> Any:
    """The module inside a DDP wrapper or DeepSpeed engine (and under ``torch.compile``)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose method (``compute_loss``) is on the call stack, or None."""
    trainer_type = getattr(sys.modules.get("transformers"), "Trainer", None)
    if trainer_type is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_type):
            return candidate
        frame = frame.f_back
    return None


class GradCacheInfoNCELoss(nn.Module):
    """InfoNCE over the global batch with gradient caching, for ``SentenceTransformerTrainer`` (see module doc).

    For anchor ``q_i`` with positive ``p(i)`` among all ``N`` gathered candidates of all ranks (every rank's
    positives and hard negatives), ``s_ij = cos(q_i, d_j)`` and ``t = 1/tau``:

        l_i = -t s_{i,p(i)} + log Σ_j exp(t s_ij),     L = (1/B) Σ_i l_i    (B = global number of anchors)

    and with ``symmetric=True`` the positive -> anchors direction is averaged in (see
    :class:`~dist_unlearn.contrastive.InfoNCELoss`). The gradient of every parameter after the Trainer's
    backward is ``∂L/∂θ`` of one process on the whole global batch (DDP, DeepSpeed ZeRO 0-3), temperature included.

    Args:
        model: the ``SentenceTransformer`` (the Trainer later swaps in its DDP/DeepSpeed wrapper).
        mini_batch_size: rows per forward (GradCache's ``chunk_size``): bounds activation memory; the result does
            not depend on it.
        temperature: ``tau`` (fixed), or the initial ``tau`` when learnable. ``scale = 1/tau`` in
            sentence-transformers' terms (``scale=20`` is ``temperature=0.05``).
        learnable_temperature: learn ``log(1/tau)`` (see the module doc for how it is trained and where it lives).
        symmetric: add the positive -> anchor direction.
        max_inverse_temperature: bound of a learnable ``1/tau`` (CLIP: 100), applied after each optimizer step.
        false_negative_margin: mask candidates whose similarity exceeds the positive's minus this margin.
        cross_rank: use the candidates of all ranks (default); ``False``: only this rank's.
        check_replay: verify each re-forward against the cached representations (see GradCache).
        sort_by_length: encode each column's rows longest first and cut every mini-batch's padding to its own
            longest row (GradCache's ``sort_by_length`` and ``trim_padding``; the loss sees the rows in the
            batch's order, so the result is unchanged, up to float rounding and, with dropout, other masks).

    Raises:
        ValueError: ``mini_batch_size`` < 1, a bad temperature, or a model that already has a learnable temperature
            of another :class:`GradCacheInfoNCELoss`.

    Example::

        loss = GradCacheInfoNCELoss(model, mini_batch_size=32, temperature=0.05, learnable_temperature=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs, loss=loss)
        trainer.train()   # plain, DDP (torchrun) or args.deepspeed with ZeRO-2/3: the same gradients
    """

    def __init__(
        self,
        model: Any,
        mini_batch_size: int = 32,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        symmetric: bool = False,
        max_inverse_temperature: float = 100.0,
        false_negative_margin: float | None = None,
        cross_rank: bool = True,
        check_replay: bool = False,
        sort_by_length: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(mini_batch_size, int) or isinstance(mini_batch_size, bool) or mini_batch_size < 1:
            raise ValueError(
                "GradCacheInfoNCELoss: mini_batch_size must be a positive int (rows per forward), "
                f"got {mini_batch_size!r}"
            )
        self.model = model
        self.mini_batch_size = mini_batch_size
        self.check_replay = check_replay
        self.sort_by_length = sort_by_length
        # The InfoNCE module is kept out of the module tree (a tuple): its own log(1/tau) is only the leaf that
        # GradCache differentiates; the trained parameter is the model's (see the module docstring).
        self._info_nce = (
            InfoNCELoss(
                temperature,
                learnable_temperature=learnable_temperature,
                max_inverse_temperature=max_inverse_temperature,
                symmetric=symmetric,
                cross_rank=cross_rank,
                false_negative_margin=false_negative_margin,
            ),
        )
        self.learnable_temperature = learnable_temperature
        self._hook = None
        self._last_temperature: Tensor | None = None
        self._seen_temperature: Tensor | None = None  # log(1/tau) as the first forward of this step saw it
        self._temperature_out: Tensor | None = None  # the last forward's copy, with its graph to the parameter
        self._checked_trainer = False
        if learnable_temperature:
            module = _unwrapped(model)
            if TEMPERATURE_KEY in dict(module.named_parameters(recurse=False)):
                raise ValueError(
                    "GradCacheInfoNCELoss(learnable_temperature=True): this model already carries the learnable "
                    f"temperature of another GradCacheInfoNCELoss ({TEMPERATURE_KEY}); build one such loss per model"
                )
            # shape [1], not 0-dim: DeepSpeed broadcasts and partitions parameters as byte views of >= 1 dim
            start = self.info_nce.log_inverse_temperature.detach().clone().reshape(1)
            module.register_parameter(TEMPERATURE_KEY, nn.Parameter(start))
            self._hook = module.register_forward_hook(_emit_temperature)

    # -- public ------------------------------------------------------------------------------------

    @property
    def info_nce(self) -> InfoNCELoss:
        """The :class:`~dist_unlearn.contrastive.InfoNCELoss` that scores the embeddings."""
        return self._info_nce[0]

    @property
    def log_inverse_temperature(self) -> nn.Parameter | None:
        """The learnable ``log(1/tau)`` (a parameter of the model, shape ``[1]``), or None for a fixed temperature."""
        if not self.learnable_temperature:
            return None
        return getattr(_unwrapped(self.model), TEMPERATURE_KEY)

    @property
    def temperature(self) -> float:
        """The current ``tau`` (for a learnable one: as last seen in a forward)."""
        if self._last_temperature is not None:
            return float(torch.exp(-self._last_temperature.detach().float()))
        return self.info_nce.temperature

    def forward(self, sentence_features: Iterable[Mapping[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """The loss of a batch of columns ``[anchor, positive, negative_1, ...]`` (``labels`` are not used).

        In training (grad enabled) the parameter gradients of all but the last mini-batch are already in place
        when this returns; backpropagate the result once (the Trainer does). Without grad (evaluation) it only
        computes the loss.
        """
        del labels
        features = [dict(f) for f in sentence_features]
        if len(features) < 2:
            raise ValueError(
                f"GradCacheInfoNCELoss needs at least 2 text columns (anchor, positive[, negatives...]), "
                f"got {len(features)}; give the dataset an anchor and a positive column"
            )
        if not torch.is_grad_enabled():
            return self._evaluate(features)
        if not self._checked_trainer:
            self._check_training_set_up()
            self._checked_trainer = True
        if self.learnable_temperature:
            self._clamp_temperature()
        cache = GradCache(
            self.model,
            self.mini_batch_size,
            self._loss,
            encode=self._encode,
            check_replay=self.check_replay,
            sort_by_length=self.sort_by_length,
            trim_padding=self.sort_by_length,
            loss_parameters=[p for p in [self.info_nce.log_inverse_temperature] if p is not None],
        )
        self._seen_temperature = None
        loss, surrogate = cache.step_deferred(*features)
        if self.learnable_temperature:
            # The temperature's global-batch gradient (GradCache averaged it over ranks) enters the model's backward
            # through the last forward's copy of the parameter; DDP/ZeRO average it again (the same on all ranks).
            inner = self.info_nce.log_inverse_temperature
            grad = inner.grad if inner.grad is not None else torch.zeros_like(inner)
            inner.grad = None
            out = self._temperature_out
            assert out is not None
            surrogate = surrogate + (out * grad.to(out.dtype)).sum()
        return surrogate + (loss.to(surrogate.dtype) - surrogate.detach())

    # -- internals ---------------------------------------------------------------------------------

    def _encode(self, model: Any, chunk: Mapping[str, Any]) -> Tensor:
        """``model(features)["sentence_embedding"]`` ``[n, d]``; keeps the forward's copy of ``log(1/tau)``."""
        out = model(dict(chunk))
        embeddings = out["sentence_embedding"]
        if not self.learnable_temperature:
            return embeddings
        temperature = out[TEMPERATURE_KEY]
        self._temperature_out = temperature
        if self._seen_temperature is None:
            self._seen_temperature = temperature.detach().clone()
        # The temperature reaches the model's backward only through the last chunk's surrogate; under ZeRO-3 that is
        # exact because GradCache zeroes the gradient partitions before the step's first backward
        # (see dist_unlearn.contrastive.grad_cache.zero_stage3_gradient_partitions).
        return embeddings

    def _loss(self, *reps: Tensor) -> Tensor:
        """InfoNCE of anchors ``reps[0]`` against ``[positive, negatives...]`` ``[b, 1 + h, d]``."""
        if self.learnable_temperature:
            seen = self._seen_temperature
            assert seen is not None
            with torch.no_grad():
                self.info_nce.log_inverse_temperature.copy_(seen.reshape(()))
            self._last_temperature = seen
        docs = torch.stack(reps[1:], dim=1)
        return self.info_nce(reps[0], docs)

    def _evaluate(self, features: list[dict[str, Any]]) -> Tensor:
        """No grad: encode every column in mini-batches and return the loss."""
        self._seen_temperature = None
        reps = []
        for column in features:
            chunks = split_batch(column, self.mini_batch_size)
            reps.append(torch.cat([self._encode(self.model, chunk) for chunk in chunks]))
        return self._loss(*reps)

    def _check_training_set_up(self) -> None:
        """Refuse Trainer settings under which the gradient would not be exact (before any gradient work)."""
        trainer = _calling_trainer()
        args = getattr(trainer, "args", None)
        if args is None:
            return
        steps = getattr(args, "gradient_accumulation_steps", 1)
        if steps != 1:
            raise ValueError(
                f"TrainingArguments.gradient_accumulation_steps={steps}: GradCacheInfoNCELoss already makes one "
                "optimizer step's gradient from the whole batch (and the Trainer's 1/steps scaling would reach only "
                "its last mini-batch). Fix: gradient_accumulation_steps=1 and a larger per_device_train_batch_size "
                "(memory is bounded by mini_batch_size)"
            )
        if getattr(args, "fp16", False) and model_kind(self.model) != "deepspeed":
            raise ValueError(
                "TrainingArguments.fp16=True without DeepSpeed: the AMP loss scale would reach only the last "
                "mini-batch of GradCacheInfoNCELoss. Fix: bf16=True, or fp16 through DeepSpeed (args.deepspeed)"
            )

    @torch.no_grad()
    def _clamp_temperature(self) -> None:
        """Clamp the learnable ``log(1/tau)`` at ``log(max_inverse_temperature)`` (after the last optimizer step)."""
        bound = math.log(self.info_nce.max_inverse_temperature)
        param = self.log_inverse_temperature
        assert param is not None
        if model_kind(self.model) != "deepspeed":
            param.clamp_(max=bound)
            return
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the fp32 master and of the working copy
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            # (local, not full: DeepSpeed's safe_set_full_fp32_param cannot set a tensor smaller than the world)
            local = safe_get_local_fp32_param(param)
            if local is not None and local.numel() > 0 and bool(local.max() > bound):
                safe_set_local_fp32_param(param, local.clamp(max=bound))
            param.ds_tensor.data.clamp_(max=bound)
            return
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(param)  # ZeRO-0/1/2 (every rank calls it: one small all-reduce)
        if master is not None and bool(master.max() > bound):
            safe_set_full_fp32_param(param, master.clamp(max=bound))
            param.data.clamp_(max=bound)

    def extra_repr(self) -> str:
        nce = self.info_nce
        return (
            f"mini_batch_size={self.mini_batch_size}, temperature={nce.temperature}, "
            f"learnable_temperature={self.learnable_temperature}, symmetric={nce.symmetric}"
        )

    @property
    def citation(self) -> str:
        """BibTeX of the gradient-cache paper (sentence-transformers puts a loss's citation in the model card)."""
        return """@inproceedings{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Gao, Luyu and Zhang, Yunyi and Han, Jiawei and Callan, Jamie},
    booktitle={Proceedings of the 6th Workshop on Representation Learning for NLP},
    year={2021},
}"""


def _emit_temperature(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook on the ``SentenceTransformer``: put a copy of ``log(1/tau)`` into the output features.

    Runs inside the model's forward (before DeepSpeed ZeRO-3 releases the gathered parameters), so the copy holds
    the full value and its gradient reaches the parameter through the model's backward."""
    if isinstance(output, dict):
        output[TEMPERATURE_KEY] = getattr(module, TEMPERATURE_KEY).clone()
    return output
