"""A stand-in causal LM whose logits are given tensors, so objectives can be checked on fixed numbers.

It has the structure the chunked LM path expects (a decoder under ``base_model_prefix`` and an output
head): the decoder returns the fixed logits of the batch as its "hidden states" and the head is the
identity, so ``forward_sequence_stats`` and every objective see exactly these logits.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class _Body(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.by_input: dict[int, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.by_input[id(input_ids)])


class FixedLogitsLM(torch.nn.Module):
    """``model(input_ids=x)`` returns the logits registered for that very ``x`` tensor (``[b, T, V]``)."""

    base_model_prefix = "body"

    def __init__(self, *pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.body = _Body()
        self.head = torch.nn.Identity()
        for logits, input_ids in pairs:
            self.body.by_input[id(input_ids)] = logits

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        hidden = self.body(input_ids, attention_mask).last_hidden_state
        return SimpleNamespace(logits=self.head(hidden))
