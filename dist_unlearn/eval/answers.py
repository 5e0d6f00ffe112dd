"""Answer probability and greedy token accuracy of a QA split, scored sharded over ranks.

Per example ``i`` with answer ``y_i`` (answer tokens + eos):
``prob_i = exp(log π(y_i|x_i)/|y_i|)`` (geometric-mean token probability, TOFU's "probability") and
``acc_i = (#tokens the argmax prediction gets right under teacher forcing)/|y_i|``. A split reports the
means over examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_unlearn.data.qa import QADataset, collate_qa
from dist_unlearn.distributed.sharded import sharded_map
from dist_unlearn.eval.modes import eval_mode
from dist_unlearn.models.logprobs import forward_sequence_stats

SCORE_COLUMNS = ("logprob", "num_tokens", "num_correct")


@torch.no_grad()
def score_dataset(
    model: torch.nn.Module,
    dataset: QADataset,
    pad_token_id: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    collective: bool = True,
) -> torch.Tensor:
    """Per-example ``[N, 3]`` tensor of (summed answer log-prob, answer tokens, greedy hits).

    Collective when a process group with several ranks exists: every rank must call it (unless
    ``collective=False``: then this process scores every example on its own).
    """

    def score(indices: Sequence[int]) -> torch.Tensor:
        batch = collate_qa([dataset[i] for i in indices], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        stats = forward_sequence_stats(model, batch)
        return torch.stack([stats.logprob, stats.num_tokens, stats.num_correct], dim=1)

    with eval_mode(model):
        return sharded_map(len(dataset), batch_size, score, device=device, collective=collective)


def summarize_scores(scores: torch.Tensor) -> dict[str, float]:
    """Mean answer probability, token accuracy and length-normalised NLL over the rows of ``scores``."""
    logprob, num_tokens, num_correct = scores.double().unbind(dim=1)
    per_token = logprob / num_tokens.clamp(min=1)
    return {
        "prob": float(per_token.exp().mean()),
        "acc": float((num_correct / num_tokens.clamp(min=1)).mean()),
        "nll": float(-per_token.mean()),
        "count": int(scores.size(0)),
    }


def evaluate_splits(
    model: torch.nn.Module,
    datasets: dict[str, QADataset],
    pad_token_id: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    collective: bool = True,
) -> dict[str, dict[str, float]]:
    """:func:`summarize_scores` for each named dataset (collective unless ``collective=False``)."""
    return {
        name: summarize_scores(score_dataset(model, ds, pad_token_id, batch_size, device, collective))
        for name, ds in datasets.items()
    }
