"""dist-unlearn: distributed unlearning and large-batch contrastive training on DeepSpeed ZeRO workers."""

__version__ = "0.1.0"
