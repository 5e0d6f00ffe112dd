"""Measure one benchmark configuration in this (fresh) process and print one JSON line.

    python -m dist_unlearn.bench.worker '{"kind": "step", "method": "gradcache", "model": "tiny-bert", ...}'
    python -m dist_unlearn.bench.worker '{"kind": "loss", "loss": "tiled", "batch": 16384, ...}'

``step``: load the encoder and the batch, run one warm-up gradient on 2 rows (so gradient buffers and
kernels exist before the baseline), then measure the peak memory of one gradient computation (forward,
loss, backward; no optimizer step: its state is the same for every method) over ``batch`` queries +
``batch`` passages (``"bf16": true``: the forwards under bfloat16 autocast). ``loss``: random L2-normalised
float32 embeddings ``[batch, dim]`` (queries and docs, requiring grad), then the peak of one forward +
backward of the loss alone.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from dist_unlearn.bench.memory import PeakProbe


def _device(spec: dict[str, Any]) -> str:
    return spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")


def measure_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory and seconds of one encoder gradient step (see the module docstring)."""
    from dist_unlearn.bench.steps import Stepper, load_encoder, load_st_model, load_tokenizer, make_batch, sync

    device = _device(spec)
    if spec["method"] == "st":
        model = load_st_model(spec["model"], device)
    else:
        model = load_encoder(spec["model"])[0].to(device)
    stepper = Stepper(spec["method"], model, spec["chunk"], torch.bfloat16 if spec.get("bf16") else None)
    tokenizer = load_tokenizer()
    queries, docs = make_batch(tokenizer, spec["batch"], spec["max_length"], device, spec.get("texts", "facts"))
    warm_q, warm_d = make_batch(tokenizer, 2, spec["max_length"], device)
    stepper.gradient(warm_q, warm_d)
    probe = PeakProbe("cuda" if device.startswith("cuda") else "cpu")
    probe.start()
    start = time.perf_counter()
    stepper.gradient(queries, docs)
    sync(device)
    return {**probe.report(), "seconds": round(time.perf_counter() - start, 4)}


def measure_loss(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory and seconds of one InfoNCE forward + backward on random embeddings."""
    from dist_unlearn.contrastive import InfoNCELoss, TiledInfoNCELoss

    device = _device(spec)
    generator = torch.Generator().manual_seed(0)
    shape = (spec["batch"], spec["dim"])
    queries = torch.nn.functional.normalize(torch.randn(shape, generator=generator), dim=1).to(device)
    docs = torch.nn.functional.normalize(torch.randn(shape, generator=generator), dim=1).to(device)
    queries.requires_grad_(True)
    docs.requires_grad_(True)
    if spec["loss"] == "tiled":
        loss_fn = TiledInfoNCELoss(temperature=0.05, cross_rank=False, tile_size=spec["tile_size"])
    else:
        loss_fn = InfoNCELoss(temperature=0.05, cross_rank=False)
    probe = PeakProbe("cuda" if device.startswith("cuda") else "cpu")
    probe.start()
    start = time.perf_counter()
    loss_fn(queries, docs).backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {**probe.report(), "seconds": round(time.perf_counter() - start, 4)}


def main(argv: list[str]) -> int:
    """Entry point: ``argv[0]`` is the JSON spec; prints the JSON result as the last stdout line."""
    spec = json.loads(argv[0])
    from dist_unlearn.bench.eval_memory import measure_eval
    from dist_unlearn.bench.lm_memory import measure_lm_loss, measure_train_step
    from dist_unlearn.bench.reference_memory import measure_reference

    measure = {
        "step": measure_step,
        "loss": measure_loss,
        "lm_loss": measure_lm_loss,
        "train_step": measure_train_step,
        "reference": measure_reference,
        "eval": measure_eval,
    }[spec["kind"]]
    print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
