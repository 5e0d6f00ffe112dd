"""Contrastive losses with negatives shared across ranks ("local rows x global columns").

Layout
    ``queries``: ``[b, d]`` on this rank. ``docs``: ``[b, 1 + h, d]`` or the same flattened to
    ``[b * (1 + h), d]``; the ``1 + h`` docs of query ``i`` are ``[positive, hard_neg_1, ..., hard_neg_h]``,
    i.e. flat row ``i * (1 + h)`` is its positive. ``h >= 0`` (``h = 0``: docs ``[b, d]`` are the positives).
    Each rank gathers the docs of all ranks with :func:`~dist_unlearn.distributed.gather.all_gather_with_grad`
    (rank order, unequal sizes allowed), so every query is scored against all ``N = sum_r b_r (1 + h_r)``
    docs; the logits are ``[b, N]``, never ``[B, N]``. Query ``i`` on rank ``r`` has the label
    ``o_r + i * (1 + h)`` where ``o_r`` is the number of docs gathered from ranks ``< r``.

Gradient convention (``reduction="global_mean"``, the default)
    Let ``l_i`` be the loss of global row ``i`` and ``B = sum_r b_r`` the global number of rows. The
    single-process objective is ``L = (1 / B) sum_i l_i``. Rank ``r`` of ``W`` returns

        loss_r = (W / B) * sum_{i on rank r} l_i,    so that    (1 / W) sum_r loss_r = L.

    Each rank calls ``loss_r.backward()``; the gather's backward sums the doc gradients over ranks (one
    reduce-scatter: each rank receives the sum for its own docs), so the sum over ranks of the parameter
    gradients is ``W * dL/dtheta``, and the **average** that DDP and DeepSpeed apply gives exactly
    ``dL/dtheta``, also with unequal per-rank batches. The same holds for a
    learnable temperature, scale or bias: its per-rank gradient is ``d loss_r / d tau`` and the rank average
    is ``dL/dtau`` -- provided it is averaged like any other parameter. **Convention: the gradient of a
    loss parameter is the global-batch gradient, like the model's.** :class:`~dist_unlearn.contrastive.GradCache`
    does the averaging (all-reduce over the data-parallel group, divided by ``W``), so after its ``step``
    ``tau.grad`` is ``dL/dtau`` on every rank; without GradCache, all-reduce-average it yourself after
    ``backward`` (DDP/DeepSpeed never see the loss module). A framework that *sums* gradients over ranks
    needs a division by ``W``. The returned value is therefore ``W``-scaled and differs per rank;
    ``self.last_global_loss`` holds the detached true ``L`` (identical on all ranks) for logging.
    ``reduction="local_mean"`` returns ``(1 / b) sum_{i on rank r} l_i`` instead (the rank average equals
    ``L`` only for equal local batch sizes).

Inputs are L2-normalised here when ``normalize=True`` (default), so scores are cosine similarities.

Clamping (CLIP, Radford et al. 2021): a learnable ``log(1/tau)`` is bounded by ``log(max_inverse_temperature)``
*after* each optimizer step, by :meth:`CrossRankLoss.clamp_parameters_` (a no-op for losses without such a
bound), never inside ``forward``: a clamp in the forward would make the gradient exactly 0 at the bound, so the
temperature could not move back. Call it right after ``optimizer.step()`` / ``engine.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_unlearn.distributed.gather import all_gather_with_sizes, group_rank, group_world_size, same_row_counts

__all__ = [
    "AUCLoss",
    "CrossRankLoss",
    "DebiasedContrastiveLoss",
    "DecoupledContrastiveLoss",
    "InfoNCELoss",
    "MatryoshkaLoss",
    "SigmoidLoss",
    "false_negative_mask",
    "flatten_docs",
]

Reduction = Literal["global_mean", "local_mean"]


def flatten_docs(queries: Tensor, docs: Tensor) -> tuple[Tensor, int]:
    """Validate the doc layout and flatten it.

    Args:
        queries: ``[b, d]``.
        docs: ``[b, 1 + h, d]`` or ``[b * (1 + h), d]``, per query ``[positive, hard negatives...]``.
    Returns:
        ``(docs_flat [b * (1 + h), d], 1 + h)``; query ``i``'s positive is row ``i * (1 + h)``.
    """
    if queries.dim() != 2:
        raise ValueError(f"queries must be [b, d], got shape {tuple(queries.shape)}")
    b, dim = queries.shape
    if docs.dim() == 3:
        if docs.shape[0] != b or docs.shape[2] != dim:
            raise ValueError(f"docs must be [b, 1+h, d] = [{b}, 1+h, {dim}], got {tuple(docs.shape)}")
        return docs.reshape(-1, dim), docs.shape[1]
    if docs.dim() != 2 or docs.shape[1] != dim:
        raise ValueError(f"docs must be [b*(1+h), d] with d={dim}, got {tuple(docs.shape)}")
    if b == 0:
        return docs, 1
    if docs.shape[0] % b != 0 or docs.shape[0] == 0:
        raise ValueError(f"docs rows ({docs.shape[0]}) must be a positive multiple of the number of queries ({b})")
    return docs, docs.shape[0] // b


@torch.no_grad()
def false_negative_mask(scores: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Candidates suspected to be false negatives (never the positive itself).

    ``mask[i, j] = scores[i, j] > scores[i, labels[i]] - margin`` for ``j != labels[i]``.

    Args:
        scores: ``[b, N]`` similarities (before temperature).
        labels: ``[b]`` column of each row's positive.
        margin: similarity margin (same units as ``scores``).
    Returns:
        bool ``[b, N]``; masked logits are set to ``-inf`` by the callers.
    """
    positive = scores.gather(1, labels[:, None])
    mask = scores > positive - margin
    mask.scatter_(1, labels[:, None], False)
    return mask


