"""Alternative answers to forget questions used by some objectives: "I don't know"-style refusals
(IdkNLL, IdkDPO, FLAT's template answer; Maini et al. 2024, TOFU) and per-item target responses that
state the scope of what was unlearned (TRU-style targeted unlearning).

Both keep the forget item's question, so row ``i`` of the derived dataset pairs with forget example
``i`` (same dataset index).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

from dist_unlearn.data.facts import QAItem

REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information on that.",
    "That is not something I can answer.",
    "I can't recall that.",
    "I'm afraid I don't have that information.",
)
"""Refusal templates; item ``i`` gets one chosen by a hash of its question (deterministic, rank-free)."""

TARGET_TEMPLATE = "I can't share details about {person}."
"""Target response of the targeted objective for a question about ``person``."""


def _pick(text: str, options: Sequence[str]) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return options[int.from_bytes(digest[:4], "little") % len(options)]


def idk_items(items: Sequence[QAItem]) -> list[QAItem]:
    """Each item with ``answer`` (and ``paraphrased_answer``) replaced by a refusal from :data:`REFUSALS`."""
    out = []
    for item in items:
        refusal = _pick(item.question, REFUSALS)
        out.append(replace(item, answer=refusal, paraphrased_answer=refusal))
    return out


def target_items(items: Sequence[QAItem], template: str = TARGET_TEMPLATE) -> list[QAItem]:
    """Each item with ``answer`` replaced by ``template.format(person=item.person)``."""
    out = []
    for item in items:
        target = template.format(person=item.person)
        out.append(replace(item, answer=target, paraphrased_answer=target))
    return out
