"""What an objective consumes per step (:class:`UnlearnBatch`) and what it declares it needs
(:class:`DataNeeds`), so a train loop samples and loads only what is used."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Batch = dict[str, torch.Tensor]
"""A :func:`dist_unlearn.data.qa.collate_qa` dict: ``input_ids``, ``attention_mask``, ``labels`` ``[b, T]``
and ``index`` ``[b]`` (dataset indices; cached references look their values up by it)."""

SUB_BATCHES = ("forget", "retain", "holdout", "idk", "target")
REFERENCE_KINDS = ("seq", "logits", "hidden")
"""``seq``: summed answer log-probs of π_ref; ``logits``: π_ref's token distributions (KL, UNDIAL);
``hidden``: π_ref's activations at named layers (RMU)."""


@dataclass
class UnlearnBatch:
    """This rank's sub-batches for one step.

    forget: forget questions with their true answers ``[b_f, T]``.
    retain: retain questions and answers ``[b_r, T]`` (``None`` when the objective has no retain term).
    holdout: held-out (never trained on) questions and answers (contrastive unlearning's positives).
    idk: the forget questions with refusal answers, row ``i`` paired with forget row ``i``.
    target: the forget questions with targeted responses, row ``i`` paired with forget row ``i``.
    """

    forget: Batch
    retain: Batch | None = None
    holdout: Batch | None = None
    idk: Batch | None = None
    target: Batch | None = None

    def get(self, name: str) -> Batch:
        """The sub-batch ``name``; ValueError naming the missing one."""
        if name not in SUB_BATCHES:
            raise ValueError(f"unknown sub-batch {name!r}; one of {', '.join(SUB_BATCHES)}")
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this objective needs the '{name}' sub-batch but UnlearnBatch.{name} is None")
        return value


@dataclass(frozen=True)
class DataNeeds:
    """What an objective reads. ``reference`` is ``None`` (reference-free) or the kinds it needs from
    π_ref, ``reference_streams`` the sub-batches whose π_ref sequence log-probs it uses (for ``seq``) or
    whose activations/logits it uses (``hidden``/``logits``)."""

    retain: bool = False
    holdout: bool = False
    idk: bool = False
    target: bool = False
    reference: frozenset[str] = frozenset()
    seq_streams: frozenset[str] = frozenset()
    hidden_streams: frozenset[str] = frozenset()
    logits_streams: frozenset[str] = frozenset()

    def __or__(self, other: DataNeeds) -> DataNeeds:
        return DataNeeds(
            self.retain or other.retain,
            self.holdout or other.holdout,
            self.idk or other.idk,
            self.target or other.target,
            self.reference | other.reference,
            self.seq_streams | other.seq_streams,
            self.hidden_streams | other.hidden_streams,
            self.logits_streams | other.logits_streams,
        )

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference)


def needs(
    *,
    retain: bool = False,
    holdout: bool = False,
    idk: bool = False,
    target: bool = False,
    seq: tuple[str, ...] = (),
    hidden: tuple[str, ...] = (),
    logits: tuple[str, ...] = (),
) -> DataNeeds:
    """Shorthand: ``needs(seq=("forget",))`` = π_ref sequence log-probs of the forget answers."""
    kinds = {k for k, streams in (("seq", seq), ("hidden", hidden), ("logits", logits)) if streams}
    return DataNeeds(
        retain, holdout, idk, target, frozenset(kinds), frozenset(seq), frozenset(hidden), frozenset(logits)
    )
