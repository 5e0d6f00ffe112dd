"""Registry of unlearning objectives: a forget term, an optional retain term and their weights.

``loss = γ·L_forget + α·L_retain`` with γ = ``forget_weight`` and α = ``retain_weight``. Objectives are
independent of any trainer: call one with a model (plain module, PEFT model, DDP module or DeepSpeed
engine at any ZeRO stage), an :class:`~dist_unlearn.unlearning.batch.UnlearnBatch` and, when
``needs_reference``, a :class:`~dist_unlearn.unlearning.reference.Reference`::

    objective = get_objective("npo_gd", beta=0.1)
    reference = build_reference("cached", engine, seq_datasets={"forget": forget_set}, pad_token_id=pad)
    out = objective(engine, UnlearnBatch(forget=fb, retain=rb), reference=reference)
    engine.backward(out.loss)

The simple form ``objective(engine, forget_batch, retain_batch, reference_logprob)`` (a ``[b]`` tensor of
``log π_ref`` of the forget answers) still works. ``objective.needs`` (:class:`DataNeeds`) says which
sub-batches and which π_ref quantities it reads, so a loop samples and loads only those; RMU-style
objectives also restrict the trainable parameters (``objective.prepare_model(model)`` before
``deepspeed.initialize``).

Normalisation (every term): a **mean over sequences** of a per-sequence quantity. Likelihood terms use
``NLL(y|x)/|y|``; preference terms (NPO, DPO) the summed ``log π(y|x)`` as in their papers; token-level
terms (KL, UNDIAL, WGA, ULD's uniform CE) a per-sequence mean over answer tokens; hidden-state terms a
per-sequence mean over real tokens and hidden dims. Each rank averages its own sequences and DeepSpeed
averages ranks, so with equal per-rank batch sizes the loss and gradient equal those of one process on
the global batch (world-size invariance).

Methods (``OBJECTIVES``), forget term + default retain term (``params.retain`` = none|nll|kl|uniform
overrides the retain term):

=========== ============================================================== =========== ==============
name        forget term (paper)                                            retain      data / π_ref
=========== ============================================================== =========== ==============
ga          −NLL/|y| (Jang et al. 2023)                                    —           D_f
grad_diff   GA                                                              NLL         D_f, D_r
npo         NPO (Zhang et al. 2024), β                                     —           D_f, π_ref seq
npo_gd      NPO                                                             NLL         + D_r
npo_kl      NPO                                                             KL(π_ref‖π) + D_r, π_ref logits
simnpo      SimNPO (Fan et al. 2024), β, δ                                  —           D_f
simnpo_gd   SimNPO                                                          NLL         + D_r
dpo         DPO, preferred = refusal (Rafailov et al. 2023), β              —           D_f, IdK, π_ref seq
idk_dpo     DPO                                                             NLL         + D_r
idk_nll     NLL of the refusal on forget prompts (Maini et al. 2024)        NLL         D_f, IdK, D_r
rmu         ‖h^ℓ − c·u‖² (Li et al. 2024), layer, steering, seed, trainable ‖h^ℓ − h^ℓ_ref‖² D_f, D_r, π_ref hidden
undial      CE to softmax(z_ref − β·onehot(y)) (Dong et al. 2024), β        —           D_f, π_ref logits
wga         −mean_t sg(p_t)^β·NLL_t (Wang et al. 2025), β                   —           D_f
flat        f-divergence template vs forget (Wang et al. 2024), divergence  —           D_f, IdK
uld         assistant: +NLL on D_f (Ji et al. 2024), alpha (inference)     uniform CE  D_f, D_r
contrastive InfoNCE forget→holdout vs retain (Zhang et al. 2024), temperature NLL     D_f, D_r, holdout
targeted    NLL(target) − λ·NLL(y_f) (TRU-style), ga_weight                 NLL         D_f, targets, D_r
=========== ============================================================== =========== ==============
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dist_unlearn.models.chunked_lm import HiddenStates
from dist_unlearn.unlearning import terms
from dist_unlearn.unlearning.batch import Batch, DataNeeds, UnlearnBatch, needs
from dist_unlearn.unlearning.context import StepContext
from dist_unlearn.unlearning.contrastive_unlearning import ContrastiveUnlearning
from dist_unlearn.unlearning.hidden import RMU
from dist_unlearn.unlearning.reference import Reference
from dist_unlearn.unlearning.token_terms import kl_to_reference, undial_ce, uniform_ce, weighted_nll
from dist_unlearn.unlearning.uld import uld_inference_spec


@dataclass
class ObjectiveOutput:
    """The scalar loss to backpropagate and detached values to log."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Term:
    """A loss term ``fn(ctx) -> scalar`` and what it reads.

    ``inference``: for a term whose trained model is not itself the unlearned model (ULD's assistant), the
    ``inference.json`` spec of the deployed model given the starting model's directory
    (:mod:`dist_unlearn.models.combined`); ``None`` = the trained model is the unlearned model."""

    fn: Callable[[StepContext], torch.Tensor]
    needs: DataNeeds = field(default_factory=DataNeeds)
    inference: Callable[[str], dict[str, Any]] | None = None

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        return self.fn(ctx)


