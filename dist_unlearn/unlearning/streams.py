"""The data streams of an unlearning run and their per-step, world-size-invariant sampling.

Shared by every driver of an objective (the CLI's unlearning task in ``tasks/unlearn.py`` and the Hugging
Face ``Trainer`` in ``integrations/hf.py``), so both draw exactly the same rows at every step:

* :func:`qa_streams` builds the datasets an objective reads (:class:`DataNeeds`) from QA items: forget
  always; retain, holdout, idk (refusal answers) and target (targeted answers) when needed. The idk and
  target streams are derived from the forget items, so their row ``i`` pairs with forget row ``i``.
* :class:`StepBatches` samples them: forget, retain and holdout each with their own
  :class:`~dist_unlearn.data.sampling.StepSampler` (global batch ``G`` split over ranks, seeded per
  stream, addressable by step), idk/target rows following this rank's forget rows; ``batch(step)`` is
  this rank's :class:`UnlearnBatch`. The union over ranks at a step is the same for 1 or ``W`` ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from dist_unlearn.data.facts import QAItem
from dist_unlearn.data.qa import QADataset, collate_qa
from dist_unlearn.data.refusals import idk_items, target_items
from dist_unlearn.data.sampling import StepSampler
from dist_unlearn.unlearning.batch import DataNeeds, UnlearnBatch

PAIRED_STREAMS = ("idk", "target")
"""Streams whose rows follow the forget rows (same dataset index)."""


def paired_stream(name: str, forget_items: Sequence[QAItem], tokenizer: Any, max_length: int) -> QADataset:
    """The ``idk`` (refusal answers) or ``target`` (targeted answers) stream of ``forget_items``."""
    if name == "idk":
        return QADataset(idk_items(forget_items), tokenizer, max_length)
    if name == "target":
        return QADataset(target_items(forget_items), tokenizer, max_length)
    raise ValueError(f"no paired stream {name!r}; one of {', '.join(PAIRED_STREAMS)}")


def qa_streams(
    split: Callable[[str], Sequence[QAItem]], needs: DataNeeds, tokenizer: Any, max_length: int
) -> dict[str, QADataset]:
    """The datasets an objective reads, from ``split(name)`` (e.g. ``FactsBenchmark.split``): forget
    always; retain, holdout, idk, target when ``needs`` says so."""
    forget_items = split("forget")
    out = {"forget": QADataset(forget_items, tokenizer, max_length)}
    if needs.retain:
        out["retain"] = QADataset(split("retain"), tokenizer, max_length)
    if needs.holdout:
        out["holdout"] = QADataset(split("holdout"), tokenizer, max_length)
    for name in PAIRED_STREAMS:
        if getattr(needs, name):
            out[name] = paired_stream(name, forget_items, tokenizer, max_length)
    return out


def missing_streams(needs: DataNeeds, streams: Mapping[str, Any]) -> list[str]:
    """Names of the streams ``needs`` reads that ``streams`` lacks (forget first)."""
    wanted = ["forget"] + [n for n in ("retain", "holdout", *PAIRED_STREAMS) if getattr(needs, n)]
    return [name for name in wanted if streams.get(name) is None]


class StepBatches:
    """This rank's sub-batches of every stream at step ``s`` (see the module docstring).

    Args:
        streams: stream name → map-style dataset of :func:`collate_qa` examples (``forget`` required;
            paired streams as long as ``forget``).
        needs: what the objective reads; only those streams are sampled.
        forget_batch_size: global forget rows per step (holdout uses the same); ``retain_batch_size``:
            global retain rows (0 = no retain batch).
        rank, world_size, seed: this process's place and the run seed.
        pad_token_id: padding of :func:`collate_qa`.
    """

    def __init__(
        self,
        streams: Mapping[str, Any],
        needs: DataNeeds,
        *,
        forget_batch_size: int,
        retain_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        pad_token_id: int,
    ) -> None:
        self.streams, self.pad_token_id = streams, pad_token_id
        sizes = {"forget": forget_batch_size}
        if needs.retain and retain_batch_size > 0:
            sizes["retain"] = retain_batch_size
        if needs.holdout:
            sizes["holdout"] = forget_batch_size
        self.samplers = {
            name: StepSampler(len(streams[name]), size, rank, world_size, seed, name) for name, size in sizes.items()
        }
        self.paired = [name for name in PAIRED_STREAMS if name in streams and getattr(needs, name)]

    def indices(self, step: int) -> dict[str, list[int]]:
        """Dataset indices of this rank's rows at ``step``, per stream (paired streams = forget's)."""
        out = {name: sampler.indices(step) for name, sampler in self.samplers.items()}
        out.update({name: out["forget"] for name in self.paired})
        return out

    def sub_batch(self, name: str, indices: list[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        rows = [self.streams[name][i] for i in indices]
        return {k: v.to(device) for k, v in collate_qa(rows, self.pad_token_id).items()}

    def batch(self, step: int, device: torch.device | str = "cpu") -> UnlearnBatch:
        """This rank's :class:`UnlearnBatch` at ``step``."""
        return UnlearnBatch(**{name: self.sub_batch(name, idx, device) for name, idx in self.indices(step).items()})
