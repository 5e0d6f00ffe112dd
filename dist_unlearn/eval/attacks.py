"""Robustness attacks on an unlearned model: the model is changed, then the suite re-measures it.

* ``relearn`` (Hu et al., 2024, "Jogging the memory of unlearned LLMs", arXiv:2406.13356; Lynch et al.,
  2024): ``relearn_steps`` AdamW steps of answer NLL on the first ``relearn_fraction`` of the forget
  set (:func:`dist_unlearn.models.finetune.finetune`: one global batch of all those rows per step, lr
  decayed linearly to 10 %, gradient norm clipped at 1, seeded); the whole forget set is then re-measured,
  so recovery on the unseen part shows knowledge that was hidden rather than removed.
* ``nf4`` / ``int8`` (Zhang et al., 2024, "Catastrophic failure of LLM unlearning via quantization",
  arXiv:2410.16454): reload the saved model with bitsandbytes 4-bit NF4 or LLM.int8() weights
  (:func:`dist_unlearn.models.quantization.bnb_config`) and re-measure.

Where the model lives:

* ``relearn`` on several ranks, when evaluation partitions the model (``eval.shard_weights``,
  :func:`dist_unlearn.eval.suite.partitions`): a trainable ZeRO-3 engine in ``model.dtype``
  (:func:`dist_unlearn.models.finetune.trainable_engine`), built partitioned as the evaluated models are;
  each rank holds ``⌈P/W⌉`` of the ``P`` weights with their gradients and AdamW state, the rows of each step
  are split over the ranks, and the result is the one-process relearn's (same gradient per step). The
  engine is then frozen and scored like any evaluated model.
* ``relearn`` otherwise (one rank, a model evaluation keeps whole, or a directory with an
  ``inference.json``): a whole fp32 copy per rank, fine-tuned with ``torch.optim.AdamW`` by every rank alike
  (a plain optimizer on half-precision weights would drop the small updates; fp32 weights are their own
  master copy).
* ``nf4`` / ``int8``: a whole quantized copy per rank (bitsandbytes weights cannot be partitioned).

A saved directory with an ``inference.json`` (ULD) is attacked as the model it describes
(:func:`dist_unlearn.models.combined.load_scoring_model`): relearning fine-tunes target and assistant
through the combined logits (whole fp32 copies: the two members are not built as one partitioned
engine), the quantization attacks quantize both.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from dist_unlearn.config.schema import EVAL_ATTACKS
from dist_unlearn.data.facts import FactsBenchmark
from dist_unlearn.data.qa import QADataset
from dist_unlearn.distributed.env import get_world_size
from dist_unlearn.models.combined import load_scoring_model, read_inference_spec
from dist_unlearn.models.loading import choose_attn_implementation

ATTACKS = EVAL_ATTACKS  # the config lists them (config/schema.py): one source


def relearned_model(
    model_dir: str | Path,
    tokenizer: Any,
    facts: FactsBenchmark,
    steps: int,
    fraction: float,
    lr: float,
    max_length: int,
    seed: int = 0,
    dtype: str = "fp32",
    shard: bool = False,
) -> torch.nn.Module:
    """The model of ``model_dir`` after ``steps`` fine-tuning steps on ``⌈fraction·|D_f|⌉`` forget items
    (every step one batch of all of them), frozen and in eval mode.

    Args:
        dtype: the trainable engine's dtype (``model.dtype``), when it is built.
        shard: whether evaluation partitions this model (:func:`dist_unlearn.eval.suite.partitions`): with
            several ranks and no ``inference.json``, relearn a ZeRO-3 engine partitioned over the ranks
            (collective); else a whole fp32 copy on each rank (see the module docstring).
    Returns:
        A ``DeepSpeedEngine`` (partitioned), a ``transformers`` model or a combined model (ULD).
    """
    from dist_unlearn.models.finetune import finetune, trainable_engine

    forget = facts.split("forget")
    subset = forget[: max(1, math.ceil(fraction * len(forget)))]
    if shard and get_world_size() > 1 and read_inference_spec(model_dir) is None:
        model = trainable_engine(model_dir, dtype, lr, steps)
    else:
        model = load_scoring_model(model_dir)  # ULD: target − α·assistant, both fine-tuned through the combination
    finetune(
        model,
        QADataset(subset, tokenizer, max_length),
        tokenizer.pad_token_id,
        steps,
        len(subset),
        lr,
        seed=seed,
        desc="relearn attack",
    )
    return model.requires_grad_(False)


def quantized_model(model_dir: str | Path, quantization: str) -> torch.nn.Module:
    """The model of ``model_dir`` loaded with bitsandbytes ``nf4`` or ``int8`` weights (inference only); a
    combined model (``inference.json``, e.g. ULD's) with each of its members quantized."""
    from transformers import AutoModelForCausalLM

    from dist_unlearn.models.quantization import load_quantized

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" per matmul

    def load(path: str) -> torch.nn.Module:
        attn = choose_attn_implementation("auto")
        return load_quantized(AutoModelForCausalLM, path, quantization, torch.float32, attn).eval()

    return load_scoring_model(model_dir, load)


def attacked_model(
    name: str, model_dir: str | Path, tokenizer: Any, facts: FactsBenchmark, cfg: Any, shard: bool = False
) -> torch.nn.Module:
    """The model after attack ``name`` (one of :data:`ATTACKS`) with the run config's ``eval`` settings;
    ``shard``: whether evaluation partitions the model (then ``relearn`` trains a partitioned engine)."""
    if name == "relearn":
        e = cfg.eval
        return relearned_model(
            model_dir,
            tokenizer,
            facts,
            e.relearn_steps,
            e.relearn_fraction,
            e.relearn_lr,
            cfg.data.max_length,
            cfg.train.seed,
            cfg.model.dtype,
            shard,
        )
    if name in ("nf4", "int8"):
        return quantized_model(model_dir, name)
    raise ValueError(f"eval.attacks: unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