class _GivenForgetLogprobs(Reference):
    """Adapter for the simple call form: π_ref log-probs of the forget batch given as a tensor."""

    mode = "given"

    def __init__(self, logprob: torch.Tensor) -> None:
        self.logprob = logprob

    def sequence_logprob(self, name: str, batch: Batch) -> torch.Tensor:
        if name != "forget":
            raise ValueError(f"a reference_logprob tensor only covers the forget batch, not '{name}'")
        return self.logprob.to(batch["input_ids"].device)

    def hidden(self, name: str, batch: Batch, layer_names: Sequence[str] = ()) -> HiddenStates:
        raise ValueError("a reference_logprob tensor holds no hidden states: pass a Reference (build_reference)")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError("a reference_logprob tensor holds no logits: pass a Reference (build_reference)")


@dataclass
class UnlearningObjective:
    """``γ·L_forget + α·L_retain``; see the module docstring for the call convention."""

    name: str
    forget: Term
    retain: Term | None
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    rmu: RMU | None = None

    @property
    def uses_retain(self) -> bool:
        return self.retain is not None and self.retain_weight != 0.0

    @property
    def needs(self) -> DataNeeds:
        """Sub-batches and π_ref quantities this objective reads."""
        out = self.forget.needs
        if self.uses_retain:
            assert self.retain is not None
            out = out | self.retain.needs
        return out

    @property
    def needs_reference(self) -> bool:
        return self.needs.needs_reference

    def layer_names(self, model: torch.nn.Module) -> tuple[str, ...]:
        """Module names whose outputs the objective reads (RMU's layer), resolved for ``model``."""
        return (self.rmu.bind(model),) if self.rmu is not None else ()

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Freeze what the objective does not train (RMU); call before ``deepspeed.initialize``."""
        if self.rmu is not None:
            self.rmu.restrict(model)

    def inference_spec(self, start_model_dir: str) -> dict[str, Any] | None:
        """How the trained weights are deployed (``inference.json`` content; ``None`` = as they are).

        ULD: ``{"kind": "logit_difference", "target": start_model_dir, "alpha": α, ...}``, i.e. the
        unlearned model is ``z_target − α·z_trained``. Save it next to every exported model
        (:func:`dist_unlearn.models.combined.write_inference_spec`) so that evaluation scores that model."""
        return self.forget.inference(start_model_dir) if self.forget.inference is not None else None

    def __call__(
        self,
        model: torch.nn.Module,
        batch: UnlearnBatch | Batch,
        retain_batch: Batch | None = None,
        reference: Reference | torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        if not isinstance(batch, UnlearnBatch):
            batch = UnlearnBatch(forget=batch, retain=retain_batch)
        if isinstance(reference, torch.Tensor):
            reference = _GivenForgetLogprobs(reference)
        if self.needs_reference and reference is None:
            raise ValueError(
                f"objective '{self.name}' needs reference_logprob / a Reference (π_ref {sorted(self.needs.reference)})"
            )
        ctx = StepContext(model, batch, reference, self.layer_names(model), self.name)
        forget_loss = self.forget(ctx)
        loss = self.forget_weight * forget_loss
        logs = {"forget_loss": float(forget_loss.detach())}
        if self.uses_retain:
            assert self.retain is not None
            if batch.retain is None:
                raise ValueError(f"objective '{self.name}' has a retain term but got no retain batch")
            retain_loss = self.retain(ctx)
            loss = loss + self.retain_weight * retain_loss
            logs["retain_loss"] = float(retain_loss.detach())
        with torch.no_grad():
            logs["forget_nll"] = float(ctx.stats("forget").mean_nll.mean())
            if self.uses_retain:
                logs["retain_nll"] = float(ctx.stats("retain").mean_nll.mean())
        logs["loss"] = float(loss.detach())
        return ObjectiveOutput(loss, logs)


# --- forget terms --------------------------------------------------------------------------------


def _ga() -> Term:
    return Term(lambda c: terms.gradient_ascent_term(c.stats("forget")))


def _npo(beta: float = 0.1) -> Term:
    return Term(lambda c: terms.npo_term(c.stats("forget"), c.ref_logprob("forget"), beta), needs(seq=("forget",)))


def _simnpo(beta: float = 2.5, delta: float = 0.0) -> Term:
    return Term(lambda c: terms.simnpo_term(c.stats("forget"), beta, delta))


def _dpo(beta: float = 0.1) -> Term:
    def fn(c: StepContext) -> torch.Tensor:
        idk, forget = c.stats("idk"), c.stats("forget")
        return terms.dpo_term(idk.logprob, c.ref_logprob("idk"), forget.logprob, c.ref_logprob("forget"), beta)

    return Term(fn, needs(idk=True, seq=("forget", "idk")))


def _idk_nll() -> Term:
    return Term(lambda c: terms.nll_term(c.stats("idk")), needs(idk=True))


def _undial(beta: float = 10.0) -> Term:
    return Term(
        lambda c: c.token_mean("forget", undial_ce(c.ref().logits, beta), with_reference=True).mean(),
        needs(logits=("forget",)),
    )


def _wga(beta: float = 1.0) -> Term:
    return Term(lambda c: -c.token_mean("forget", weighted_nll(beta)).mean())


def _flat(divergence: str = "kl") -> Term:
    if divergence not in ("kl", "tv"):
        raise ValueError(f"divergence must be 'kl' or 'tv', got {divergence!r}")
    return Term(lambda c: terms.flat_term(c.stats("idk"), c.stats("forget"), divergence), needs(idk=True))


def _uld(alpha: float = 0.5) -> Term:
    # alpha is used at inference only: the unlearned model is z_target − α·z_assistant (inference.json)
    return Term(lambda c: terms.nll_term(c.stats("forget")), inference=lambda target: uld_inference_spec(target, alpha))


def _contrastive(temperature: float = 0.1) -> Term:
    return Term(ContrastiveUnlearning(temperature), needs(retain=True, holdout=True))


def _targeted(ga_weight: float = 1.0) -> Term:
    return Term(lambda c: terms.targeted_term(c.stats("target"), c.stats("forget"), ga_weight), needs(target=True))


# --- retain terms --------------------------------------------------------------------------------

RETAIN_TERMS: dict[str, Term | None] = {
    "none": None,
    "nll": Term(lambda c: terms.nll_term(c.stats("retain")), needs(retain=True)),
    "kl": Term(
        lambda c: c.token_mean("retain", kl_to_reference(c.ref().logits), with_reference=True).mean(),
        needs(retain=True, logits=("retain",)),
    ),
    "uniform": Term(lambda c: c.token_mean("retain", uniform_ce).mean(), needs(retain=True)),
}
"""Retain terms by name: NLL/|y|; token KL(π_ref‖π_θ) (per-sequence token mean, log-softmax both
sides, padding and prompt masked); CE to the uniform distribution (ULD's assistant)."""

# name -> (forget-term factory, default retain term); "rmu" is built by get_objective
_SPECS: dict[str, tuple[Callable[..., Term] | None, str]] = {
    "ga": (_ga, "none"),
    "grad_diff": (_ga, "nll"),
    "npo": (_npo, "none"),
    "npo_gd": (_npo, "nll"),
    "npo_kl": (_npo, "kl"),
    "simnpo": (_simnpo, "none"),
    "simnpo_gd": (_simnpo, "nll"),
    "dpo": (_dpo, "none"),
    "idk_dpo": (_dpo, "nll"),
    "idk_nll": (_idk_nll, "nll"),
    "rmu": (None, "hidden_mse"),
    "undial": (_undial, "none"),
    "wga": (_wga, "none"),
    "flat": (_flat, "none"),
    "uld": (_uld, "uniform"),
    "contrastive": (_contrastive, "nll"),
    "targeted": (_targeted, "nll"),
}


class _ObjectiveNames(Sequence[str]):
    """A read-only, live view of the registered names (built in, then :func:`register_objective`'s in order).

    Behaves like a tuple of str (``in``, iteration, ``len``, indexing, ``==`` with a tuple or list); code that
    imported it before a registration sees the new name too."""

    def __getitem__(self, index: Any) -> Any:
        return tuple(_SPECS)[index]

    def __len__(self) -> int:
        return len(_SPECS)

    def __contains__(self, name: object) -> bool:
        return name in _SPECS

    def __iter__(self) -> Any:
        return iter(tuple(_SPECS))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (Sequence, _ObjectiveNames)) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(_SPECS))

    def __repr__(self) -> str:
        return repr(tuple(_SPECS))


