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

Cost: one extra forward per chunk but the last (whose graph from phase 1 is kept, ``keep_last_graph``; under
DDP/DeepSpeed every chunk is replayed). Memory: one chunk's activations plus the ``B × d`` representations.
Less work on texts of varied length: ``sort_by_length`` groups rows of similar length into the same chunks and
``trim_padding`` cuts each chunk to its own longest row (the representations are put back in the caller's
order before the loss, so the result does not change; tested against the unsorted, untrimmed path).
The result is the full-batch gradient, not an approximation (checked against a plain full-batch
backward in ``tests/test_grad_cache.py``).

Accumulation across chunks is exact for each kind of model:

- plain ``nn.Module``: ``surrogate.backward()`` per chunk.
- ``DistributedDataParallel``: every chunk but the last runs (forward and backward) inside
  ``model.no_sync()``; the last backward all-reduces the accumulated gradients once.
- ``deepspeed.DeepSpeedEngine``: gradients always go through ``engine.backward`` (never around it, so
  ZeRO's hooks, partitioning and fp16 loss scaling apply). ZeRO-3: one plain ``engine.backward`` per
  chunk; each reduce-scatters into this rank's gradient partition and the partitions add up exactly
  (tested), so no whole gradient is ever held. ZeRO-3 overwrites a partition in the step's first backward
  and adds to it in later ones, so a parameter first reached by a later chunk (a passage-only tower or
  projection, a parameter used by the last chunk only) would be added to the previous step's stale
  partition: before the step's first backward GradCache zeroes every partition
  (:func:`zero_stage3_gradient_partitions`; two-tower test over two optimizer steps). ZeRO-1/2: all chunk
  backwards run inside ``engine.coalesce_grad_reduction()``, one reduction at the end. (Without it or
  boundaries, several ``engine.backward`` calls in one ZeRO-1/2 step give silently wrong gradients; the
  tests measure a relative error of 1.4.) Where that context raises ``NotImplementedError`` (ZeRO-0, the
  BF16/FP16 optimizer wrappers) or does not exist (older DeepSpeed), the fallback marks
  gradient-accumulation boundaries: ``set_gradient_accumulation_boundary(False)`` before every chunk but
  the last, ``True`` before the last (and left ``True``: the same as DeepSpeed's own answer with one
  accumulation step), so gradients accumulate locally and are reduced once. The tests check both paths
  against a one-process reference on ZeRO 0-3.
- ``engine.backward`` divides the loss by ``gradient_accumulation_steps``; GradCache calls it with
  ``scale_wrt_gas=False`` (the same as pre-multiplying the surrogate by that number), so the
  accumulated gradient is the full-batch gradient of ``loss_fn``. One :meth:`GradCache.step` is one
  optimizer step's gradient, so the DeepSpeed config must have ``gradient_accumulation_steps: 1``
  (grow the GradCache batch instead of accumulating); other values are refused in ``__init__``, and a
  second :meth:`GradCache.step` before ``engine.step()`` is refused (``RuntimeError``).

The loss's own parameters (learnable temperature, SigLIP scale and bias) run outside the wrapper; their
gradients are all-reduce-averaged across ranks like the model's, so they too are the global-batch
gradient, identical on every rank (see :class:`GradCache`).

Ranks may hold batches of different sizes, including 0 rows on a rank (as long as some rank has rows
for each input: the rank then encodes its empty input, ``[0, d]``, and takes part in every collective).
ZeRO-3 gathers parameters in every forward and backward (and DDP may broadcast buffers in forward), so
all ranks must run the same number of passes: under DDP and DeepSpeed the ranks agree on the largest
chunk count per input (one small all-gather of every rank's chunk and row counts per input, the step's only size
exchange: the row counts also serve the loss's cross-rank gathers), and a rank with fewer chunks runs "ghost"
chunks (one row, or 0 rows for an empty input) whose surrogate has weight 0 (and whose forwards draw from a
forked RNG, leaving the global RNG untouched).

Half precision: the loss and the cached ``∂L/∂R`` are float32 whatever the compute dtype; float16 without
DeepSpeed takes a ``torch.amp.GradScaler`` (``scaler=``) that scales every chunk's backward and the loss
parameters' gradients alike, while under DeepSpeed fp16 the engine's own loss scale applies (see
:class:`GradCache`, "float16 and loss scaling").

Exactness needs a forward that is a function of (parameters, inputs, RNG state). Dropout is fine; a
module that changes its own state in forward (batch-norm running statistics) is updated twice per
step. ``check_replay=True`` verifies the replayed representations against the cached ones.

For a framework that calls ``backward`` itself once per step (HF/sentence-transformers ``Trainer``,
``accelerator.backward``), :meth:`GradCache.step_deferred` runs everything but the last chunk's backward and
returns that chunk's surrogate for the framework's backward, which then completes the step and reduces it once.

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
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_unlearn.contrastive.losses import float32_for_half
from dist_unlearn.distributed.gather import gather_sizes, known_row_counts

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
    """``batch`` cut along dim 0 into chunks of ``chunk_size`` rows (the last may be smaller).

    A batch of 0 rows is one chunk of 0 rows (its forward gives the ``[0, d]`` representations that a
    cross-rank loss needs from a rank without rows; see :meth:`GradCache.step`).
    """
    rows = batch_size(batch)
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            if isinstance(value, Tensor) and value.shape[0] != rows:
                raise ValueError(f"input field {key!r} has {value.shape[0]} rows, expected {rows} like the others")
    if rows == 0:
        return [batch]
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
    """A one-row stand-in for a chunk that this rank does not have (see :func:`agreed_chunk_counts`).

    Made of the first row of the rank's first chunk (real data, so the ghost forward is as well-behaved as a
    real one); 0 rows when the rank has no rows for that input.
    """
    return slice_batch(chunk, 0, 1)


def right_padded_lengths(batch: Batch) -> Tensor | None:
    """Token count per row ``[B]`` of a mapping with a right-padded 2-D ``attention_mask`` ``[B, T]``, else None.

    Right-padded: in every row the mask is non-zero on a prefix of positions and zero after it (what HF and
    sentence-transformers tokenizers produce with ``padding_side="right"``). Only then can a chunk's trailing
    padding columns be cut without moving any real token (see :func:`trim_padding`).
    """
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] == 0:
        return None
    real = mask != 0
    lengths = real.sum(dim=1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    return lengths if bool(torch.equal(real, prefix)) else None


def sort_rows(batch: Mapping[str, Any], lengths: Tensor) -> tuple[dict[str, Any], Tensor]:
    """``batch`` with its rows ordered by decreasing length (stable), and that order ``[B]``.

    Every tensor value with ``B`` rows is reordered (``value[order]``); other values pass through. The
    representations of the sorted rows are put back in the caller's order with ``reps[argsort(order)]``.
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    rows = lengths.shape[0]
    sorted_batch = {
        key: value[order.to(value.device)]
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows
        else value
        for key, value in batch.items()
    }
    return sorted_batch, order


def trim_padding(chunk: Batch) -> Batch:
    """A right-padded chunk cut to its own longest row: ``[n, T, ...] -> [n, T_chunk, ...]``.

    Cuts dim 1 of every tensor value whose first two dims are ``[n, T]`` (``input_ids``, ``attention_mask``,
    ``token_type_ids``, ...), ``T`` being the mask's width; everything else is unchanged. With right padding
    the cut columns are masked for every row, so an encoder with absolute positions and masked attention (BERT
    and its kin) gives the same representations up to floating-point rounding. Chunks that are not right-padded
    mappings (see :func:`right_padded_lengths`) are returned as they are.
    """
    lengths = right_padded_lengths(chunk)
    if lengths is None:
        return chunk
    assert isinstance(chunk, Mapping)
    width = chunk["attention_mask"].shape[1]
    keep = max(int(lengths.max()), 1)
    if keep >= width:
        return chunk
    rows = lengths.shape[0]
    return {
        key: value[:, :keep]
        if isinstance(value, Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (rows, width)
        else value
        for key, value in chunk.items()
    }


def agreed_chunk_counts(
    counts: list[int], device: torch.device, rows: list[int] | None = None
) -> tuple[list[int], list[list[int]] | None]:
    """Per input, the largest number of chunks any rank has, and every rank's row count: one size exchange.

    ZeRO-3 gathers parameters inside every forward and backward, and DDP may broadcast buffers in
    forward, so every rank must run the same number of passes even when the ranks' batches differ in size.
    A rank with fewer chunks adds one-row "ghost" chunks whose surrogate has zero weight.

    One all-gather (:func:`~dist_unlearn.distributed.gather.gather_sizes`) of ``counts + rows`` from every rank
    gives both the agreed chunk counts (the maximum over ranks) and, per input ``i``, the row counts
    ``[B_i^0, ..., B_i^{W-1}]`` that a cross-rank loss gathering that input's representations needs (passed to it
    through :func:`~dist_unlearn.distributed.gather.known_row_counts`, so the loss exchanges no sizes of its own).
    With ``rows`` (this rank's row count per input) it also checks that every input has at least one row on some
    rank; otherwise every rank raises the same ``ValueError``.

    Returns:
        ``(agreed counts, per-input per-rank row counts)``; ``(counts, None)`` when not distributed.
    """
    rows = list(rows) if rows is not None else []
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        agreed_counts, totals, table = counts, rows, None
    else:
        per_rank = gather_sizes(counts + rows, device=device)
        agreed_counts = [max(values[i] for values in per_rank) for i in range(len(counts))]
        table = [[values[len(counts) + i] for values in per_rank] for i in range(len(rows))]
        totals = [sum(column) for column in table]
    empty = [i for i, n in enumerate(totals) if n == 0]
    if empty:
        raise ValueError(
            f"GradCache got an empty batch: input {empty[0]} has 0 rows on every rank; the global batch needs "
            "at least one row per input (a single rank may have 0 rows)"
        )
    return agreed_counts, table


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


def fsdp_module_types() -> tuple[type, ...]:
    """FSDP's module classes (``FullyShardedDataParallel`` and ``fully_shard``'s ``FSDPModule``) if FSDP is
    already imported (a sharded module exists only then), else ``()``."""
    module = sys.modules.get("torch.distributed.fsdp")
    if module is None:
        return ()
    return tuple(t for t in (getattr(module, n, None) for n in ("FullyShardedDataParallel", "FSDPModule")) if t)


def model_kind(model: Any) -> str:
    """``"deepspeed"``, ``"ddp"`` or ``"plain"`` for a DeepSpeed engine, a DDP module or anything else.

    Raises:
        ValueError: ``model`` is or contains an FSDP module. FSDP gathers each layer's parameters in its
            forward and reduce-scatters its gradients in the backward, per forward: GradCache's extra no-grad
            pass and chunked replays would need FSDP to hold gradient reduction until the last chunk and
            every rank to run the same number of forwards, which it does not arrange.
    """
    fsdp_types = fsdp_module_types()
    if fsdp_types and isinstance(model, nn.Module) and any(isinstance(m, fsdp_types) for m in model.modules()):
        raise ValueError(
            "GradCache does not support FSDP (the model is or contains a FullyShardedDataParallel / fully_shard "
            "module). Fix: wrap the model in DistributedDataParallel, or use DeepSpeed ZeRO-3 for sharded "
            "parameters (GradCache is exact under ZeRO 0-3)"
        )
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


def check_scaler(scaler: Any, kind: str) -> None:
    """Refuse a ``scaler`` that GradCache cannot use with a model of this ``kind`` (see :func:`model_kind`).

    Raises:
        TypeError: ``scaler`` lacks the ``torch.amp.GradScaler`` methods GradCache and the caller use (``scale``,
            ``unscale_``, ``step``, ``update``).
        ValueError: ``kind`` is ``"deepspeed"``: the engine owns fp16 loss scaling, so a second scaler would
            multiply the gradients twice and skip steps the engine does not.
    """
    if scaler is None:
        return
    missing = [name for name in ("scale", "unscale_", "step", "update") if not callable(getattr(scaler, name, None))]
    if missing:
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler, got a {type(scaler).__name__} without {', '.join(missing)}; "
            "pass scaler=torch.amp.GradScaler(device_type)"
        )
    if kind == "deepspeed":
        raise ValueError(
            "GradCache(scaler=...) cannot be used with a DeepSpeed engine: the engine owns fp16 loss scaling "
            "(engine.backward multiplies by its loss scale, engine.step unscales and skips overflowing steps), so a "
            'GradScaler would scale twice. Fix: drop scaler= and set "fp16": {"enabled": true} in the DeepSpeed '
            "config (dynamic loss scaling by default)"
        )


def data_parallel_group(model: Any, kind: str) -> Any:
    """The process group over which ``model``'s wrapper averages gradients (``None``: the default group)."""
    if kind == "ddp":
        return getattr(model, "process_group", None)
    if kind == "deepspeed":  # ZeRO reduces over the sequence-data-parallel group (= data parallel without SP)
        return getattr(model, "seq_data_parallel_group", None) or getattr(model, "data_parallel_group", None)
    return None


def wrapped_parameter_ids(model: Any) -> set[int]:
    """``id`` of every parameter of ``model`` (the module inside a DDP wrapper or DeepSpeed engine)."""
    module = getattr(model, "module", model)
    return {id(param) for param in module.parameters()} if isinstance(module, nn.Module) else set()


def zero_stage3_gradient_partitions(engine: Any) -> bool:
    """Zero this rank's ZeRO-3 gradient partitions of every parameter if no backward has run since the last step.

    ZeRO-3 writes a parameter's reduced gradient into its partition with *copy* semantics in the first backward
    of an optimizer step (``micro_step_id == 0``) and *adds* to it in every later one. A parameter that the
    step's first backward does not reach (GradCache replays chunk by chunk: e.g. a passage tower or a
    projection used only by a later input, or a parameter reached only by the last chunk) would be added to the
    partition still holding the previous step's gradient, and a parameter not reached at all would keep it.
    Zeroing every partition first makes each backward's contribution add to zero, which is what copy semantics
    would give for the parameters it reaches, and gives 0 to the others (tested over two optimizer steps in
    ``tests/test_grad_cache_two_tower.py``).

    Nothing is done (returns ``False``) when a backward already ran in this optimizer step (its gradients
    must be kept) or when ``engine`` is not at ZeRO stage 3. The partitions are the optimizer's flat gradient
    buffer ``grad_partitions_flat_buffer`` (one ``zero_``), or, where a DeepSpeed version lacks it, each
    parameter's partition through ``deepspeed.utils.safe_set_local_grad``.

    Args:
        engine: a ``deepspeed.DeepSpeedEngine``.
    Returns:
        whether the partitions were zeroed.
    """
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    optimizer = getattr(engine, "optimizer", None)
    if stage != 3 or optimizer is None:
        return False
    if getattr(optimizer, "micro_step_id", 0) != 0 or getattr(optimizer, "_epilogue_ran_this_backward", False):
        return False
    flat = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if isinstance(flat, Tensor):
        flat.zero_()
        return True
    from deepspeed.utils import safe_set_local_grad

    for param in engine.module.parameters():
        if param.requires_grad and hasattr(param, "ds_tensor"):
            safe_set_local_grad(param, torch.zeros_like(param.ds_tensor))
    return True


_LAST_STEP_AT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""DeepSpeed engine -> its ``micro_steps`` when a :meth:`GradCache.step` last completed on it."""


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
        scaler: a ``torch.amp.GradScaler`` for float16 without DeepSpeed (plain module or DDP): every chunk's
            backward is scaled by it, and so are the loss parameters' gradients; step the optimizer(s) through
            it. See "float16" below. ``ValueError`` with a DeepSpeed engine (it scales the loss itself).
        loss_parameters: the loss's own learnable parameters (temperature, SigLIP scale and bias); default
            ``loss_fn.parameters()`` when ``loss_fn`` is an ``nn.Module``, else none. See below.
        sort_by_length: within each input that is a mapping with a right-padded 2-D ``attention_mask``, encode
            the rows in order of decreasing length (so that each chunk holds rows of similar length); the
            representations are put back in the input's order before ``loss_fn``, so the loss and the
            gradient are those of the unsorted batch (with dropout, each row then draws other masks: the
            result is still the exact gradient of the sampled loss).
        trim_padding: cut each chunk's padding columns to its own longest row (:func:`trim_padding`; right
            padding only). With ``sort_by_length`` this removes most padding work on texts of varied length.
        keep_last_graph: for a plain module, run the last chunk's first forward with grad and backpropagate
            its surrogate from that graph instead of encoding it again (one forward fewer per step; an input
            that fits in one chunk is encoded once). Its backward runs first in the replay, so at most one
            chunk's activations are alive at a time, as without it. Ignored under DDP and DeepSpeed (a forward
            with grad outside the replay's ``no_sync`` / accumulation context would be reduced too early).

    :meth:`step` leaves the full-batch gradient in the parameters (in DeepSpeed's gradient partitions
    for an engine) and returns the detached loss; it never steps or zeroes the optimizer.

    **The loss's own parameters** (a learnable temperature, SigLIP's scale and bias) live outside the
    DDP module / DeepSpeed engine: the loss runs on detached representations in phase 2. Their gradient
    follows the same convention as the model's: after :meth:`step` it is the gradient one process would
    get on the whole global batch, identical on every rank. Each rank's ``loss.backward()`` gives
    ``d loss_r / d tau`` (its share; the losses of :mod:`~dist_unlearn.contrastive.losses` scale ``loss_r``
    so that the rank **average** of the losses is the global-batch loss ``L``), and GradCache then
    all-reduce-**averages** those gradients over the wrapper's data-parallel group, the same ``1 / W``
    that DDP and DeepSpeed apply to the model's gradients (DeepSpeed: with ``scale_wrt_gas=False`` and
    ``gradient_accumulation_steps=1``, no other factor), so ``tau.grad = (1/W) sum_r d loss_r / d tau =
    dL / d tau``. Only the gradient of this step is averaged; a ``.grad`` already present is kept and added
    to. Step these parameters with an optimizer of your own (e.g. ``torch.optim.SGD(loss_fn.parameters())``,
    stepped next to ``engine.step()``) and call ``loss_fn.clamp_parameters_()`` after it. They must not also
    be parameters of the wrapped model (``ValueError``): DDP and ZeRO expect every one of their parameters'
    gradients from the model's own backward. With a plain module nothing is averaged (the model's gradients
    are not either): each rank keeps its share, like the model's.

    **float16 and loss scaling.** Representations are cast to float32 before ``loss_fn`` (float16 and bfloat16;
    :func:`~dist_unlearn.contrastive.losses.float32_for_half`), so the loss, its parameters' gradients and the
    cached ``G = ∂L/∂R`` are float32 whatever the compute dtype; ``G`` meets the half-precision graph only in the
    replay, where ``Σ r ⊙ G`` backpropagates ``G`` rounded to the representations' dtype. In float16 that
    rounding underflows (``G`` scales like ``1/B``), hence loss scaling (Micikevicius et al., 2018, "Mixed
    Precision Training", ICLR; arXiv:1710.03740):

    - plain module / DDP: pass ``scaler=torch.amp.GradScaler(device_type)`` with ``autocast_dtype=torch.float16``.
      Each chunk backpropagates ``S · Σ r ⊙ G`` (``scaler.scale``), so the model's gradients are ``S · ∂L/∂θ``;
      the loss parameters' gradients, taken unscaled in the gradient-cache phase (and averaged across ranks), are
      multiplied by the same ``S``. ``scaler.step(optimizer)`` then unscales every gradient by ``1/S``, skips the
      step if any is inf/NaN, and ``scaler.update()`` lowers ``S`` after an overflow. GradScaler's scales are
      powers of two (default ``init_scale`` 2^16, factors 2 and 1/2), so ``× S`` then ``/ S`` is exact for the
      loss parameters: they end with the same unscaled gradient as without a scaler. Put the loss parameters
      in the model's optimizer (a second parameter group) so that one inf/NaN check skips both; a separate
      optimizer stepped through the same scaler decides on its own gradients (``GradScaler`` semantics)::

          scaler = torch.amp.GradScaler("cuda")
          cache = GradCache(model, 64, loss_fn, autocast_dtype=torch.float16, scaler=scaler)
          groups = [{"params": model.parameters()}, {"params": loss_fn.parameters(), "weight_decay": 0.0}]
          optimizer = torch.optim.AdamW(groups)
          cache.step(queries, docs)
          scaler.step(optimizer)      # unscale, check inf/NaN, step or skip
          scaler.update()             # lower the scale after an overflow, raise it after a run of good steps
          optimizer.zero_grad()
          loss_fn.clamp_parameters_()

      With :meth:`step_deferred` the returned surrogate is *not* scaled: the caller's backward scales it with the
      same scaler (``scaler.scale(s).backward()``; ``accelerator.backward`` does so with ``accelerator.scaler``,
      which is the scaler to pass here).
    - DeepSpeed fp16: the engine owns the loss scale. Every chunk goes through ``engine.backward``, which
      multiplies by the engine's current scale, and ``engine.step()`` unscales, checks and skips; the loss
      parameters' gradients never pass through the engine and stay unscaled, as their own optimizer expects.
      Nothing is scaled twice; a ``scaler`` is refused. When the engine skips a step (``engine.skipped_steps``
      grows), skip the loss parameters' step too and clear their gradients
      (:meth:`~dist_unlearn.contrastive.loss_params.LossParameterStepper.step` with ``skipped=True``).
    - bfloat16 needs no loss scaling (float32's exponent range); the float32 cache still applies.

    Under DeepSpeed, one :meth:`step` is one optimizer step's whole gradient: a second :meth:`step` on the
    same engine before ``engine.step()`` raises ``RuntimeError`` (under ZeRO-1/2 the second reduction
    would silently overwrite the first batch's gradient). Make the GradCache batch larger instead. Under
    DDP and with a plain module, repeated steps accumulate the gradients exactly, as ``backward`` does.
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
        loss_parameters: Iterable[nn.Parameter] | None = None,
        sort_by_length: bool = False,
        trim_padding: bool = False,
        keep_last_graph: bool = True,
        scaler: Any | None = None,
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
        self.sort_by_length = sort_by_length
        self.trim_padding = trim_padding
        self.kind = model_kind(model)
        self.keep_last_graph = keep_last_graph and self.kind == "plain"
        check_scaler(scaler, self.kind)
        if self.kind == "deepspeed":
            check_engine(model)
        self.scaler = scaler
        self._loss_parameters = list(loss_parameters) if loss_parameters is not None else None
        if self.kind != "plain":
            shared = [p for p in self.loss_parameters() if id(p) in wrapped_parameter_ids(model)]
            if shared:
                raise ValueError(
                    f"{len(shared)} parameter(s) of the loss are also parameters of the wrapped model; GradCache "
                    "runs the loss outside the model's forward, where DDP/DeepSpeed cannot reduce their gradients. "
                    "Keep the loss module outside the model (GradCache averages its parameters' gradients across "
                    "ranks) and step its parameters with an optimizer of your own"
                )
        self.ds_accumulation: str | None = None
        """For an engine: ``"coalesce"`` (ZeRO-1/2), ``"direct"`` (ZeRO-3) or ``"boundary"`` (ZeRO-0, bf16/fp16
        optimizer wrappers, older DeepSpeed), the accumulation used by the last step."""

    def loss_parameters(self) -> list[nn.Parameter]:
        """The loss's own parameters that require grad (``loss_parameters``, else those of ``loss_fn``)."""
        if self._loss_parameters is not None:
            params = self._loss_parameters
        elif isinstance(self.loss_fn, nn.Module):
            params = list(self.loss_fn.parameters())
        else:
            params = []
        unique = {id(p): p for p in params if p.requires_grad}
        return list(unique.values())

    # -- public --------------------------------------------------------------------------------

    def step(self, *inputs: Batch, **loss_kwargs: Any) -> Tensor:
        """One exact contrastive step: gradients of ``loss_fn(*reps, **loss_kwargs)`` reach the model.

        Args:
            inputs: one or more batches (e.g. a query batch ``[Bq, ...]`` and a document batch
                ``[Bd, ...]``), each a tensor or a mapping of tensors sharing dim 0. Each is encoded
                chunk by chunk into ``reps[i]`` ``[B_i, d]``. Under DDP/DeepSpeed every rank calls
                ``step`` with the same number of inputs; row counts may differ between ranks, and a
                rank may have 0 rows for an input if another rank has some (every rank still runs the
                same number of forwards and backwards, see :func:`agreed_chunk_counts`).
            loss_kwargs: passed to ``loss_fn`` unchanged.

        Returns:
            the loss, detached (a 0-dim tensor).
        """
        loss, _ = self._step(inputs, loss_kwargs, defer_last=False)
        return loss

    def step_deferred(self, *inputs: Batch, **loss_kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`step` without the last chunk's backward, for a framework that calls ``backward`` itself.

        Runs the representation pass, the gradient cache and the replay of every chunk but the last; the last
        chunk is re-forwarded with grad and its surrogate ``Σ r_last ⊙ G_last`` (a 0-dim tensor with a graph to
        the parameters) is returned for the caller to backpropagate **exactly once, right away**: ``backward()``
        (plain module, DDP), ``engine.backward(s)`` or ``accelerator.backward(s)`` (which, under DeepSpeed, calls
        ``engine.backward`` and ``engine.step``). That backward completes the full-batch gradient and, under DDP
        and DeepSpeed, is the one that reduces it across ranks:

        - DDP: every earlier chunk runs inside ``no_sync()``; the last forward runs outside it, so its backward
          all-reduces everything once.
        - DeepSpeed ZeRO-3: earlier chunks go through ``engine.backward`` as in :meth:`step` (each partition adds
          up); the caller's ``engine.backward`` adds the last (``gradient_accumulation_steps`` is 1, so its
          ``1/gas`` divisor is 1).
        - DeepSpeed ZeRO-0/1/2: accumulation boundaries (``coalesce_grad_reduction`` cannot stay open across the
          caller's backward): earlier chunks with the boundary off, then the boundary is set on before the last
          chunk, whose backward reduces once (accelerate's ``backward`` sets it on too).

        The loss's own parameters get their gradient in the gradient-cache phase, as in :meth:`step`. The
        surrogate's value is not the loss; use the returned loss for logging. Everything else (inputs, refusals,
        ghost chunks, ``check_replay``) is as in :meth:`step`; in particular the DeepSpeed engine needs
        ``gradient_accumulation_steps: 1`` and the caller's backward must not be scaled by anything but 1 (no
        extra division by a gradient-accumulation count; DeepSpeed's fp16 loss scale is fine, as every chunk's
        ``engine.backward`` applies it). With a ``scaler`` the surrogate is returned unscaled and the caller
        scales it with that same scaler (``scaler.scale(s).backward()``, or ``accelerator.backward(s)`` with
        ``scaler=accelerator.scaler``), as the earlier chunks were.

        Returns:
            ``(loss, surrogate)``: the loss, detached, and the last chunk's surrogate to backpropagate.
        """
        loss, surrogate = self._step(inputs, loss_kwargs, defer_last=True)
        assert surrogate is not None
        return loss, surrogate

    def _step(self, inputs: tuple[Batch, ...], loss_kwargs: dict[str, Any], defer_last: bool) -> tuple[Tensor, Any]:
        """:meth:`step` (``defer_last=False``) or :meth:`step_deferred` (True): ``(loss, last surrogate or None)``."""
        if not inputs:
            raise ValueError("GradCache.step needs at least one input batch")
        if self.kind == "deepspeed":
            self._refuse_repeated_step()
            zero_stage3_gradient_partitions(self.model)
        orders: list[Tensor | None] = [None] * len(inputs)
        batches = list(inputs)
        if self.sort_by_length:
            for index, batch in enumerate(inputs):
                lengths = right_padded_lengths(batch)
                if lengths is not None and isinstance(batch, Mapping):
                    batches[index], orders[index] = sort_rows(batch, lengths)
        chunks = [split_batch(batch, self.chunk_size) for batch in batches]
        if self.trim_padding:
            chunks = [[trim_padding(chunk) for chunk in input_chunks] for input_chunks in chunks]
        device = first_device(inputs)
        real = [len(input_chunks) for input_chunks in chunks]
        rows = [batch_size(batch) for batch in inputs]
        row_table: list[list[int]] | None = None
        if self.kind == "plain":
            if 0 in rows:
                raise ValueError(
                    f"GradCache got an empty batch (0 rows) for input {rows.index(0)}; a plain module needs at "
                    "least one row per input (under DDP/DeepSpeed one rank may have 0 rows if another has some)"
                )
        else:
            agreed, row_table = agreed_chunk_counts(real, self._collective_device(device), rows)
            chunks = [c + [ghost_chunk(c[0])] * (n - len(c)) for c, n in zip(chunks, agreed, strict=True)]
        kept = (len(chunks) - 1, real[-1] - 1) if self.keep_last_graph else None
        reps, states, kept_reps = self._representation_pass(chunks, real, device.type, kept)
        loss, grads = self._cache_gradients(reps, loss_kwargs, orders, row_table)
        surrogate = self._replay(chunks, real, states, reps, grads, device.type, defer_last, kept, kept_reps)
        if self.kind == "deepspeed":
            _LAST_STEP_AT[self.model] = self.model.micro_steps
        return loss.detach(), surrogate

    def _refuse_repeated_step(self) -> None:
        """Raise if this engine has not run ``engine.step()`` since the last :meth:`step` (see the class doc)."""
        last = _LAST_STEP_AT.get(self.model)
        if last is not None and last == getattr(self.model, "micro_steps", None):
            raise RuntimeError(
                "GradCache.step was called again before engine.step(): under DeepSpeed one GradCache.step is one "
                "optimizer step's whole gradient (with ZeRO-1/2 the second step's reduction would silently "
                "replace the first batch's gradient). Call engine.step() after every GradCache.step, or pass "
                "the rows of both batches to a single step (a larger GradCache batch needs no more activation "
                "memory)"
            )

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
        self, chunks: list[list[Batch]], real: list[int], device_type: str, kept: tuple[int, int] | None = None
    ) -> tuple[list[list[Tensor]], list[list[RngState]], Tensor | None]:
        """Phase 1: no-grad representations of every real chunk and the RNG state each chunk started from.

        Ghost chunks (index ``>= real[i]``) are encoded too, to match the other ranks' collectives, but
        from a forked RNG so that they draw nothing from the global generators; their output is dropped.
        The chunk ``kept = (input, chunk)`` (if any) is encoded with grad; its representations are returned
        with their graph as the third value (and detached among the others).
        """
        reps: list[list[Tensor]] = []
        states: list[list[RngState]] = []
        kept_reps: Tensor | None = None
        with torch.no_grad():
            for i, (input_chunks, n_real) in enumerate(zip(chunks, real, strict=True)):
                reps.append([])
                states.append([])
                for j, chunk in enumerate(input_chunks):
                    state = RngState.capture()
                    states[-1].append(state)
                    if (i, j) == kept:
                        with torch.enable_grad():
                            kept_reps = self._encode(chunk, device_type)
                        reps[-1].append(kept_reps.detach())
                    elif j < n_real:
                        reps[-1].append(self._encode(chunk, device_type).detach())
                    else:
                        with state.restored():
                            self._encode(chunk, device_type)
        return reps, states, kept_reps

    def _cache_gradients(
        self,
        reps: list[list[Tensor]],
        loss_kwargs: dict[str, Any],
        orders: Sequence[Tensor | None] | None = None,
        row_table: list[list[int]] | None = None,
    ) -> tuple[Tensor, list[list[Tensor]]]:
        """Phase 2: ``loss_fn`` on the detached full representations; returns the loss and ∂L/∂reps per chunk.

        Representations in float16/bfloat16 are cast to float32 first, so the loss runs in float32 and ∂L/∂reps is
        float32: a float16 loss rounds every logit ``s / τ`` to 11 significant bits, and ``G`` of a mean-reduced loss
        scales like ``1/B``, so at large batches its float16 entries fall below the smallest normal number and lose
        digits before any loss scale could apply (bfloat16 keeps 8 significant bits). With a ``scaler`` the loss
        parameters' gradients of this step are multiplied by its scale, like the model's (see the class docstring).

        ``orders[i]`` (``[B_i]`` or None): input ``i`` was encoded in that row order (``sort_by_length``); its
        representations are put back in the input's order for ``loss_fn``, and ∂L/∂reps is returned in the
        encoding order, chunk by chunk.

        ``row_table[i]`` (from :func:`agreed_chunk_counts`): input ``i``'s row count on every rank, declared for
        the loss's gathers (:func:`~dist_unlearn.distributed.gather.known_row_counts`), so that the step's one
        size exchange is the one in :func:`agreed_chunk_counts`.
        """
        orders = list(orders) if orders is not None else [None] * len(reps)
        leaves = []
        for input_reps, order in zip(reps, orders, strict=True):
            joined = torch.cat(input_reps)
            joined = joined.to(float32_for_half(joined.dtype))  # float32 loss and cache for half inputs (class doc)
            if order is not None:
                joined = joined[torch.argsort(order).to(joined.device)]
            leaves.append(joined.requires_grad_())
        declared = zip(leaves, row_table, strict=True) if row_table is not None else ()
        with known_row_counts(declared):
            loss = self.loss_fn(*leaves, **loss_kwargs)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar (0-dim) tensor")
        if not loss.requires_grad:
            raise ValueError("loss_fn's result does not depend on the representations (no grad_fn)")
        params = self.loss_parameters()
        if self.kind != "plain":
            self._refuse_undeclared_leaves(loss, leaves, params)
        earlier = [p.grad for p in params]  # kept aside so that only this step's gradient is averaged
        for param in params:
            param.grad = None
        loss.backward()
        self._average_loss_gradients(params, leaves[0].device)
        self._scale_loss_gradients(params)
        for param, grad in zip(params, earlier, strict=True):
            if grad is not None:
                param.grad = grad if param.grad is None else grad.add_(param.grad)
        grads = []
        for leaf, input_reps, order in zip(leaves, reps, orders, strict=True):
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            if order is not None:
                grad = grad[order.to(grad.device)]
            grads.append(list(grad.split([r.shape[0] for r in input_reps])))
        return loss, grads

    @staticmethod
    def _refuse_undeclared_leaves(loss: Tensor, leaves: list[Tensor], params: list[nn.Parameter]) -> None:
        """Raise if the loss depends on a tensor requiring grad that is neither a representation nor a declared
        loss parameter: under DDP/DeepSpeed its gradient would stay this rank's share and the ranks would drift
        apart (e.g. a learnable loss module called from a plain function or lambda)."""
        known = {id(t) for t in leaves} | {id(p) for p in params}
        seen: set[int] = set()
        stack = [loss.grad_fn]
        undeclared = 0
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that requires grad
            if isinstance(variable, Tensor) and id(variable) not in known:
                undeclared += 1
            stack.extend(next_node for next_node, _ in node.next_functions)
        if undeclared:
            raise ValueError(
                f"loss_fn depends on {undeclared} tensor(s) requiring grad that GradCache does not know as loss "
                "parameters, so under DDP/DeepSpeed their gradients would differ between ranks. Pass the loss "
                "module itself as loss_fn, or list them: GradCache(..., loss_parameters=[...])"
            )

    def _scale_loss_gradients(self, params: list[nn.Parameter]) -> None:
        """Multiply this step's loss-parameter gradients by the scaler's scale ``S`` (a no-op without a scaler).

        The model's gradients come out of the scaled replay as ``S · ∂L/∂θ``; the loss parameters get
        ``S · ∂L/∂p`` too, so that ``scaler.unscale_`` / ``scaler.step`` treats every gradient alike (exact for
        a power-of-two ``S``). ``scaler.scale`` returns a ``[1]`` tensor for a 0-dim one: reshaped back.
        """
        if self.scaler is None:
            return
        for param in params:
            if param.grad is not None:
                param.grad = self.scaler.scale(param.grad).reshape(param.grad.shape).to(param.grad.dtype)

    def _average_loss_gradients(self, params: list[nn.Parameter], device: torch.device) -> None:
        """All-reduce-average this step's gradients of the loss's own parameters over the data-parallel group.

        The same ``1 / W`` average that DDP and DeepSpeed apply to the model's gradients: the result is the
        global-batch gradient, identical on every rank (see the class docstring). Every rank runs the same
        collective, also for a parameter that got no gradient on it (zeros). A no-op for a plain module.
        """
        if self.kind == "plain" or not params or not (dist.is_available() and dist.is_initialized()):
            return
        group = data_parallel_group(self.model, self.kind)
        world = dist.get_world_size(group)
        if world == 1:
            return
        comm = self._collective_device(device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).to(device=comm, dtype=torch.float64) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world
        for param, part in zip(params, flat.split([p.numel() for p in params]), strict=True):
            param.grad = part.reshape(param.shape).to(device=param.device, dtype=param.dtype)

    def _replay(
        self,
        chunks: list[list[Batch]],
        real: list[int],
        states: list[list[RngState]],
        reps: list[list[Tensor]],
        grads: list[list[Tensor]],
        device_type: str,
        defer_last: bool = False,
        kept: tuple[int, int] | None = None,
        kept_reps: Tensor | None = None,
    ) -> Tensor | None:
        """Phase 3: re-forward every chunk with grad from its saved RNG state and backpropagate the surrogate.

        The surrogate of chunk ``c`` is ``Σ r_c ⊙ G_c`` (``G_c`` = cached ∂L/∂r_c, a constant), whose
        parameter gradient is chunk ``c``'s share of ∂L/∂θ; a ghost chunk's surrogate is ``0 · Σ r``.
        The chunk ``kept`` goes first and uses ``kept_reps`` (its graph from phase 1) instead of a re-forward.
        With ``defer_last`` the last chunk's surrogate is returned instead of backpropagated.
        """
        order = [(i, j) for i, input_chunks in enumerate(chunks) for j in range(len(input_chunks))]
        if kept is not None and kept_reps is not None:
            order.remove(kept)
            order.insert(0, kept)
        with self._accumulation(coalesce=not defer_last) as before_chunk:
            for position, (i, j) in enumerate(order):
                last = position == len(order) - 1
                is_kept = (i, j) == kept and kept_reps is not None
                with before_chunk(last), contextlib.nullcontext() if is_kept else states[i][j].restored():
                    new_reps = kept_reps if is_kept else self._encode(chunks[i][j], device_type)
                    assert new_reps is not None
                    if j >= real[i]:
                        surrogate = new_reps.sum() * 0.0
                    else:
                        if self.check_replay and not is_kept:
                            self._verify_replay(new_reps, reps[i][j], i, j)
                        surrogate = (new_reps * grads[i][j]).sum()
                    if last and defer_last:
                        return surrogate
                    self._backward(surrogate)
        return None

    # -- gradient accumulation per model kind --------------------------------------------------

    @contextlib.contextmanager
    def _accumulation(self, coalesce: bool = True) -> Iterator[Callable[[bool], contextlib.AbstractContextManager]]:
        """Context for the whole replay; yields ``before_chunk(last)``, the context for one chunk.

        ``coalesce=False``: never use DeepSpeed's ``coalesce_grad_reduction`` (boundaries instead)."""
        if self.kind == "ddp":
            yield lambda last: contextlib.nullcontext() if last else self.model.no_sync()
        elif self.kind == "deepspeed":
            with self._deepspeed_accumulation(coalesce) as before_chunk:
                yield before_chunk
        else:
            yield lambda last: contextlib.nullcontext()

    @contextlib.contextmanager
    def _deepspeed_accumulation(
        self, allow_coalesce: bool = True
    ) -> Iterator[Callable[[bool], contextlib.AbstractContextManager]]:
        """ZeRO-3: plain ``engine.backward`` per chunk; ZeRO-1/2: ``coalesce_grad_reduction`` where DeepSpeed
        supports it; else accumulation boundaries."""
        engine = self.model
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
        if stage == 3:
            # ZeRO-3 reduce-scatters each backward's gradients into this rank's partition and adds them up across
            # backwards: exact without coalescing (tests/test_grad_cache.py), and the coalescing context would
            # keep whole, unpartitioned gradients on every rank until its flush.
            self.ds_accumulation = "direct"
            yield lambda last: contextlib.nullcontext()
            return
        coalesce = getattr(engine, "coalesce_grad_reduction", None) if allow_coalesce else None
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
        """Backpropagate one chunk's surrogate; through ``engine.backward`` for DeepSpeed (no 1/gas divisor, the
        engine's own fp16 loss scale), else ``surrogate.backward()``, multiplied by the scaler's scale if any."""
        if self.kind == "deepspeed":
            self.model.backward(surrogate, scale_wrt_gas=False)
        elif self.scaler is not None:
            self.scaler.scale(surrogate).backward()
        else:
            surrogate.backward()

    def _verify_replay(self, new_reps: Tensor, cached: Tensor, input_index: int, chunk_index: int) -> None:
        """Raise ``RuntimeError`` if the re-forwarded representations differ from the cached ones."""
        if new_reps.numel() == 0 and cached.numel() == 0:
            return
        diff = (new_reps.detach().float() - cached.float()).abs().max().item()
        if not diff <= self.replay_atol:
            raise RuntimeError(
                f"GradCache replay mismatch: input {input_index}, chunk {chunk_index}: re-forwarded representations "
                f"differ from the cached ones by max |Δ| = {diff:.3e} > replay_atol = {self.replay_atol:.1e}. "
                "The model is not deterministic given the restored RNG state (random ops outside torch's CPU/CUDA "
                "generators, non-deterministic kernels, or state changed between the passes, e.g. batch-norm "
                "statistics); the gradient would not be exact"
            )
