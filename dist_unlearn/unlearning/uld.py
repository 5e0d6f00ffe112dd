"""ULD: Unlearning from Logit Difference (Ji et al. 2024, "Reversing the Forget-Retain Objectives: An
Efficient LLM Unlearning Framework from Logit Difference").

Training reverses the goals: an *assistant* model learns to **remember** the forget set and to
**forget** the retain set. In this package the assistant is the model being trained (a LoRA adapter on
the target when ``model.lora.r > 0``, else a full copy; the paper also truncates the assistant to a few
layers, which is not done here):

``L_assistant = mean_i NLL_a(y_f,i|x_f,i)/|y_f,i| + α_r · mean_i mean_t CE(uniform, p_a(·|x_r,i, y_<t))``.

At inference the unlearned model's logits are ``z = z_target − α·z_assistant`` and its distribution
``softmax(z)`` (the paper's logit subtraction; :func:`uld_logits`): whatever the assistant knows (the forget set) is
subtracted from the target, the retain knowledge it has forgotten is left alone. That model is
:class:`ULDModel` (= :class:`dist_unlearn.models.combined.LogitDifferenceLM`), which every metric scores
like any causal LM. :func:`write_uld_artifact` saves ``inference.json`` in the exported assistant's
directory, so that evaluation (:func:`dist_unlearn.models.combined.load_scoring_model`) scores the
combination and not the assistant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dist_unlearn.models.combined import (
    INFERENCE_SPEC,
    LOGIT_DIFFERENCE,
    LogitDifferenceLM,
    load_scoring_model,
    logit_difference,
    write_inference_spec,
)

ULD_ARTIFACT = INFERENCE_SPEC
ULDModel = LogitDifferenceLM
"""ULD's unlearned model: ``ULDModel(target, assistant, alpha)``, logits ``z_target − α·z_assistant``."""


def uld_logits(target_logits: torch.Tensor, assistant_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """``z_target − α·z_assistant`` (any matching shapes, e.g. ``[b, T, V]``; at least fp32)."""
    return logit_difference(target_logits, assistant_logits, alpha)


def uld_inference_spec(target_dir: str | Path, alpha: float) -> dict[str, Any]:
    """The ``inference.json`` content of a ULD assistant: target − α·(this directory's model)."""
    return {
        "kind": LOGIT_DIFFERENCE,
        "method": "uld",
        "target": str(Path(target_dir).resolve()) if Path(target_dir).exists() else str(target_dir),
        "alpha": float(alpha),
        "source": "Ji et al. 2024, arXiv:2406.08607: logit subtraction, z_target - alpha * z_assistant",
    }


def write_uld_artifact(assistant_dir: str | Path, target_dir: str | Path, alpha: float) -> Path:
    """Write ``ASSISTANT_DIR/inference.json`` (:func:`uld_inference_spec`; temp file + rename)."""
    return write_inference_spec(assistant_dir, uld_inference_spec(target_dir, alpha))


def load_uld_model(assistant_dir: str | Path) -> torch.nn.Module:
    """The :class:`ULDModel` described by ``ASSISTANT_DIR/inference.json`` (both models from disk, eval mode)."""
    return load_scoring_model(assistant_dir)