OBJECTIVES: Sequence[str] = _ObjectiveNames()
"""Names accepted by :func:`get_objective`: the built-in ones and those added by :func:`register_objective`."""


def register_objective(
    name: str,
    factory: Callable[..., Any],
    *,
    retain: str = "none",
    needs: DataNeeds | None = None,
) -> None:
    """Add an unlearning objective under ``name`` without editing the registry.

    After the call ``name`` is in :data:`OBJECTIVES`, so :func:`get_objective`, ``objective_from_config``, the
    CLI's config validation (its registries hold :data:`OBJECTIVES`) and the integrations accept it.

    Args:
        name: the method name (a config's ``method.names`` entry); must not be registered already.
        factory: builds the forget term from the method's parameters: ``factory(**params)`` returns either a
            :class:`Term` or a callable ``fn(ctx) -> scalar`` on a
            :class:`~dist_unlearn.unlearning.context.StepContext` (a class whose instances are such callables
            works as is). Its keyword parameters are the method's parameters (``method.params.<name>``),
            checked like the built-in ones; give them defaults. The loss it returns is minimised, weighted by
            ``forget_weight``; normalise it as a mean over sequences (see the module docstring) to keep the
            world-size invariance.
        retain: the default retain term (``none``, ``nll``, ``kl`` or ``uniform``; ``params.retain`` overrides it).
        needs: what the forget term reads (:func:`~dist_unlearn.unlearning.batch.needs`), used when ``factory``
            returns a plain callable; default: the forget batch only.

    Raises:
        ValueError: ``name`` is taken, empty or not a str; ``factory`` is not callable; ``retain`` is unknown.

    Example::

        from dist_unlearn.unlearning import register_objective, terms

        def scaled_ga(scale: float = 0.5):
            return lambda ctx: scale * terms.gradient_ascent_term(ctx.stats("forget"))

        register_objective("scaled_ga", scaled_ga, retain="nll")
        objective = get_objective("scaled_ga", scale=0.25)
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_objective: name must be a non-empty str, got {name!r}")
    if name in _SPECS:
        raise ValueError(
            f"register_objective: an objective named '{name}' is already registered; pick another name "
            "(built-in names cannot be replaced)"
        )
    if not callable(factory):
        raise ValueError(f"register_objective('{name}'): factory must be callable, got {type(factory).__name__}")
    if retain not in RETAIN_TERMS:
        known = ", ".join(RETAIN_TERMS)
        raise ValueError(f"register_objective('{name}'): retain must be one of {known}, got {retain!r}")

    def build(**params: Any) -> Term:
        made = factory(**params)
        if isinstance(made, Term):
            return made
        if not callable(made):
            raise ValueError(
                f"objective '{name}': its factory returned a {type(made).__name__}; return a Term or a callable "
                "fn(ctx) -> scalar loss"
            )
        return Term(made, needs if needs is not None else DataNeeds())

    build.__signature__ = _factory_signature(factory)  # type: ignore[attr-defined]
    _SPECS[name] = (build, retain)


def _factory_signature(factory: Callable[..., Any]) -> inspect.Signature:
    """The keyword parameters of ``factory`` (a class: of its ``__init__``), used to check method parameters."""
    signature = inspect.signature(factory)
    return signature.replace(parameters=[p for p in signature.parameters.values() if p.kind != p.VAR_POSITIONAL])


def accepted_params(name: str) -> frozenset[str]:
    """Method parameters of ``name`` (besides ``forget_weight``/``retain_weight``)."""
    factory = _SPECS[name][0]
    own = inspect.signature(factory or RMU).parameters
    return frozenset(own) | ({"retain"} if name != "rmu" else frozenset())


def get_objective(
    name: str, forget_weight: float = 1.0, retain_weight: float = 1.0, **params: Any
) -> UnlearningObjective:
    """Build the objective ``name`` (one of :data:`OBJECTIVES`) with its method parameters.

    ``params["retain"]`` (not for ``rmu``) picks the retain term: ``none``, ``nll``, ``kl`` or ``uniform``.

    Raises:
        ValueError: unknown name, unknown parameter or value (the message lists what is accepted).
    """
    if name not in _SPECS:
        raise ValueError(f"unknown unlearning method '{name}'. Known methods: {', '.join(OBJECTIVES)}")
    accepted = accepted_params(name)
    unknown = sorted(set(params) - accepted)
    if unknown:
        allowed = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"method '{name}' does not take parameter(s) {', '.join(unknown)}; it accepts: {allowed}")
    factory, default_retain = _SPECS[name]
    if factory is None:  # rmu
        rmu = RMU(**params)
        forget = Term(rmu.forget)
        retain = Term(rmu.retain, needs(retain=True, hidden=("retain",)))
        return UnlearningObjective(name, forget, retain, forget_weight, retain_weight, dict(params), rmu)
    retain_name = params.pop("retain", default_retain)
    if retain_name not in RETAIN_TERMS:
        raise ValueError(f"method '{name}': retain must be one of {', '.join(RETAIN_TERMS)}, got {retain_name!r}")
    return UnlearningObjective(
        name, factory(**params), RETAIN_TERMS[retain_name], forget_weight, retain_weight, dict(params)
    )


def objective_from_config(cfg: Any, name: str) -> UnlearningObjective:
    """The objective ``name`` of a run config: ``method.forget_weight``/``retain_weight`` as defaults,
    overridden by ``method.params.<name>`` (which may also set ``forget_weight``/``retain_weight``)."""
    params = {"forget_weight": cfg.method.forget_weight, "retain_weight": cfg.method.retain_weight}
    params.update(cfg.method.params.get(name, {}))
    return get_objective(name, **params)
