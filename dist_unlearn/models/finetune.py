"""Single-process fine-tuning of a causal LM on QA data (the embedded target and oracle; the relearning attack).

Loss: retain NLL, ``mean_i NLL(y_i|x_i)/|y_i|`` (the package's per-sequence convention); AdamW with a
linear decay to 10 % of ``lr``; batches drawn by :class:`~dist_unlearn.data.sampling.StepSampler`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from dist_unlearn.data.qa import QADataset, collate_qa
from dist_unlearn.data.sampling import StepSampler
from dist_unlearn.models.logprobs import forward_sequence_stats


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
    """Train ``model`` in place for ``steps`` steps; returns the loss of every step."""
    sampler = StepSampler(len(dataset), min(batch_size, len(dataset)), 0, 1, seed, stream=desc)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / max(1, steps))
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, mininterval=2.0, leave=False)
    for step in bar:
        batch = collate_qa([dataset[i] for i in sampler.indices(step)], pad_token_id)
        loss = forward_sequence_stats(model, batch).mean_nll.mean()  # mean_i NLL(y_i|x_i)/|y_i|
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
