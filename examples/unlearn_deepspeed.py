"""An ordinary DeepSpeed fine-tuning script turned into an unlearning script by a few lines from
dist-unlearn (marked ``# dist-unlearn``): NPO on the forget set plus NLL on the retain set
(``npo_gd``; Zhang et al. 2024, "Negative Preference Optimization").

Run on CPU (or GPUs) with any launcher, on a model directory and a QA file with forget/retain splits
(``dist-unlearn prepare`` writes both under ``OUTPUT/embedded/``: ``target/`` and ``facts.jsonl``):

    torchrun --nproc_per_node 2 examples/unlearn_deepspeed.py \\
        --model runs/default/embedded/target --facts runs/default/embedded/facts.jsonl --steps 5

Without ``--model`` a tiny Llama is built from the generated facts (random weights: it knows nothing,
but the loop runs). Each step every rank takes its own slice of a global forget batch and retain batch.
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_unlearn.data import QADataset, collate_qa, generate_facts
from dist_unlearn.data.facts import load_qa_file
from dist_unlearn.eval.answers import evaluate_splits, score_dataset  # dist-unlearn
from dist_unlearn.models import build_embedded_model
from dist_unlearn.unlearning import get_objective  # dist-unlearn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="HF model directory (default: a tiny random Llama)")
    parser.add_argument("--facts", default=None, help="QA .jsonl with forget/retain splits (default: generated)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="global forget (and retain) examples per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--out", default=None, help="write answer probabilities before/after here (JSON)")
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    facts = load_qa_file(args.facts) if args.facts else generate_facts(num_people=12, questions_per_person=3)
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        model, tokenizer = build_embedded_model(facts.corpus(), vocab_size=512, hidden_size=64, num_layers=2)
    pad = tokenizer.pad_token_id
    forget = QADataset(facts.split("forget"), tokenizer, 64)
    retain = QADataset(facts.split("retain"), tokenizer, 64)

    local = args.batch // world
    config = {
        "train_micro_batch_size_per_gpu": local,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    objective = get_objective("npo_gd", beta=0.1)  # dist-unlearn
    reference = score_dataset(engine, forget, pad, device=device)[:, 0]  # dist-unlearn: π_ref log-probs, once
    before = evaluate_splits(engine, {"forget": forget, "retain": retain}, pad, device=device)  # dist-unlearn

    engine.train()
    for step in range(args.steps):
        f_idx = [(step * args.batch + rank * local + i) % len(forget) for i in range(local)]
        r_idx = [(step * args.batch + rank * local + i) % len(retain) for i in range(local)]
        forget_batch = {k: v.to(device) for k, v in collate_qa([forget[i] for i in f_idx], pad).items()}
        retain_batch = {k: v.to(device) for k, v in collate_qa([retain[i] for i in r_idx], pad).items()}
        out = objective(engine, forget_batch, retain_batch, reference[f_idx].to(device))  # dist-unlearn
        engine.backward(out.loss)
        engine.step()
        if rank == 0:
            print(f"step {step + 1}: loss {out.logs['loss']:.4f}", flush=True)

    after = evaluate_splits(engine, {"forget": forget, "retain": retain}, pad, device=device)  # dist-unlearn
    if rank == 0:
        print(f"forget prob {before['forget']['prob']:.4f} -> {after['forget']['prob']:.4f}", flush=True)
        print(f"retain prob {before['retain']['prob']:.4f} -> {after['retain']['prob']:.4f}", flush=True)
        if args.out:
            with open(args.out, "w") as handle:
                json.dump({"before": before, "after": after, "world_size": world}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