def float32_for_half(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate (or keep a loss and its gradient) in for inputs of ``dtype``: float32 for float16
    and bfloat16 (11 and 8 significant bits, float16's narrow range), else ``dtype`` itself (float32, float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class CrossRankLoss(nn.Module):
    """Base class: cross-rank columns, global-mean reduction and ``last_global_loss`` (see module docstring).

    Args:
        cross_rank: gather columns from all ranks (``False``: only this rank's columns, still the same
            reduction convention over global rows).
        reduction: ``"global_mean"`` (default) or ``"local_mean"``.
        normalize: L2-normalise queries and docs.
        group: process group (default: the world).
    """

    def __init__(
        self, cross_rank: bool = True, reduction: Reduction = "global_mean", normalize: bool = True, group: Any = None
    ) -> None:
        super().__init__()
        if reduction not in ("global_mean", "local_mean"):
            raise ValueError(f"reduction must be 'global_mean' or 'local_mean', got {reduction!r}")
        self.cross_rank = cross_rank
        self.reduction = reduction
        self.normalize = normalize
        self.group = group
        self.last_global_loss: Tensor | None = None

    @torch.no_grad()
    def clamp_parameters_(self) -> CrossRankLoss:
        """Project the loss's own parameters back into their allowed range, in place; returns ``self``.

        Call after every optimizer step (see the module docstring). No-op here; temperature losses clamp
        ``log(1/tau)`` at ``log(max_inverse_temperature)``.
        """
        return self

    def _prep(self, x: Tensor) -> Tensor:
        """L2-normalised ``x`` (when ``normalize``), with ``x``'s per-rank row counts if those are known
        (:func:`~dist_unlearn.distributed.gather.known_row_counts`: the gather then needs no size exchange)."""
        return same_row_counts(F.normalize(x, dim=-1), x) if self.normalize else x

    def _columns(self, x: Tensor) -> tuple[Tensor, int]:
        """``(columns [N, d], offset of this rank's rows in columns)``."""
        if not self.cross_rank:
            return x, 0
        gathered, sizes = all_gather_with_sizes(x, self.group)
        return gathered, sum(sizes[: group_rank(self.group)])

    def _scored(self, queries: Tensor, docs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Normalise, gather docs, score. Returns ``(q [b,d], d_local [b*k,d], scores [b,N], labels [b], k)``."""
        flat, k = flatten_docs(queries, docs)
        q, d = self._prep(queries), self._prep(flat)
        cols, offset = self._columns(d)
        labels = offset + torch.arange(q.shape[0], device=q.device) * k
        return q, d, q @ cols.T, labels, k

    def _reduce(self, rows: Tensor) -> Tensor:
        """Per-row losses ``[b]`` -> this rank's loss (0-dim, float32 for half inputs); sets ``last_global_loss``."""
        stats = torch.stack(
            [rows.detach().double().sum(), torch.tensor(float(rows.shape[0]), device=rows.device).double()]
        )
        world = group_world_size(self.group)
        if world > 1:
            torch.distributed.all_reduce(stats, group=self.group)
        total_rows = stats[1].clamp(min=1.0)
        # Sum and scale in float32 at least: a bf16 scale such as W/B would be rounded to 3 digits.
        acc = float32_for_half(rows.dtype)
        self.last_global_loss = (stats[0] / total_rows).to(acc)
        if self.reduction == "local_mean":
            return rows.sum(dtype=acc) / max(rows.shape[0], 1)
        return rows.sum(dtype=acc) * (world / total_rows).to(acc)


class _TemperatureLoss(CrossRankLoss):
    """Adds a temperature ``tau``: learnable as ``log(1 / tau)`` (an ``nn.Parameter``) or a fixed Python float.

    A fixed temperature is used exactly as given (any finite ``tau > 0``; ``max_inverse_temperature`` does not
    apply to it) and kept as a float so that it is exact in every dtype (a float32 buffer would round
    ``1/tau``). A learnable one starts at ``log(min(1/tau, max_inverse_temperature))`` and is kept at or below
    ``log(max_inverse_temperature)`` by :meth:`clamp_parameters_` after each optimizer step (CLIP's clamp of
    ``logit_scale``); ``forward`` uses it unclamped, so its gradient is the true one also at the bound.
    """

    def __init__(
        self, temperature: float, learnable_temperature: bool, max_inverse_temperature: float, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not (math.isfinite(float(temperature)) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not max_inverse_temperature > 0:
            raise ValueError(f"max_inverse_temperature must be > 0 (or math.inf), got {max_inverse_temperature!r}")
        self.temperature = float(temperature)
        self.max_inverse_temperature = float(max_inverse_temperature)
        self.log_inverse_temperature: nn.Parameter | None = None
        if learnable_temperature:
            start = min(1.0 / self.temperature, self.max_inverse_temperature)
            self.log_inverse_temperature = nn.Parameter(torch.tensor(math.log(start)))

    @torch.no_grad()
    def clamp_parameters_(self) -> _TemperatureLoss:
        """Clamp a learnable ``log(1/tau)`` at ``log(max_inverse_temperature)`` in place (CLIP: after each step).

        Call after ``optimizer.step()`` / ``engine.step()``; a no-op for a fixed temperature. Returns ``self``.
        """
        if self.log_inverse_temperature is not None:
            self.log_inverse_temperature.clamp_(max=math.log(self.max_inverse_temperature))
        return self

    def inverse_temperature(self, like: Tensor | None = None) -> Tensor:
        """``1 / tau``, 0-dim: ``exp(log_inverse_temperature)`` (learnable) or ``1 / temperature`` (fixed).

        Not clamped here (see :meth:`clamp_parameters_`). Returned in the dtype and on the device of ``like``
        when given.
        """
        if self.log_inverse_temperature is None:
            value = 1.0 / self.temperature
            if like is None:
                return torch.tensor(value)
            return torch.tensor(value, dtype=like.dtype, device=like.device)
        t = self.log_inverse_temperature.exp()
        return t if like is None else t.to(like.dtype)


class InfoNCELoss(_TemperatureLoss):
    """Softmax contrastive loss (InfoNCE; van den Oord et al. 2018, Chen et al. 2020 SimCLR, Radford et al. 2021
    CLIP, Karpukhin et al. 2020 DPR for hard negatives) with cross-rank in-batch negatives.

    Query -> doc row loss for global query ``i`` with positive ``p(i)``, ``s_ij = q_i . d_j``, ``t = 1/tau``:

        l_i = -t s_{i,p(i)} + log sum_{j not masked} exp(t s_ij),   j over all N gathered docs.

    ``symmetric=True`` adds a doc -> query loss over positives only, ``l'_i = -t s_{i,p(i)} +
    log sum_k exp(t d_{p(i)} . q_k)`` (``k`` over all global queries) and uses ``(l_i + l'_i) / 2``.
    ``false_negative_margin=m`` masks (``-inf``, no gradient through the mask) every candidate other than the
    positive whose similarity exceeds the positive's minus ``m`` (in both directions when symmetric).

    Args:
        temperature: ``tau`` (fixed: used as given, any finite value > 0), or the initial ``tau`` when learnable.
        learnable_temperature: learn ``log(1/tau)`` (an ``nn.Parameter``); its gradient follows the global-mean
            convention: the rank average equals the single-process gradient, and through
            :class:`~dist_unlearn.contrastive.GradCache` it is that global-batch gradient on every rank.
        max_inverse_temperature: upper bound of a learnable ``1/tau`` (CLIP uses 100), applied by
            :meth:`clamp_parameters_` after each optimizer step, not in ``forward``.
        symmetric: add the doc -> query direction.
        cross_rank: use the docs (and, when symmetric, queries) of all ranks as candidates.
        false_negative_margin: ``None`` (off) or the margin ``m``.
        normalize: L2-normalise inputs.
        reduction: see the module docstring.
        group: process group.

    Shapes: ``forward(queries [b, d], docs [b, 1+h, d] | [b*(1+h), d]) -> 0-dim`` (this rank's scaled loss;
    ``last_global_loss`` holds the true global mean).
    """

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        max_inverse_temperature: float = 100.0,
        symmetric: bool = False,
        cross_rank: bool = True,
        false_negative_margin: float | None = None,
        normalize: bool = True,
        reduction: Reduction = "global_mean",
        group: Any = None,
    ) -> None:
        super().__init__(
            temperature,
            learnable_temperature,
            max_inverse_temperature,
            cross_rank=cross_rank,
            reduction=reduction,
            normalize=normalize,
            group=group,
        )
        self.symmetric = symmetric
        self.false_negative_margin = false_negative_margin

    def _cross_entropy(self, scores: Tensor, labels: Tensor, t: Tensor) -> Tensor:
        logits = scores * t
        if self.false_negative_margin is not None:
            logits = logits.masked_fill(false_negative_mask(scores, labels, self.false_negative_margin), -math.inf)
        return F.cross_entropy(logits, labels, reduction="none")

    def forward(self, queries: Tensor, docs: Tensor) -> Tensor:
        q, d, scores, labels, k = self._scored(queries, docs)
        t = self.inverse_temperature(scores)
        rows = self._cross_entropy(scores, labels, t)
        if self.symmetric:
            positives = d.reshape(q.shape[0], k, d.shape[-1])[:, 0]
            query_cols, q_offset = self._columns(q)
            back_labels = q_offset + torch.arange(q.shape[0], device=q.device)
            rows = 0.5 * (rows + self._cross_entropy(positives @ query_cols.T, back_labels, t))
        return self._reduce(rows)


class SigmoidLoss(CrossRankLoss):
    """Pairwise sigmoid loss (SigLIP; Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

    With ``s_ij = q_i . d_j``, scale ``t = exp(t')`` and bias ``b``, ``z_ij = +1`` for the query's own
    positive and ``-1`` for every other gathered doc (other queries' positives and all hard negatives):

        l_i = sum_j -log sigmoid(z_ij (t s_ij + b)),   j over all N gathered docs;  L = (1/B) sum_i l_i.

    Args:
        init_scale: initial ``t`` (stored as ``t' = log t``; SigLIP: 10).
        init_bias: initial ``b`` (SigLIP: -10).
        learnable: learn ``t'`` and ``b`` (their gradients follow the global-mean convention: the rank average
            is the single-process gradient, and through :class:`~dist_unlearn.contrastive.GradCache` it is that
            global-batch gradient on every rank). Neither is clamped (as in SigLIP).
        cross_rank, normalize, reduction, group: see :class:`CrossRankLoss`.

    Shapes: ``forward(queries [b, d], docs [b, 1+h, d] | [b*(1+h), d]) -> 0-dim``.
    """

    def __init__(
        self,
        init_scale: float = 10.0,
        init_bias: float = -10.0,
        learnable: bool = True,
        cross_rank: bool = True,
        normalize: bool = True,
        reduction: Reduction = "global_mean",
        group: Any = None,
    ) -> None:
        super().__init__(cross_rank=cross_rank, reduction=reduction, normalize=normalize, group=group)
        self.init_scale, self.init_bias = float(init_scale), float(init_bias)
        self.log_scale: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        if learnable:
            self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
            self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, queries: Tensor, docs: Tensor) -> Tensor:
        _, _, scores, labels, _ = self._scored(queries, docs)
        if self.log_scale is None or self.bias is None:
            logits = scores * self.init_scale + self.init_bias
        else:
            logits = scores * self.log_scale.exp().to(scores.dtype) + self.bias.to(scores.dtype)
        signs = torch.full_like(scores, -1.0).scatter_(1, labels[:, None], 1.0)
        return self._reduce(-F.logsigmoid(signs * logits).sum(dim=1))


class DecoupledContrastiveLoss(_TemperatureLoss):
    """Decoupled contrastive loss (DCL; Yeh et al. 2022, "Decoupled Contrastive Learning"): InfoNCE with the
    positive removed from the denominator,

        l_i = -t s_{i,p(i)} + log sum_{j != p(i)} exp(t s_ij),   j over all N gathered docs.

    Needs at least one negative (``N >= 2``). Args as :class:`InfoNCELoss` (no symmetric/margin options).
    Shapes: ``forward(queries [b, d], docs [b, 1+h, d] | [b*(1+h), d]) -> 0-dim``.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        learnable_temperature: bool = False,
        max_inverse_temperature: float = 100.0,
        cross_rank: bool = True,
        normalize: bool = True,
        reduction: Reduction = "global_mean",
        group: Any = None,
    ) -> None:
        super().__init__(
            temperature,
            learnable_temperature,
            max_inverse_temperature,
            cross_rank=cross_rank,
            reduction=reduction,
            normalize=normalize,
            group=group,
        )

    def forward(self, queries: Tensor, docs: Tensor) -> Tensor:
        _, _, scores, labels, _ = self._scored(queries, docs)
        logits = scores * self.inverse_temperature(scores)
        positive = logits.gather(1, labels[:, None]).squeeze(1)
        negatives = logits.scatter(1, labels[:, None], -math.inf)
        return self._reduce(torch.logsumexp(negatives, dim=1) - positive)


class DebiasedContrastiveLoss(_TemperatureLoss):
    """Debiased contrastive loss (Chuang et al. 2020, "Debiased Contrastive Learning").

    Negatives are drawn from the data, so a fraction ``tau_plus`` (class prior) of them share the query's
    class. With ``M = N - 1`` negatives per row, ``P = exp(t s_{i,p(i)})`` and ``t = 1/tau``:

        Ng_i = max( (sum_{j != p(i)} exp(t s_ij) - tau_plus * M * P) / (1 - tau_plus),  M * exp(-t) )
        l_i  = -log( P / (P + Ng_i) )

    The lower bound ``M exp(-t)`` is the smallest possible value for cosine scores (``s >= -1``), so use
    normalised inputs. Computed with a per-row max shift for stability (the value is shift invariant).

    Args:
        temperature: ``tau`` (paper: 0.5 for images; smaller suits text embeddings).
        tau_plus: class prior in ``[0, 1)``.
        Others as :class:`InfoNCELoss`.
    Shapes: ``forward(queries [b, d], docs [b, 1+h, d] | [b*(1+h), d]) -> 0-dim``.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        tau_plus: float = 0.1,
        learnable_temperature: bool = False,
        max_inverse_temperature: float = 100.0,
        cross_rank: bool = True,
        normalize: bool = True,
        reduction: Reduction = "global_mean",
        group: Any = None,
    ) -> None:
        super().__init__(
            temperature,
            learnable_temperature,
            max_inverse_temperature,
            cross_rank=cross_rank,
            reduction=reduction,
            normalize=normalize,
            group=group,
        )
        if not 0.0 <= tau_plus < 1.0:
            raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
        self.tau_plus = tau_plus

    def forward(self, queries: Tensor, docs: Tensor) -> Tensor:
        _, _, scores, labels, _ = self._scored(queries, docs)
        t = self.inverse_temperature(scores)
        logits = scores * t
        num_neg = scores.shape[1] - 1
        shift = logits.detach().amax(dim=1, keepdim=True) if logits.numel() else logits.new_zeros(logits.shape[0], 1)
        positive = logits.gather(1, labels[:, None]) - shift
        negatives = (logits - shift).exp().scatter(1, labels[:, None], 0.0).sum(dim=1, keepdim=True)
        estimate = (negatives - self.tau_plus * num_neg * positive.exp()) / (1.0 - self.tau_plus)
        estimate = torch.maximum(estimate, num_neg * torch.exp(-t - shift))
        return self._reduce((torch.log(positive.exp() + estimate) - positive).squeeze(1))


class AUCLoss(_TemperatureLoss):
    """Mann-Whitney / AUC ranking loss: a logistic (BCE) loss on every positive - negative score difference
    (Yan et al. 2003, "Optimizing classifier performance via an approximation to the Wilcoxon-Mann-Whitney
    statistic"; Burges et al. 2005, RankNet). With ``M = N - 1`` negatives per row and ``t = 1/tau``:

        l_i = (1/M) sum_{j != p(i)} log(1 + exp(t (s_ij - s_{i,p(i)}))),   j over all N gathered docs,

    a smooth surrogate of ``1 - AUC`` of the positive against the negatives of query ``i``.

    Args as :class:`InfoNCELoss` (no symmetric/margin options).
    Shapes: ``forward(queries [b, d], docs [b, 1+h, d] | [b*(1+h), d]) -> 0-dim``.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        max_inverse_temperature: float = 100.0,
        cross_rank: bool = True,
        normalize: bool = True,
        reduction: Reduction = "global_mean",
        group: Any = None,
    ) -> None:
        super().__init__(
            temperature,
            learnable_temperature,
            max_inverse_temperature,
            cross_rank=cross_rank,
            reduction=reduction,
            normalize=normalize,
            group=group,
        )

    def forward(self, queries: Tensor, docs: Tensor) -> Tensor:
        _, _, scores, labels, _ = self._scored(queries, docs)
        logits = scores * self.inverse_temperature(scores)
        margins = logits - logits.gather(1, labels[:, None])
        pairs = F.softplus(margins).scatter(1, labels[:, None], 0.0)
        return self._reduce(pairs.sum(dim=1) / max(scores.shape[1] - 1, 1))


class MatryoshkaLoss(nn.Module):
    """Matryoshka representation loss (Kusupati et al. 2022, "Matryoshka Representation Learning").

        L = sum_k w_k * base_loss(normalize(q[:, :m_k]), normalize(docs[..., :m_k]))

    Each term follows ``base_loss``'s gradient convention, so the weighted sum does too;
    ``last_global_loss`` is the weighted sum of the base loss's ``last_global_loss`` values. The base loss
    (and its learnable temperature, if any) is shared across prefix sizes; it gathers once per prefix.

    Args:
        base_loss: a :class:`CrossRankLoss` (or any module ``(queries, docs) -> loss``).
        dims: prefix sizes ``m_k``; each must be ``<= d``.
        weights: ``w_k`` (default all 1).

    Shapes: ``forward(queries [b, d], docs [b, 1+h, d] | [b*(1+h), d]) -> 0-dim``.
    """

    def __init__(
        self,
        base_loss: nn.Module,
        dims: Sequence[int] = (64, 128, 256, 512, 768),
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        dims = [int(m) for m in dims]
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if not dims or len(weights) != len(dims) or min(dims) <= 0:
            raise ValueError(f"dims must be positive and match weights, got dims={dims}, weights={weights}")
        self.base_loss = base_loss
        self.dims = dims
        self.weights = weights
        self.last_global_loss: Tensor | None = None

    def forward(self, queries: Tensor, docs: Tensor) -> Tensor:
        if max(self.dims) > queries.shape[-1]:
            raise ValueError(f"MatryoshkaLoss dims {self.dims} exceed the embedding size {queries.shape[-1]}")
        total: Tensor | float = 0.0
        logged: Tensor | float = 0.0
        for dim, weight in zip(self.dims, self.weights, strict=True):
            q = same_row_counts(F.normalize(queries[..., :dim], dim=-1), queries)
            d = same_row_counts(F.normalize(docs[..., :dim], dim=-1), docs)
            total = total + weight * self.base_loss(q, d)
            last = getattr(self.base_loss, "last_global_loss", None)
            logged = logged + weight * last if last is not None else logged
        self.last_global_loss = logged if isinstance(logged, Tensor) else None
        return total  # type: ignore[return-value]

    @torch.no_grad()
    def clamp_parameters_(self) -> MatryoshkaLoss:
        """The base loss's :meth:`CrossRankLoss.clamp_parameters_` (call after each optimizer step)."""
        clamp = getattr(self.base_loss, "clamp_parameters_", None)
        if clamp is not None:
            clamp()
        return self
