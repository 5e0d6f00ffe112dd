"""Gradient caching: an exact contrastive step over a batch far larger than one forward fits in memory.

Implements the algorithm of Gao, Zhang, Han and Callan (2021), "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup" (RepL4NLP; arXiv:2101.06983). A contrastive loss couples every example
of the batch, so it cannot be split into independent micro-batches; but it depends on the encoder only
through the representations ``R = f_θ(X)`` ``[B, d]``. By the chain rule

    ∂L/∂θ = Σ_i (∂L/∂r_i) · ∂r_i/∂θ,

so one step is:

1. **Representation pass** (no grad): encode every chunk of ``chunk_size`` rows, keep only its
   representations and the RNG state it started from (CPU and, once initialised, every CUDA device).
2. **Gradient cache**: ``loss = loss_fn(*R)`` on detached leaves ``R`` that require grad; ``backward``
   gives ``G = ∂L/∂R`` ``[B, d]``. The loss sees the whole batch, so it may also gather across ranks.
3. **Replay**: for each chunk, restore its RNG state (so dropout draws the same masks), encode again
   with grad and backpropagate the surrogate ``Σ (r_chunk · G_chunk)``, whose gradient with respect to
   θ is that chunk's share of ``∂L/∂θ``. Parameter gradients accumulate across chunks.

Cost: one extra forward per step. Memory: one chunk's activations plus the ``B × d`` representations.
The result is the full-batch gradient, not an approximation (checked against a plain full-batch
backward in ``tests/test_grad_cache.py``).

Accumulation across chunks is exact for each kind of model:

- plain ``nn.Module``: ``surrogate.backward()`` per chunk.
- ``DistributedDataParallel``: every chunk but the last runs (forward and backward) inside
  ``model.no_sync()``; the last backward all-reduces the accumulated gradients once.
- ``deepspeed.DeepSpeedEngine``: gradients always go through ``engine.backward`` (never around it, so
  ZeRO's hooks, partitioning and fp16 loss scaling apply). ZeRO-1/2/3: all chunk backwards run inside
  ``engine.coalesce_grad_reduction()``, one reduction at the end. (Without it or boundaries, several
  ``engine.backward`` calls in one ZeRO-1/2 step give silently wrong gradients; the tests measure a
  relative error of 1.4.) Where that context raises ``NotImplementedError`` (ZeRO-0, the BF16/FP16
  optimizer wrappers) or does not exist (older DeepSpeed), the fallback marks gradient-accumulation
  boundaries: ``set_gradient_accumulation_boundary(False)`` before every chunk but the last, ``True``
  before the last (and left ``True``: the same as DeepSpeed's own answer with one accumulation step),
  so gradients accumulate locally and are reduced once. The tests check both paths against a
  one-process reference on ZeRO 0-3.
- ``engine.backward`` divides the loss by ``gradient_accumulation_steps``; GradCache calls it with
  ``scale_wrt_gas=False`` (the same as pre-multiplying the surrogate by that number), so the
  accumulated gradient is the full-batch gradient of ``loss_fn``. One :meth:`GradCache.step` is one
  optimizer step's gradient, so the DeepSpeed config must have ``gradient_accumulation_steps: 1``
  (grow the GradCache batch instead of accumulating); other values are refused in ``__init__``.

Ranks may hold batches of different sizes. ZeRO-3 gathers parameters in every forward and backward (and
DDP may broadcast buffers in forward), so all ranks must run the same number of passes: under DDP and
DeepSpeed the ranks agree on the largest chunk count per input (one small ``all_reduce``), and a rank
with fewer chunks runs one-row "ghost" chunks whose surrogate has weight 0 (and whose forwards draw
from a forked RNG, leaving the global RNG untouched).

Exactness needs a forward that is a function of (parameters, inputs, RNG state). Dropout is fine; a
module that changes its own state in forward (batch-norm running statistics) is updated twice per
step. ``check_replay=True`` verifies the replayed representations against the cached ones.

GradCache never steps the optimizer: call ``engine.step()`` (DeepSpeed) or ``optimizer.step()`` /
``optimizer.zero_grad()`` yourself after :meth:`GradCache.step`, so it plugs into an existing loop::

    cache = GradCache(engine, chunk_size=64, loss_fn=info_nce)
    for queries, docs in loader:                # each a dict of [B, T] tensors
        loss = cache.step(queries, docs)        # gradients of info_nce(q_reps, d_reps) are now in place
        engine.step()
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

Batch = Tensor | Mapping[str, Any]
"""One input batch: a tensor ``[B, ...]`` or a mapping (dict, HF ``BatchEncoding``) of tensors ``[B, ...]``."""

Encoder = Callable[[Any, Batch], Tensor]
"""``encode(model, chunk) -> reps [n, d]`` for a chunk of ``n`` rows."""


# --- batches ------------------------------------------------------------------------------------


def batch_size(batch: Batch) -> int:
    """Number of rows of ``batch``: dim 0 of the tensor, or of the first tensor of a mapping."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, Tensor):
                return value.shape[0]
    raise TypeError(f"a GradCache input must be a tensor or a mapping of tensors, got {type(batch).__name__}")


