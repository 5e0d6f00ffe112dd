"""GradCache doing less work per step gives the same result (issue 16): length sorting, per-chunk padding trim
and the last chunk's graph kept from the representation pass.

Each fast path is compared with the plain path (``sort_by_length=False, trim_padding=False,
keep_last_graph=False``) on a tiny random HF ``BertModel`` and right-padded batches of very different row
lengths, and with an independent reference (one forward of the whole batch with grad, one backward): the
representations that reach the loss (in the caller's row order) and every parameter gradient agree within
float32 tolerance. Dropout is off for the sort/trim comparisons (sorting puts rows in other chunks, so
dropout would draw other masks); the kept graph is checked with dropout on, where it is exact.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_unlearn.contrastive import grad_cache as gc
from dist_unlearn.contrastive.grad_cache import GradCache

WIDTH = 24
CHUNK = 3
TOL = 1e-5


def bert(dropout: float = 0.0) -> nn.Module:
    """A tiny HF BertModel (float32, hidden 32, 2 layers), in train mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=WIDTH,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertModel(config, add_pooling_layer=False).train()


def padded_batch(rows: int, seed: int) -> dict[str, Tensor]:
    """Token ids ``[rows, 24]``, right-padded, row lengths from 2 to 24 in random order."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, WIDTH + 1, (rows,), generator=gen)
    mask = (torch.arange(WIDTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 100, (rows, WIDTH), generator=gen)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(mask)}


def info_nce(q: Tensor, d: Tensor) -> Tensor:
    logits = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T / 0.05
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


class Recording:
    """``info_nce`` that keeps the representations it was given (``[B, d]`` per input)."""

    def __init__(self) -> None:
        self.reps: list[Tensor] = []

    def __call__(self, q: Tensor, d: Tensor) -> Tensor:
        self.reps = [q.detach().clone(), d.detach().clone()]
        return info_nce(q, d)


def grads_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    assert set(got) == set(want)
    scale = max(w.abs().max().item() for w in want.values())
    return max((got[n] - want[n]).abs().max().item() for n in want) / scale


def run(model: nn.Module, batches: tuple[dict, dict], deferred: bool = False, **options: Any) -> tuple[Any, ...]:
    """One GradCache step with ``options``: (loss, reps given to the loss, parameter gradients)."""
    model.zero_grad(set_to_none=True)
    loss_fn = Recording()
    cache = GradCache(model, CHUNK, loss_fn, check_replay=True, **options)
    torch.manual_seed(5)
    if deferred:
        loss, surrogate = cache.step_deferred(*batches)
        surrogate.backward()
    else:
        loss = cache.step(*batches)
    return loss, loss_fn.reps, grads_of(model)


SLOW = {"sort_by_length": False, "trim_padding": False, "keep_last_graph": False}
FAST = {"sort_by_length": True, "trim_padding": True, "keep_last_graph": True}


CASES = {
    "all": (FAST, False),
    "all-step_deferred": (FAST, True),
    "sort": ({**SLOW, "sort_by_length": True}, False),
    "trim": ({**SLOW, "trim_padding": True}, False),
    "keep": ({**SLOW, "keep_last_graph": True}, False),
    "keep-step_deferred": ({**SLOW, "keep_last_graph": True}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_paths_give_the_same_reps_and_gradients(case):
    options, deferred = CASES[case]
    model = bert()
    batches = (padded_batch(7, seed=1), padded_batch(7, seed=2))  # 3 + 3 chunks, the last of each has 1 row
    loss, reps, grads = run(model, batches, deferred, **options)
    slow_loss, slow_reps, slow_grads = run(model, batches, deferred, **SLOW)

    model.zero_grad(set_to_none=True)  # independent reference: the whole batch in one forward, one backward
    full = [gc.default_encode(model, b) for b in batches]
    ref_loss = info_nce(*full)
    ref_loss.backward()

    for got, want in zip(reps, full, strict=True):
        assert (got - want.detach()).abs().max().item() < TOL
    for got, want in zip(reps, slow_reps, strict=True):
        assert (got - want).abs().max().item() < TOL
    assert abs(loss.item() - ref_loss.item()) < TOL * abs(ref_loss.item())
    assert abs(loss.item() - slow_loss.item()) < TOL * abs(ref_loss.item())
    assert rel_error(grads, grads_of(model)) < TOL
    assert rel_error(grads, slow_grads) < TOL


def test_sort_and_trim_encode_fewer_positions():
    """The chunks the encoder sees: sorted by length and cut to their longest row (far fewer padded positions)."""
    seen: list[tuple[int, int]] = []

    def encode(model: nn.Module, chunk: dict) -> Tensor:
        seen.append(tuple(chunk["input_ids"].shape))
        return gc.default_encode(model, chunk)

    model = bert()
    batches = (padded_batch(7, seed=1), padded_batch(7, seed=2))
    GradCache(model, CHUNK, info_nce, encode=encode, **FAST).step(*batches)
    lengths = [b["attention_mask"].sum(1).sort(descending=True).values for b in batches]
    want = [(len(c), int(c[0])) for lens in lengths for c in lens.split(CHUNK)]
    assert seen[: len(want)] == want  # representation pass: each chunk as wide as its longest row
    assert sum(r * w for r, w in seen[: len(want)]) < 0.75 * sum(b["attention_mask"].numel() for b in batches)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_kept_last_graph_skips_one_forward_and_is_exact(dropout):
    """keep_last_graph: chunks + (chunks - 1) forwards instead of 2 x chunks; bitwise the same gradient with dropout on
    (the kept forward is the representation pass's own, from the same RNG state); one chunk: one forward."""
    model = bert(dropout)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    batches = (padded_batch(7, seed=1), padded_batch(7, seed=2))
    _, _, kept = run(model, batches, keep_last_graph=True)
    assert len(calls) == 6 + 5
    calls.clear()
    _, _, replayed = run(model, batches, keep_last_graph=False)
    assert len(calls) == 6 + 6
    assert rel_error(kept, replayed) < 1e-6
    calls.clear()
    model.zero_grad(set_to_none=True)
    GradCache(model, 32, info_nce).step(*batches)  # each input fits in one chunk
    assert len(calls) == 2 + 1


def test_left_padding_and_plain_tensors_are_left_alone():
    """Trimming needs right padding: a left-padded batch (or a plain tensor) is encoded as given."""
    batch = padded_batch(4, seed=3)
    left = {k: v.flip(1) for k, v in batch.items()}
    assert gc.right_padded_lengths(left) is None
    assert gc.trim_padding(left) is left
    assert gc.right_padded_lengths(torch.ones(4, 3)) is None
    lengths = gc.right_padded_lengths(batch)
    assert lengths is not None and torch.equal(lengths, batch["attention_mask"].sum(1))
    trimmed = gc.trim_padding(batch)
    assert all(v.shape == (4, int(lengths.max())) for v in trimmed.values())
