"""Peak memory of causal-LM work, measured in this (fresh) process: the token loss and one training step.

Run by :mod:`dist_unlearn.bench.worker` (``kind`` ``lm_loss`` or ``train_step``), one configuration per
process, driven by :mod:`dist_unlearn.bench.memory_suite`.

``lm_loss``: hidden states ``h`` ``[n, H]`` (leaf, requires grad), an output head ``nn.Linear(H, V)`` and
targets ``y`` ``[n]``; the loss is the mean token negative log-likelihood
``L = -(1/n) Σ_i log softmax(W h_i + b)[y_i]`` and its backward (gradients for ``h``, ``W`` and ``b``).

- ``plain``: ``F.cross_entropy(head(h), y)``: the full ``[n, V]`` logits, their softmax and their
  gradient live at once (≈ 3 · n · V · 4 bytes in fp32);
- ``chunked``: :func:`dist_unlearn.models.chunked_lm.token_values` with
  :func:`~dist_unlearn.models.chunked_lm.target_logprob_and_hit`, the path every objective and metric
  uses: ``c`` rows of logits at a time, recomputed in the backward (peak ≈ a few ``[c, V]`` blocks).

A warm-up on 2 rows first creates the parameter gradient buffers (a training loop keeps them between
steps), so the measured increase is what the loss itself adds. ``head``: ``trainable`` (the gradient of
``W`` too: the backward of every chunk makes a ``[V, H]`` weight-gradient block before adding it to
``W.grad``) or ``frozen`` (gradient for ``h`` only, as with LoRA or a frozen output layer).

``train_step``: a causal LM loaded by :func:`dist_unlearn.models.loading.model_for_config` (the loading
path of every run) as ``fp32`` (all weights train) or ``nf4-lora`` (bitsandbytes NF4 base, frozen, LoRA
``r`` on the attention projections; Dettmers et al., 2023, *QLoRA*); one GradDiff step
``L = -γ·NLL_forget + α·NLL_retain`` (:func:`dist_unlearn.unlearning.get_objective`), ``backward`` and a
``torch.optim.AdamW`` step (whose first call allocates its two moments per trainable weight). Reported:
the resident memory the loaded model adds (``model_mib``), the peak increase of the step above the
loaded model (``peak_increase_mib``) and their sum (``total_mib``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from dist_unlearn.bench.memory import PeakProbe, rss_mib
from dist_unlearn.data.qa import QADataset, collate_qa

PRECISIONS = ("fp32", "nf4-lora")
LM_LOSS_METHODS = ("plain", "chunked")


def _device(spec: dict[str, Any]) -> str:
    return spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def lm_loss(method: str, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token NLL ``[]`` of ``targets`` ``[n]`` under ``head(hidden)``, ``hidden`` ``[n, H]`` (see module doc)."""
    if method == "plain":
        return F.cross_entropy(head(hidden), targets)
    if method == "chunked":
        from dist_unlearn.models.chunked_lm import target_logprob_and_hit, token_values

        return -token_values(target_logprob_and_hit, head, hidden, targets)[:, 0].mean()
    raise ValueError(f"unknown LM loss method {method!r}; expected one of {LM_LOSS_METHODS}")


def measure_lm_loss(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory and seconds of one LM loss forward + backward (``spec``: method, tokens, hidden, vocab)."""
    device = _device(spec)
    n, hidden_size, vocab = spec["tokens"], spec["hidden"], spec["vocab"]
    torch.manual_seed(0)  # the head's initialisation
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab).to(device).requires_grad_(spec.get("head", "trainable") == "trainable")
    hidden = (torch.randn(n, hidden_size, generator=generator) / hidden_size**0.5).to(device).requires_grad_(True)
    targets = torch.randint(vocab, (n,), generator=generator).to(device)
    lm_loss(spec["method"], head, hidden[:2], targets[:2]).backward()  # gradient buffers exist before the baseline
    probe = PeakProbe("cuda" if device.startswith("cuda") else "cpu")
    probe.start()
    start = time.perf_counter()
    loss = lm_loss(spec["method"], head, hidden, targets)
    loss.backward()
    _sync(device)
    seconds = time.perf_counter() - start
    logits_mib = n * vocab * 4 / 2**20
    return {**probe.report(), "seconds": round(seconds, 3), "loss": float(loss), "logits_fp32_mib": round(logits_mib)}


def qa_data(spec: dict[str, Any], model_dir: str) -> tuple[int, QADataset, QADataset]:
    """``(pad_token_id, forget_set, retain_set)``: fictitious-facts QA datasets (``spec["facts"]``:
    :func:`generate_facts` arguments) tokenized with the tokenizer saved in ``model_dir``."""
    from dist_unlearn.data import generate_facts
    from dist_unlearn.models.loading import load_tokenizer

    facts = generate_facts(**spec["facts"])
    tokenizer = load_tokenizer(model_dir)
    sets = [QADataset(facts.split(split), tokenizer, spec["max_length"]) for split in ("forget", "retain")]
    return tokenizer.pad_token_id, sets[0], sets[1]


def first_batch(dataset: QADataset, size: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The first ``size`` examples of ``dataset`` (cycled) as a :func:`collate_qa` batch."""
    return collate_qa([dataset[i % len(dataset)] for i in range(size)], pad_token_id)


def qa_batches(spec: dict[str, Any], model_dir: str) -> tuple[dict, dict]:
    """Forget and retain batches of ``spec["forget_batch"]`` / ``spec["retain_batch"]`` QA pairs."""
    pad, forget, retain = qa_data(spec, model_dir)
    return first_batch(forget, spec["forget_batch"], pad), first_batch(retain, spec["retain_batch"], pad)


def preload_libraries() -> None:
    """Import peft and bitsandbytes now, so that their import (tens of MiB) counts in no model's memory."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401


def measure_train_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Model memory and the peak of one GradDiff step + AdamW update (``spec``: model_dir, precision, lora_r,
    batches; see the module doc)."""
    from dist_unlearn.config.schema import LoraSettings, ModelConfig
    from dist_unlearn.models.loading import model_for_config
    from dist_unlearn.unlearning import get_objective

    if spec["precision"] not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {spec['precision']!r}")
    device = _device(spec)
    forget, retain = qa_batches(spec, spec["model_dir"])
    forget = {k: v.to(device) for k, v in forget.items()}
    retain = {k: v.to(device) for k, v in retain.items()}
    objective = get_objective("grad_diff", forget_weight=1.0, retain_weight=1.0)
    preload_libraries()
    before_load = rss_mib() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    if spec["precision"] == "fp32":
        model_cfg = ModelConfig(path=spec["model_dir"])
    else:
        model_cfg = ModelConfig(path=spec["model_dir"], quantization="nf4", lora=LoraSettings(r=spec["lora_r"]))
    model = model_for_config(spec["model_dir"], model_cfg).to(device).train()
    with torch.no_grad():  # weights loaded from a memory-mapped file become resident only when read
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.float().sum() if tensor.is_floating_point() else tensor.sum()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    probe = PeakProbe("cuda" if device.startswith("cuda") else "cpu")
    probe.start()
    model_mib = probe.baseline_mib - before_load
    start = time.perf_counter()
    out = objective(model, forget, retain)
    out.loss.backward()
    optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - start
    report = probe.report()
    return {
        **report,
        "seconds": round(seconds, 3),
        "model_mib": round(model_mib, 1),
        "total_mib": round(model_mib + report["peak_increase_mib"], 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "loss": out.logs["loss"],
    }
