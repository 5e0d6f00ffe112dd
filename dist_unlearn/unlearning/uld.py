"""ULD: Unlearning from Logit Difference (Ji et al. 2024, "Reversing the Forget-Retain Objectives: An
Efficient LLM Unlearning Framework from Logit Difference").

Training reverses the goals: an *assistant* model learns to **remember** the forget set and to
**forget** the retain set. In this package the assistant is the model being trained (a LoRA adapter on
the target when ``model.lora.r > 0``, else a full copy; the paper also truncates the assistant to a few
layers, which is not done here):

``L_assistant = mean_i NLL_a(y_f,i|x_f,i)/|y_f,i| + α_r · mean_i mean_t CE(uniform, p_a(·|x_r,i, y_<t))``.

At inference the unlearned model's logits are ``z = z_target − α·z_assistant`` (:func:`uld_logits`):
whatever the assistant knows (the forget set) is subtracted from the target, the retain knowledge it
has forgotten is left alone. :func:`write_uld_artifact` records what evaluation needs to build it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

ULD_ARTIFACT = "uld.json"


def uld_logits(target_logits: torch.Tensor, assistant_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """``z_target − α·z_assistant`` (any matching shapes, e.g. ``[b, T, V]``)."""
    return target_logits - alpha * assistant_logits.to(target_logits.dtype)


class ULDModel(torch.nn.Module):
    """Inference-time combination: ``forward(input_ids, attention_mask)`` returns ``.logits`` =
    :func:`uld_logits` of the two models' logits (both run under the caller's grad mode)."""

    def __init__(self, target: torch.nn.Module, assistant: torch.nn.Module, alpha: float) -> None:
        super().__init__()
        self.target, self.assistant, self.alpha = target, assistant, float(alpha)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object
    ) -> SimpleNamespace:
        zt = self.target(input_ids=input_ids, attention_mask=attention_mask).logits
        za = self.assistant(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=uld_logits(zt, za, self.alpha))


def write_uld_artifact(run_dir: str | Path, target_dir: str | Path, assistant_dir: str | Path, alpha: float) -> Path:
    """Write ``RUN_DIR/uld.json`` = ``{"target": ..., "assistant": ..., "alpha": ...}`` (temp file + rename)."""
    path = Path(run_dir) / ULD_ARTIFACT
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"target": str(target_dir), "assistant": str(assistant_dir), "alpha": alpha}, indent=2))
    os.replace(tmp, path)
    return path


def load_uld_model(run_dir: str | Path) -> ULDModel:
    """Build the :class:`ULDModel` described by ``RUN_DIR/uld.json`` (both models from disk, eval mode)."""
    from dist_unlearn.models.loading import load_causal_lm

    spec = json.loads((Path(run_dir) / ULD_ARTIFACT).read_text())
    model = ULDModel(load_causal_lm(spec["target"]), load_causal_lm(spec["assistant"]), spec["alpha"])
    return model.eval()
