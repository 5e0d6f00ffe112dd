"""One objective evaluation: the model's forwards on each sub-batch, computed once and shared by the
forget and retain terms (e.g. RMU's activations and the logged NLL come from the same forward)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dist_unlearn.models.chunked_lm import HiddenStates, forward_hidden, output_head, scored_positions, token_values
from dist_unlearn.models.logprobs import SequenceStats, sequence_stats_from_hidden
from dist_unlearn.unlearning.batch import UnlearnBatch
from dist_unlearn.unlearning.reference import Reference
from dist_unlearn.unlearning.terms import per_sequence_token_mean


class StepContext:
    """Lazily computed quantities of ``model`` on the sub-batches of ``batch``.

    Each sub-batch is forwarded at most once (capturing ``layer_names``); every derived quantity reuses
    that forward, so under ZeRO-3 all ranks run the same sequence of collective forwards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: UnlearnBatch,
        reference: Reference | None,
        layer_names: Sequence[str] = (),
        objective_name: str = "",
    ) -> None:
        self.model, self.batch, self.reference = model, batch, reference
        self.layer_names = tuple(layer_names)
        self.objective_name = objective_name
        self._hidden: dict[str, HiddenStates] = {}
        self._stats: dict[str, SequenceStats] = {}
        self._ref_hidden: dict[str, HiddenStates] = {}

    def sub_batch(self, name: str) -> dict[str, torch.Tensor]:
        return self.batch.get(name)

    def hidden(self, name: str) -> HiddenStates:
        """π_θ's final hidden states ``[b, T, H]`` and captured layers on sub-batch ``name``."""
        if name not in self._hidden:
            self._hidden[name] = forward_hidden(self.model, self.sub_batch(name), self.layer_names)
        return self._hidden[name]

    def stats(self, name: str) -> SequenceStats:
        """:class:`SequenceStats` of π_θ on sub-batch ``name`` (differentiable)."""
        if name not in self._stats:
            self._stats[name] = sequence_stats_from_hidden(
                self.model, self.hidden(name).final, self.sub_batch(name)["labels"]
            )
        return self._stats[name]

    def ref(self) -> Reference:
        if self.reference is None:
            raise ValueError(f"objective '{self.objective_name}' needs a reference model but got reference=None")
        return self.reference

    def ref_logprob(self, name: str) -> torch.Tensor:
        """``log π_ref(y|x)`` ``[b]`` on sub-batch ``name``."""
        return self.ref().sequence_logprob(name, self.sub_batch(name))

    def ref_hidden(self, name: str, layer_names: Sequence[str] = ()) -> HiddenStates:
        key = f"{name}|{','.join(layer_names)}"
        if key not in self._ref_hidden:
            self._ref_hidden[key] = self.ref().hidden(name, self.sub_batch(name), layer_names)
        return self._ref_hidden[key]

    def token_mean(self, name: str, fn: Callable[..., torch.Tensor], with_reference: bool = False) -> torch.Tensor:
        """Per-sequence mean over scored tokens of ``fn`` ``[b]``, chunked through the output head.

        ``fn(logits [c, V], [ref_hidden [c, H],] targets [c]) -> [c]``; with ``with_reference`` the
        aligned π_ref final hidden states of the same positions come second.
        """
        labels = self.sub_batch(name)["labels"]
        mask, targets = scored_positions(labels)
        hidden = self.hidden(name).final[:, :-1][mask]
        aligned: tuple[torch.Tensor, ...] = (targets,)
        if with_reference:
            aligned = (self.ref_hidden(name).final[:, :-1][mask], targets)
        values = token_values(fn, output_head(self.model), hidden, *aligned)
        return per_sequence_token_mean(values, mask)