def slice_batch(batch: Batch, start: int, end: int) -> Batch:
    """Rows ``start:end`` of ``batch``; non-tensor mapping values are passed through unchanged."""
    if isinstance(batch, Tensor):
        return batch[start:end]
    return {key: value[start:end] if isinstance(value, Tensor) else value for key, value in batch.items()}


def split_batch(batch: Batch, chunk_size: int) -> list[Batch]:
    """``batch`` cut along dim 0 into chunks of ``chunk_size`` rows (the last may be smaller)."""
    rows = batch_size(batch)
    if rows == 0:
        raise ValueError("GradCache got an empty batch (0 rows); every rank needs at least one row per input")
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            if isinstance(value, Tensor) and value.shape[0] != rows:
                raise ValueError(f"input field {key!r} has {value.shape[0]} rows, expected {rows} like the others")
    return [slice_batch(batch, start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]


def first_device(batches: Sequence[Batch]) -> torch.device:
    """Device of the first tensor found in ``batches``; the CPU if there is none."""
    for batch in batches:
        values = [batch] if isinstance(batch, Tensor) else list(batch.values())
        for value in values:
            if isinstance(value, Tensor):
                return value.device
    return torch.device("cpu")


def ghost_chunk(chunk: Batch) -> Batch:
    """A one-row stand-in for a chunk that this rank does not have (see :func:`agreed_chunk_counts`)."""
    return slice_batch(chunk, 0, 1)


def agreed_chunk_counts(counts: list[int], device: torch.device) -> list[int]:
    """Per input, the largest number of chunks any rank has (``all_reduce`` MAX); ``counts`` if not distributed.

    ZeRO-3 gathers parameters inside every forward and backward, and DDP may broadcast buffers in
    forward, so every rank must run the same number of passes even when the ranks' batches differ in size.
    A rank with fewer chunks adds one-row "ghost" chunks whose surrogate has zero weight.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    agreed = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return [int(n) for n in agreed.tolist()]


# --- encoding -----------------------------------------------------------------------------------


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of ``hidden`` ``[n, T, d]`` over the positions where ``attention_mask`` ``[n, T]`` is 1 → ``[n, d]``."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def default_encode(model: Any, chunk: Batch) -> Tensor:
    """Representations ``[n, d]`` of one chunk.

    Calls ``model(**chunk)`` for a mapping and ``model(chunk)`` for a tensor. A tensor output is used as
    is; an output with ``last_hidden_state`` ``[n, T, d]`` (HF encoders) is mean-pooled over the positions
    where ``chunk["attention_mask"]`` is 1 (all positions without a mask). Pass your own ``encode`` for
    anything else (CLS pooling, a projection head, a two-tower model).
    """
    out = model(**chunk) if isinstance(chunk, Mapping) else model(chunk)
    if isinstance(out, Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        mask = chunk.get("attention_mask") if isinstance(chunk, Mapping) else None
        return mean_pool(hidden, mask)
    raise TypeError(
        f"default_encode cannot make representations from a {type(out).__name__}; "
        "pass encode=lambda model, chunk: ... returning a [n, d] tensor"
    )


# --- RNG state ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RngState:
    """The CPU RNG state and, when CUDA is initialised, the RNG state of every CUDA device."""

    cpu: Tensor
    cuda: list[Tensor] | None

    @classmethod
    def capture(cls) -> RngState:
        """Snapshot the current RNG states (does not initialise CUDA)."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the block from this state; afterwards the global RNG states are what they were before."""
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


# --- the wrapped model --------------------------------------------------------------------------


def deepspeed_engine_type() -> type | None:
    """``deepspeed.DeepSpeedEngine`` if DeepSpeed is already imported (an engine exists only then), else None."""
    module = sys.modules.get("deepspeed")
    return getattr(module, "DeepSpeedEngine", None) if module is not None else None


def model_kind(model: Any) -> str:
    """``"deepspeed"``, ``"ddp"`` or ``"plain"`` for a DeepSpeed engine, a DDP module or anything else."""
    engine_type = deepspeed_engine_type()
    if engine_type is not None and isinstance(model, engine_type):
        return "deepspeed"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    return "plain"


def check_engine(engine: Any) -> None:
    """Refuse DeepSpeed set-ups where GradCache's accumulation would not be exact (see module docstring)."""
    if getattr(engine, "pipeline_parallelism", False):
        raise ValueError(
            "GradCache does not support DeepSpeed pipeline parallelism (PipelineEngine runs its own schedule); "
            "use a data-parallel DeepSpeedEngine with ZeRO 0-3"
        )
    if hasattr(engine, "managed_gradient_accumulation") and not engine.managed_gradient_accumulation():
        raise ValueError(
            "GradCache needs DeepSpeed's managed gradient accumulation (it marks the accumulation boundary "
            "itself); remove managed_gradient_accumulation=false from the DeepSpeed config"
        )
    gas = engine.gradient_accumulation_steps()
    if gas != 1:
        raise ValueError(
            f"DeepSpeed config has gradient_accumulation_steps={gas}, but one GradCache.step() makes one "
            "optimizer step's gradient from the whole batch; set gradient_accumulation_steps=1 and make the "
            "GradCache batch larger instead of accumulating"
        )
    if getattr(engine, "optimizer", None) is None:
        raise ValueError("GradCache needs a DeepSpeed engine with an optimizer (engine.backward requires one)")


# --- GradCache ----------------------------------------------------------------------------------


class GradCache:
    """Exact contrastive steps over large batches, encoded ``chunk_size`` rows at a time (Gao et al., 2021).

    Args:
        model: the encoder: a plain ``nn.Module`` (PEFT/LoRA and gradient checkpointing are fine), a
            ``DistributedDataParallel`` module, or a ``deepspeed.DeepSpeedEngine`` (ZeRO 0-3,
            ``gradient_accumulation_steps`` 1). The same model encodes every input (shared encoder);
            for separate towers, make ``encode`` pick the tower from the chunk.
        chunk_size: rows per forward; bounds activation memory. The result does not depend on it.
        loss_fn: ``loss_fn(*reps, **loss_kwargs) -> scalar`` where ``reps[i]`` ``[B_i, d]`` are the
            representations of ``inputs[i]`` of :meth:`step`. It may gather across ranks with autograd
            (``torch.distributed.nn.functional.all_gather``); every rank must then call :meth:`step`.
        encode: ``encode(model, chunk) -> [n, d]``; default :func:`default_encode` (tensor output, or
            ``last_hidden_state`` mean-pooled with the attention mask).
        check_replay: after each re-forward, compare the new representations with the cached ones and
            raise ``RuntimeError`` if they differ by more than ``replay_atol`` (e.g. if dropout does not
            draw the same masks). Costs one comparison per chunk.
        replay_atol: the largest absolute difference ``check_replay`` accepts.
        autocast_dtype: if set, both forwards run under ``torch.autocast(device_type, autocast_dtype)``
            with the device type of the inputs. (A DeepSpeed engine's own bf16/fp16 settings apply too.)

    :meth:`step` leaves the full-batch gradient in the parameters (in DeepSpeed's gradient partitions
    for an engine) and returns the detached loss; it never steps or zeroes the optimizer.
    """

    def __init__(
        self,
        model: Any,
        chunk_size: int,
        loss_fn: Callable[..., Tensor],
        encode: Encoder | None = None,
        check_replay: bool = False,
        replay_atol: float = 1e-5,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if replay_atol < 0:
            raise ValueError(f"replay_atol must be >= 0, got {replay_atol}")
        self.model = model
        self.chunk_size = chunk_size
        self.loss_fn = loss_fn
        self.encode = encode if encode is not None else default_encode
        self.check_replay = check_replay
        self.replay_atol = replay_atol
        self.autocast_dtype = autocast_dtype
        self.kind = model_kind(model)
        if self.kind == "deepspeed":
            check_engine(model)
        self.ds_accumulation: str | None = None
        """For an engine: ``"coalesce"`` or ``"boundary"``, the accumulation used by the last step."""

    # -- public --------------------------------------------------------------------------------

    def step(self, *inputs: Batch, **loss_kwargs: Any) -> Tensor:
        """One exact contrastive step: gradients of ``loss_fn(*reps, **loss_kwargs)`` reach the model.

        Args:
            inputs: one or more batches (e.g. a query batch ``[Bq, ...]`` and a document batch
                ``[Bd, ...]``), each a tensor or a mapping of tensors sharing dim 0. Each is encoded
                chunk by chunk into ``reps[i]`` ``[B_i, d]``. Under DDP/DeepSpeed every rank calls
                ``step`` with the same number of inputs; row counts may differ between ranks (every
                rank still runs the same number of forwards and backwards, see
                :func:`agreed_chunk_counts`).
            loss_kwargs: passed to ``loss_fn`` unchanged.

        Returns:
            the loss, detached (a 0-dim tensor).
        """
        if not inputs:
            raise ValueError("GradCache.step needs at least one input batch")
        chunks = [split_batch(batch, self.chunk_size) for batch in inputs]
        device = first_device(inputs)
        real = [len(input_chunks) for input_chunks in chunks]
        if self.kind != "plain":
            agreed = agreed_chunk_counts(real, self._collective_device(device))
            chunks = [c + [ghost_chunk(c[0])] * (n - len(c)) for c, n in zip(chunks, agreed, strict=True)]
        reps, states = self._representation_pass(chunks, real, device.type)
        loss, grads = self._cache_gradients(reps, loss_kwargs)
        self._replay(chunks, real, states, reps, grads, device.type)
        return loss.detach()

    # -- the three phases ----------------------------------------------------------------------

    def _collective_device(self, input_device: torch.device) -> torch.device:
        """Where a small tensor for a collective must live: the engine's device, else the inputs'."""
        device = getattr(self.model, "device", None) if self.kind == "deepspeed" else None
        return torch.device(device) if device is not None else input_device

    def _autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for the forwards when ``autocast_dtype`` is set, else a no-op."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def _encode(self, chunk: Batch, device_type: str) -> Tensor:
        """``encode(model, chunk)`` under autocast, checked to be ``[n, d]`` with ``n`` the chunk's rows."""
        with self._autocast(device_type):
            reps = self.encode(self.model, chunk)
        rows = batch_size(chunk)
        if not isinstance(reps, Tensor) or reps.dim() != 2 or reps.shape[0] != rows:
            shape = tuple(reps.shape) if isinstance(reps, Tensor) else type(reps).__name__
            raise ValueError(f"encode must return a [n, d] tensor with n={rows} rows for this chunk, got {shape}")
        return reps

    def _representation_pass(
        self, chunks: list[list[Batch]], real: list[int], device_type: str
    ) -> tuple[list[list[Tensor]], list[list[RngState]]]:
        """Phase 1: no-grad representations of every real chunk and the RNG state each chunk started from.

        Ghost chunks (index ``>= real[i]``) are encoded too, to match the other ranks' collectives, but
        from a forked RNG so that they draw nothing from the global generators; their output is dropped.
        """
        reps: list[list[Tensor]] = []
        states: list[list[RngState]] = []
        with torch.no_grad():
            for input_chunks, n_real in zip(chunks, real, strict=True):
                reps.append([])
                states.append([])
                for j, chunk in enumerate(input_chunks):
                    state = RngState.capture()
                    states[-1].append(state)
                    if j < n_real:
                        reps[-1].append(self._encode(chunk, device_type).detach())
                    else:
                        with state.restored():
                            self._encode(chunk, device_type)
        return reps, states

    def _cache_gradients(
        self, reps: list[list[Tensor]], loss_kwargs: dict[str, Any]
    ) -> tuple[Tensor, list[list[Tensor]]]:
        """Phase 2: ``loss_fn`` on the detached full representations; returns the loss and ∂L/∂reps per chunk."""
        leaves = [torch.cat(input_reps).requires_grad_() for input_reps in reps]
        loss = self.loss_fn(*leaves, **loss_kwargs)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar (0-dim) tensor")
        if not loss.requires_grad:
            raise ValueError("loss_fn's result does not depend on the representations (no grad_fn)")
        loss.backward()
        grads = []
        for leaf, input_reps in zip(leaves, reps, strict=True):
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            grads.append(list(grad.split([r.shape[0] for r in input_reps])))
        return loss, grads

    def _replay(
        self,
        chunks: list[list[Batch]],
        real: list[int],
        states: list[list[RngState]],
        reps: list[list[Tensor]],
        grads: list[list[Tensor]],
        device_type: str,
    ) -> None:
        """Phase 3: re-forward every chunk with grad from its saved RNG state and backpropagate the surrogate.

        The surrogate of chunk ``c`` is ``Σ r_c ⊙ G_c`` (``G_c`` = cached ∂L/∂r_c, a constant), whose
        parameter gradient is chunk ``c``'s share of ∂L/∂θ; a ghost chunk's surrogate is ``0 · Σ r``.
        """
        order = [(i, j) for i, input_chunks in enumerate(chunks) for j in range(len(input_chunks))]
        with self._accumulation() as before_chunk:
            for position, (i, j) in enumerate(order):
                last = position == len(order) - 1
                with before_chunk(last), states[i][j].restored():
                    new_reps = self._encode(chunks[i][j], device_type)
                    if j >= real[i]:
                        surrogate = new_reps.sum() * 0.0
                    else:
                        if self.check_replay:
                            self._verify_replay(new_reps, reps[i][j], i, j)
                        surrogate = (new_reps * grads[i][j]).sum()
                    self._backward(surrogate)

    # -- gradient accumulation per model kind --------------------------------------------------

    @contextlib.contextmanager
    def _accumulation(self) -> Iterator[Callable[[bool], contextlib.AbstractContextManager]]:
        """Context for the whole replay; yields ``before_chunk(last)``, the context for one chunk."""
        if self.kind == "ddp":
            yield lambda last: contextlib.nullcontext() if last else self.model.no_sync()
        elif self.kind == "deepspeed":
            with self._deepspeed_accumulation() as before_chunk:
                yield before_chunk
        else:
            yield lambda last: contextlib.nullcontext()

    @contextlib.contextmanager
    def _deepspeed_accumulation(self) -> Iterator[Callable[[bool], contextlib.AbstractContextManager]]:
        """``coalesce_grad_reduction`` where DeepSpeed supports it, else accumulation boundaries."""
        engine = self.model
        coalesce = getattr(engine, "coalesce_grad_reduction", None)
        context = None
        if coalesce is not None:
            try:
                context = coalesce()
                context.__enter__()
            except NotImplementedError:  # ZeRO-0, BF16/FP16 optimizer wrappers
                context = None
        if context is not None:
            self.ds_accumulation = "coalesce"
            with contextlib.ExitStack() as stack:
                stack.push(context)  # its __exit__ does the single reduction
                yield lambda last: contextlib.nullcontext()
            return
        self.ds_accumulation = "boundary"

        @contextlib.contextmanager
        def boundary(last: bool) -> Iterator[None]:
            engine.set_gradient_accumulation_boundary(last)
            yield

        yield boundary

    def _backward(self, surrogate: Tensor) -> None:
        """Backpropagate one chunk's surrogate; through ``engine.backward`` for DeepSpeed (no 1/gas divisor)."""
        if self.kind == "deepspeed":
            self.model.backward(surrogate, scale_wrt_gas=False)
        else:
            surrogate.backward()

    def _verify_replay(self, new_reps: Tensor, cached: Tensor, input_index: int, chunk_index: int) -> None:
        """Raise ``RuntimeError`` if the re-forwarded representations differ from the cached ones."""
        diff = (new_reps.detach().float() - cached.float()).abs().max().item()
        if not diff <= self.replay_atol:
            raise RuntimeError(
                f"GradCache replay mismatch: input {input_index}, chunk {chunk_index}: re-forwarded representations "
                f"differ from the cached ones by max |Δ| = {diff:.3e} > replay_atol = {self.replay_atol:.1e}. "
                "The model is not deterministic given the restored RNG state (random ops outside torch's CPU/CUDA "
                "generators, non-deterministic kernels, or state changed between the passes, e.g. batch-norm "
                "statistics); the gradient would not be exact"
            )
