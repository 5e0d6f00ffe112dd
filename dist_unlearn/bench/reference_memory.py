"""Memory of each unlearning reference-model strategy (``method.reference``), measured in this process.

Run by :mod:`dist_unlearn.bench.worker` (``kind`` ``reference``). The training model is the one a LoRA
run trains (fp32 base + LoRA ``r``, loaded by :func:`dist_unlearn.models.loading.model_for_config`), so
that every strategy applies, ``adapter_disabled`` included. With the model loaded and the forget batch
ready, the probe starts; then :func:`dist_unlearn.unlearning.build_reference` builds π_ref (``cached``
scores the forget set now) and one ``sequence_logprob("forget", batch)`` query runs. Reported:
``reference_mib`` (resident memory the reference still holds afterwards, current RSS above the baseline)
and ``peak_increase_mib`` (peak while building and querying). This is one process, i.e. one rank of a
1-rank run: ``sharded`` keeps ``1/W`` of the weights per rank at ``W`` ranks, so its figure here is the
``W = 1`` upper bound plus the DeepSpeed engine's own overhead.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from dist_unlearn.bench.lm_memory import first_batch, preload_libraries, qa_data
from dist_unlearn.bench.memory import PeakProbe, rss_mib


def _init_single_rank() -> None:
    """A 1-rank gloo process group (DeepSpeed's ``sharded`` engine needs one)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def measure_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory of the reference ``spec["mode"]`` on ``spec["model_dir"]`` (see the module doc)."""
    from dist_unlearn.config.schema import LoraSettings, ModelConfig
    from dist_unlearn.models.loading import model_for_config
    from dist_unlearn.models.logprobs import forward_sequence_stats
    from dist_unlearn.unlearning import build_reference

    mode, model_dir = spec["mode"], spec["model_dir"]
    pad, forget_set, _ = qa_data(spec, model_dir)
    batch = first_batch(forget_set, spec["forget_batch"], pad)
    model = model_for_config(model_dir, ModelConfig(path=model_dir, lora=LoraSettings(r=spec["lora_r"])))
    preload_libraries()
    if mode == "sharded":
        _init_single_rank()
        import deepspeed  # noqa: F401  (imported before the baseline: its import is not the reference's cost)
    with torch.no_grad():  # the training model has run before π_ref is built (kernels, allocator pools warm)
        forward_sequence_stats(model, batch)
    probe = PeakProbe("cpu")
    probe.start()
    start = time.perf_counter()
    reference = build_reference(
        mode,
        model,
        model_path=model_dir,
        pad_token_id=pad,
        seq_datasets={"forget": forget_set},
        micro_batch_size=spec["forget_batch"],
    )
    logprob = reference.sequence_logprob("forget", batch) if reference is not None else None
    seconds = time.perf_counter() - start
    held = rss_mib() - probe.baseline_mib
    report = probe.report()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return {
        **report,
        "reference_mib": round(held, 1),
        "seconds": round(seconds, 3),
        "mean_forget_logprob": None if logprob is None else round(float(logprob.mean()), 4),
    }
