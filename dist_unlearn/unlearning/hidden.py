"""Hidden-state objectives: RMU (Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious
Use With Unlearning", Representation Misdirection for Unlearning) and the pieces it needs: choosing a
decoder layer by name, restricting the trainable parameters by a name pattern, a seeded control vector.

Activations come from forward hooks on the module outputs (:func:`~dist_unlearn.models.chunked_lm.forward_hidden`),
which see full (not partitioned) activations under ZeRO-3, because parameters are gathered for the
module's forward before the hook fires.
"""

from __future__ import annotations

import re

import torch

from dist_unlearn.models.chunked_lm import unwrap_model
from dist_unlearn.unlearning.context import StepContext
from dist_unlearn.unlearning.terms import masked_sequence_mse

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def decoder_layer_names(model: torch.nn.Module) -> list[str]:
    """Full names of the decoder blocks (``...layers.<i>``) of ``model`` (engine/PEFT unwrapped), in order."""
    found = [(int(m.group(1)), name) for name, _ in unwrap_model(model).named_modules() if (m := _LAYER.search(name))]
    return [name for _, name in sorted(found)]


def resolve_layer(model: torch.nn.Module, layer: str | int | None) -> str:
    """The full module name for ``layer``: ``None`` = the middle decoder block ``layers.{L//2}``; an int =
    block ``i``; a string = a module name or a suffix of one (``model.layers.1`` matches
    ``base_model.model.model.layers.1`` in a PEFT model).

    Raises:
        ValueError: no such module, naming ``method.params.rmu.layer`` and the available blocks.
    """
    blocks = decoder_layer_names(model)
    if layer is None or isinstance(layer, int) or (isinstance(layer, str) and layer.isdigit()):
        if not blocks:
            raise ValueError(
                "rmu: no decoder layers (…layers.<i>) found. Fix: set method.params.rmu.layer to a module name"
            )
        index = len(blocks) // 2 if layer is None else int(layer)
        if not 0 <= index < len(blocks):
            raise ValueError(
                f"method.params.rmu.layer={layer}: the model has {len(blocks)} decoder layers. "
                f"Fix: 0..{len(blocks) - 1}"
            )
        return blocks[index]
    names = [name for name, _ in unwrap_model(model).named_modules()]
    matches = [n for n in names if n == layer or n.endswith("." + layer)]
    if not matches:
        raise ValueError(
            f"method.params.rmu.layer={layer!r} names no module. "
            f"Fix: one of {', '.join(blocks) or 'model.named_modules()'}"
        )
    return min(matches, key=len)


def default_trainable_pattern(layer_name: str) -> str:
    """``layers.{ℓ-2..ℓ}.mlp.`` of the chosen block ``ℓ`` (WMDP's default: MLPs of the layers up to ℓ)."""
    m = _LAYER.search(layer_name)
    if m is None:
        return re.escape(layer_name) + r"\."
    ell = int(m.group(1))
    indices = "|".join(str(i) for i in range(max(0, ell - 2), ell + 1))
    return rf"(?:^|\.)layers\.(?:{indices})\.mlp\."


def restrict_trainable(model: torch.nn.Module, pattern: str) -> list[str]:
    """Keep ``requires_grad`` only on parameters whose name matches ``pattern`` (``re.search``) and that
    were trainable already (e.g. LoRA weights); call before ``deepspeed.initialize``.

    Returns the trainable names. Raises ValueError when none is left (names the field and the fix).
    """
    regex = re.compile(pattern)
    kept = []
    for name, param in model.named_parameters():
        keep = param.requires_grad and regex.search(name) is not None
        param.requires_grad_(keep)
        if keep:
            kept.append(name)
    if not kept:
        raise ValueError(
            f"method.params.rmu.trainable={pattern!r} matches no trainable parameter. "
            "Fix: a pattern such as 'layers\\.1\\.mlp\\.' (see model.named_parameters())"
        )
    return kept


def control_vector(
    hidden_size: int, seed: int, device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """RMU's fixed random unit vector ``u`` ``[H]``: uniform [0, 1) entries from ``seed``, L2-normalised
    (identical on every rank)."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).to(device=device, dtype=dtype)


class RMU:
    """Representation Misdirection for Unlearning at one layer ``ℓ``.

    ``L_forget = mean_i mean_{t, d} (h^ℓ_θ(x_f)_{itd} − c·u_d)²`` and
    ``L_retain = mean_i mean_{t, d} (h^ℓ_θ(x_r)_{itd} − h^ℓ_ref(x_r)_{itd})²``, each a per-sequence mean
    over its real tokens (attention mask) and hidden dims, averaged over sequences; ``u`` is
    :func:`control_vector`, ``c`` the steering coefficient. Only parameters matching ``trainable``
    (default :func:`default_trainable_pattern`) train. Data: D_f, D_r, π_ref activations at ``ℓ``.

    Args:
        layer: see :func:`resolve_layer`. steering: ``c``. seed: seed of ``u``.
        trainable: regex over parameter names; ``None`` = MLPs of layers ℓ-2..ℓ.
    """

    def __init__(
        self, layer: str | int | None = None, steering: float = 6.5, seed: int = 0, trainable: str | None = None
    ) -> None:
        self.layer, self.steering, self.seed, self.trainable = layer, float(steering), int(seed), trainable
        self.layer_name: str | None = None

    def bind(self, model: torch.nn.Module) -> str:
        """Resolve the layer name for ``model`` (idempotent); returns it."""
        if self.layer_name is None:
            self.layer_name = resolve_layer(model, self.layer)
        return self.layer_name

    def restrict(self, model: torch.nn.Module) -> list[str]:
        """Freeze every parameter outside the trainable pattern (before ``deepspeed.initialize``)."""
        return restrict_trainable(model, self.trainable or default_trainable_pattern(self.bind(model)))

    def forget(self, ctx: StepContext) -> torch.Tensor:
        name = self.bind(ctx.model)
        h = ctx.hidden("forget").layers[name]
        target = self.steering * control_vector(h.shape[-1], self.seed, h.device, h.dtype)
        return masked_sequence_mse(h, target, ctx.sub_batch("forget")["attention_mask"])

    def retain(self, ctx: StepContext) -> torch.Tensor:
        name = self.bind(ctx.model)
        h = ctx.hidden("retain").layers[name]
        ref = ctx.ref_hidden("retain", (name,)).layers[name]
        return masked_sequence_mse(h, ref, ctx.sub_batch("retain")["attention_mask"])
