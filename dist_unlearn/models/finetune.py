"""Fine-tuning of a causal LM on QA data (the embedded target and oracle; the relearning attack), in one
process on a whole model or on a ZeRO-3 DeepSpeed engine partitioned over the ranks.

Loss: retain NLL, ``mean_i NLL(y_i|x_i)/|y_i|`` over the ``B`` rows of a step (the package's per-sequence
convention); AdamW (betas :data:`ADAM_BETAS`, eps :data:`ADAM_EPS`, no weight decay) with a linear decay
from ``lr`` to 10 % of it (:func:`linear_decay`) and the global gradient norm clipped to :data:`GRAD_CLIP`;
batches drawn by :class:`~dist_unlearn.data.sampling.StepSampler` (one global batch of ``B`` rows per step).

On an engine (:func:`trainable_engine`: the same optimizer, schedule and clipping, run by DeepSpeed) the
``B`` rows of a step are split over the ``W`` ranks (rank ``r`` takes rows ``r, r+W, ...``) and rank ``r``'s
loss is ``(W/B)·Σ_{i∈r} NLL_i/|y_i|``; DeepSpeed averages the ranks' gradients, so the step's gradient is
``(1/B)·Σ_i ∇NLL_i/|y_i|``, the one-process gradient. A rank without a row (``B < W``) runs one row with
weight 0, since every forward and backward of a partitioned model is collective.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dist_unlearn.data.qa import QADataset, collate_qa
from dist_unlearn.data.sampling import StepSampler
from dist_unlearn.distributed.env import get_rank, get_world_size
from dist_unlearn.models.logprobs import forward_sequence_stats

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
GRAD_CLIP = 1.0
"""Maximum global L2 norm of the gradient (``torch.nn.utils.clip_grad_norm_``; DeepSpeed's ``gradient_clipping``)."""
FINAL_LR_FRACTION = 0.1


def linear_decay(steps: int) -> Callable[[int], float]:
    """Learning-rate factor of step ``s``: ``1 − (1 − 0.1)·s/steps`` (``LambdaLR``'s ``lr_lambda``)."""
    return lambda s: 1.0 - (1.0 - FINAL_LR_FRACTION) * s / max(1, steps)


def optimizer_ds_config(lr: float) -> dict[str, Any]:
    """The DeepSpeed config entries of :func:`finetune`'s optimizer: AdamW (``torch.optim.AdamW``) at ``lr``
    and gradient clipping at :data:`GRAD_CLIP` (the schedule is :func:`linear_decay`, passed as a callable)."""
    params = {"lr": lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay": 0.0, "torch_adam": True}
    return {"optimizer": {"type": "AdamW", "params": params}, "gradient_clipping": GRAD_CLIP}


def trainable_engine(
    path: str | Path, dtype: str, lr: float, steps: int, attn_implementation: str = "eager", micro_batch_size: int = 1
) -> Any:
    """A trainable ZeRO-3 ``DeepSpeedEngine`` of the causal LM at ``path`` for :func:`finetune`: built
    partitioned as :func:`dist_unlearn.models.inference.sharded_engine` builds the evaluated models (each
    rank reads only its slice of every weight), in ``dtype`` (bf16/fp16 with DeepSpeed's fp32 master
    partitions), with :func:`optimizer_ds_config` and the :func:`linear_decay` schedule over ``steps``.
    Each rank holds ``⌈P/W⌉`` of the ``P`` weights and their gradient and AdamW state. Collective."""
    from dist_unlearn.models.inference import sharded_engine

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(steps))

    return sharded_engine(
        path, dtype, attn_implementation, micro_batch_size, training=optimizer_ds_config(lr), lr_scheduler=schedule
    )


def _is_engine(model: Any) -> bool:
    return hasattr(model, "zero_optimization_stage") and hasattr(model, "module")


def finetune(
    model: torch.nn.Module,
    dataset: QADataset,
    pad_token_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    desc: str = "fine-tune",
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place for ``steps`` steps of ``B = min(batch_size, |dataset|)`` rows; returns the
    loss of every step (the global batch's mean).

    ``model``: a module (trained here with AdamW, :func:`linear_decay` and clipping, every rank alone on
    the whole batch) or a DeepSpeed engine built with its optimizer and schedule (:func:`trainable_engine`;
    the rows split over the ranks, collective; ``lr`` is then the engine's). See the module docstring.
    """
    engine = _is_engine(model)
    rank, world = (get_rank(), get_world_size()) if engine else (0, 1)
    sampler = StepSampler(len(dataset), min(batch_size, len(dataset)), 0, 1, seed, stream=desc)
    if not engine:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(steps))
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, mininterval=2.0, leave=False)
    for step in bar:
        rows = sampler.global_indices(step)
        mine = rows[rank::world]
        batch = collate_qa([dataset[i] for i in mine or rows[:1]], pad_token_id)
        weight = len(mine) * world / len(rows)  # this rank's share of the mean, × W (1.0 in one process)
        loss = forward_sequence_stats(model, batch).mean_nll.mean() * weight  # mean_i NLL(y_i|x_i)/|y_i|
        if engine:
            model.backward(loss)
            model.step()  # clipping, AdamW and the schedule, as configured
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
        losses.append(_global_mean(loss.detach(), world))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if on_step is not None:
            on_step(step, losses[-1])
    if not engine:
        optimizer.zero_grad(set_to_none=True)  # the trained model keeps no gradients (an engine's are partitioned)
    model.eval()
    return losses


def _global_mean(local: torch.Tensor, world: int) -> float:
    """``(1/W)·Σ_r local_r``: the global batch's mean loss from the ranks' weighted shares."""
    if world > 1:
        local = local.clone()
        torch.distributed.all_reduce(local)
        local /= world
    return float(local.item())
