"""Large-batch contrastive training: cross-rank losses, a tiled (memory-efficient) InfoNCE and gradient caching.

Every loss scores local queries against the docs of all ranks and follows one gradient convention:
averaging the per-rank parameter gradients (as DDP/DeepSpeed do) gives the single-process gradient of the
loss on the whole global batch. See :mod:`dist_unlearn.contrastive.losses`. The same holds for the losses' own
parameters (learnable temperature, SigLIP scale and bias): :class:`GradCache` averages their gradients across ranks,
and ``loss.clamp_parameters_()`` bounds them after each optimizer step. Never imports Ray.
"""

from dist_unlearn.contrastive.grad_cache import GradCache
from dist_unlearn.contrastive.losses import (
    AUCLoss,
    CrossRankLoss,
    DebiasedContrastiveLoss,
    DecoupledContrastiveLoss,
    InfoNCELoss,
    MatryoshkaLoss,
    SigmoidLoss,
)
from dist_unlearn.contrastive.tiled import TiledInfoNCELoss

__all__ = [
    "AUCLoss",
    "CrossRankLoss",
    "DebiasedContrastiveLoss",
    "DecoupledContrastiveLoss",
    "GradCache",
    "InfoNCELoss",
    "MatryoshkaLoss",
    "SigmoidLoss",
    "TiledInfoNCELoss",
]
