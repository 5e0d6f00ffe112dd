"""dist-unlearn: distributed unlearning and large-batch contrastive training on DeepSpeed ZeRO workers.

The main names are importable from here; each is loaded on first use (``import dist_unlearn`` stays cheap and
imports neither torch nor DeepSpeed):

==================================  ================================================================
``GradCache``                       gradient caching for a module, DDP module or DeepSpeed engine (ZeRO 0-3)
``InfoNCELoss``, ``SigmoidLoss``    cross-rank contrastive losses (hard negatives, learnable temperature)
``all_gather_with_grad``            all-gather along dim 0 with gradients back to each rank's slice
``get_objective``, ``OBJECTIVES``   the registry of unlearning objectives
``register_objective``              add an objective of your own under a new name
``UnlearningTrainer``               a ``transformers.Trainer`` that unlearns (``integrations.hf``)
``GradCacheInfoNCELoss``            a ``SentenceTransformerTrainer`` loss (``integrations.sentence_transformers``)
==================================  ================================================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "GradCache": "dist_unlearn.contrastive.grad_cache",
    "InfoNCELoss": "dist_unlearn.contrastive.losses",
    "SigmoidLoss": "dist_unlearn.contrastive.losses",
    "all_gather_with_grad": "dist_unlearn.distributed.gather",
    "get_objective": "dist_unlearn.unlearning.objectives",
    "OBJECTIVES": "dist_unlearn.unlearning.objectives",
    "register_objective": "dist_unlearn.unlearning.objectives",
    "UnlearningTrainer": "dist_unlearn.integrations.hf",
    "GradCacheInfoNCELoss": "dist_unlearn.integrations.sentence_transformers",
}
"""Public name -> the module that defines it."""

__all__ = [
    "OBJECTIVES",
    "GradCache",
    "GradCacheInfoNCELoss",
    "InfoNCELoss",
    "SigmoidLoss",
    "UnlearningTrainer",
    "__version__",
    "all_gather_with_grad",
    "get_objective",
    "register_objective",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from dist_unlearn.contrastive.grad_cache import GradCache
    from dist_unlearn.contrastive.losses import InfoNCELoss, SigmoidLoss
    from dist_unlearn.distributed.gather import all_gather_with_grad
    from dist_unlearn.integrations.hf import UnlearningTrainer
    from dist_unlearn.integrations.sentence_transformers import GradCacheInfoNCELoss
    from dist_unlearn.unlearning.objectives import OBJECTIVES, get_objective, register_objective


def __getattr__(name: str) -> Any:
    """Import the module of a public name on first access (PEP 562) and cache the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_unlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
