"""Memory per rank of evaluating a saved causal LM on W ranks: a whole fp32 copy per rank vs the weights in
the training dtype ZeRO-3-partitioned over the ranks (:func:`dist_unlearn.eval.suite.load_for_eval`).

Run by :mod:`dist_unlearn.bench.worker` (``kind`` ``eval``) as W fresh processes, one per rank
(:func:`dist_unlearn.bench.memory.run_ranks`: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` in
the environment; the group is joined by :func:`dist_unlearn.distributed.env.init_distributed`, as a run's
workers join theirs: gloo on the CPU, NCCL on CUDA). Each rank imports the libraries
(``transformers``, ``deepspeed``), joins the group, tokenizes the data and warms up: the same loading and
evaluation of a 1-layer Llama of width 16 (so that the modules, scorers and communication buffers both
modes need exist before the baseline, as a long evaluation job has them); then the probe starts
(:class:`~dist_unlearn.bench.memory.PeakProbe`) and the rank loads the model (``mode`` ``full``: fp32, a
whole copy; ``sharded``: ``dtype``, partitioned) and runs :func:`~dist_unlearn.eval.suite.evaluate_model` on
the first ``max_examples`` QA pairs of each split (scores, truth ratios, attacks; greedy answers of
``max_new_tokens`` tokens when ``generate``). Reported per rank: ``peak_increase_mib`` (loading and
evaluation, above the baseline), ``held_mib`` (resident memory the loaded model adds, before evaluating),
``weights_mib`` (bytes of the weights this rank holds: its partitions, or the whole model), ``seconds``
and the forget split's probability (the modes agree up to the dtype's rounding).

With ``relearn_steps > 0`` the rank measures the ``relearn`` attack instead: the model of ``mode`` is built
by :func:`dist_unlearn.eval.attacks.relearned_model` (``full``: a whole fp32 copy fine-tuned with AdamW on
every rank; ``sharded``: a trainable ZeRO-3 engine in ``dtype``, weights, gradients and AdamW state
partitioned), relearned for ``relearn_steps`` steps on half the forget split, then evaluated; the peak
covers both.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from dist_unlearn.bench.memory import PeakProbe, rss_mib

EVAL_MODES = ("full", "sharded")


def _weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights this rank holds (a partitioned weight counts its partition)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        tensor = p.ds_tensor if hasattr(p, "ds_tensor") else p
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


RELEARN_FRACTION = 0.5
RELEARN_LR = 1e-3
"""The relearn rows' ``eval.relearn_fraction`` and ``eval.relearn_lr`` (the config's defaults)."""


def _load(path: str, settings: Any, tokenizer: Any, facts: Any, device: Any, relearn_steps: int) -> torch.nn.Module:
    """The model to measure: as evaluation loads it, or after the relearn attack (``relearn_steps > 0``)."""
    from dist_unlearn.eval.attacks import relearned_model
    from dist_unlearn.eval.suite import load_for_eval

    if relearn_steps <= 0:
        return load_for_eval(path, settings, device)
    return relearned_model(
        path,
        tokenizer,
        facts,
        relearn_steps,
        RELEARN_FRACTION,
        RELEARN_LR,
        settings.max_length,
        dtype=settings.dtype,
        shard=settings.shard_weights == "true",
    )


def _warm_up(path: str, settings: Any, tokenizer: Any, facts: Any, device: Any, relearn_steps: int) -> None:
    """Load the tiny model saved at ``path`` as the measured run will (relearned for one step when it
    relearns), evaluate it on one example per split, free it."""
    import dataclasses
    import gc

    from dist_unlearn.eval.suite import evaluate_model

    model = _load(path, settings, tokenizer, facts, device, min(relearn_steps, 1))
    evaluate_model(model, tokenizer, facts, dataclasses.replace(settings, max_examples=1), device=device)
    del model
    gc.collect()


def measure_eval(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory of evaluating ``spec["model_dir"]`` in ``spec["mode"]`` on this rank (see the module doc)."""
    import dataclasses

    import deepspeed  # noqa: F401  (imported before the baseline in both modes: not the model's memory)

    from dist_unlearn.data import generate_facts
    from dist_unlearn.eval.suite import EvalSettings, evaluate_model
    from dist_unlearn.models.loading import load_tokenizer

    if spec["mode"] not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {spec['mode']!r}")
    import tempfile

    from dist_unlearn.models.tiny_llama import build_tiny_llama

    device = spec.get("device") or "cpu"
    warm_dir = tempfile.TemporaryDirectory(prefix="bench-eval-warm-")
    tiny = build_tiny_llama(len(load_tokenizer(spec["model_dir"])), hidden_size=16, num_layers=1, num_heads=2)
    tiny.save_pretrained(warm_dir.name)  # before the process group exists: every rank writes its own copy
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dist_unlearn.distributed.env import init_distributed

        init_distributed()  # as a worker of a run joins its group (gloo on the CPU, NCCL on CUDA)
    facts = generate_facts(**spec["facts"])
    tokenizer = load_tokenizer(spec["model_dir"])
    settings = EvalSettings(
        max_examples=spec["max_examples"],
        generate=spec["generate"],
        sampled_generations=0,
        max_new_tokens=spec["max_new_tokens"],
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
    )
    if spec["mode"] == "full":
        settings = dataclasses.replace(settings, dtype="fp32", shard_weights="false")
    else:
        settings = dataclasses.replace(settings, dtype=spec["dtype"], shard_weights="true")
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if device.startswith("cuda") else "cpu"
    relearn_steps = int(spec.get("relearn_steps", 0))
    _warm_up(warm_dir.name, settings, tokenizer, facts, local, relearn_steps)
    warm_dir.cleanup()
    probe = PeakProbe("cuda" if device.startswith("cuda") else "cpu")
    probe.start()
    start = time.perf_counter()
    model = _load(spec["model_dir"], settings, tokenizer, facts, local, relearn_steps)
    with torch.no_grad():  # weights read from a memory-mapped file become resident only when touched
        for p in model.parameters():
            (p.ds_tensor if hasattr(p, "ds_tensor") else p).sum()
    held = (rss_mib() if probe.device == "cpu" else torch.cuda.memory_allocated() / 2**20) - probe.baseline_mib
    result = evaluate_model(model, tokenizer, facts, settings, device=local)
    seconds = time.perf_counter() - start
    report = probe.report()
    weights = _weights_bytes(model)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return {
        **report,
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "dtype": settings.dtype,
        "held_mib": round(held, 1),
        "weights_mib": round(weights / 2**20, 1),
        "seconds": round(seconds, 3),
        "forget_prob": result["splits"]["forget"]["prob"],
        "relearn_steps": relearn_steps,
    }
