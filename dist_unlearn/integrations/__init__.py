"""Adapters that let a user keep their own training script and use dist-unlearn's pieces in it.

- :mod:`dist_unlearn.integrations.hf`: a Hugging Face ``Trainer`` that unlearns with any registered
  objective and reference strategy (``UnlearningTrainer`` and a mixin for existing subclasses).
- :mod:`dist_unlearn.integrations.sentence_transformers`: a ``SentenceTransformerTrainer`` loss that runs
  :class:`~dist_unlearn.contrastive.GradCache` with cross-rank InfoNCE.

Each submodule imports its framework on import; this package itself imports nothing heavy.
"""
