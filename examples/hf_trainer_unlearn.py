"""Unlearning with a Hugging Face ``Trainer``: swap ``Trainer`` for ``UnlearningTrainer`` and pass the forget
and retain sets. DeepSpeed ZeRO-3 through ``TrainingArguments(deepspeed=...)``, on CPU here
(``use_cpu=True``); on GPUs drop ``use_cpu``. NPO on the forget set plus NLL on the retain set
(``npo_gd``; Zhang et al. 2024) with a cached reference, unless ``--objective`` says otherwise.

    torchrun --nproc_per_node 2 examples/hf_trainer_unlearn.py \\
        --model runs/default/embedded/target --facts runs/default/embedded/facts.jsonl --steps 10

(``dist-unlearn prepare`` writes both.) Without ``--model`` a tiny random Llama is built and saved under
``--output``: it knows nothing, but the run shows the wiring.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainingArguments

from dist_unlearn.data import QADataset, generate_facts
from dist_unlearn.data.facts import load_qa_file
from dist_unlearn.integrations.hf import UnlearningEvalCallback, UnlearningTrainer
from dist_unlearn.models import build_embedded_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="HF model directory (default: a tiny random Llama)")
    parser.add_argument("--facts", default=None, help="QA .jsonl with forget/retain splits (default: generated)")
    parser.add_argument("--objective", default="npo_gd")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="global forget (and retain) rows per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--output", default="runs/hf_trainer")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    facts = load_qa_file(args.facts) if args.facts else generate_facts(num_people=12, questions_per_person=3)
    deepspeed = {  # "auto" values come from TrainingArguments
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
        "zero_optimization": {
            "stage": args.zero_stage,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,  # saves a loadable HF model
        },
    }
    training_args = TrainingArguments(
        output_dir=args.output,
        per_device_train_batch_size=args.batch // world,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        deepspeed=deepspeed,
        use_cpu=not torch.cuda.is_available(),
        seed=0,  # also the seed of the forget/retain sampling
        disable_tqdm=True,
    )
    if training_args.use_cpu:  # accelerate joins DeepSpeed's comm to the process group only on GPUs
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    model_dir = args.model
    if model_dir is None:  # a tiny random Llama saved by rank 0 (the sharded reference loads it from disk)
        model_dir = os.path.join(args.output, "tiny-llama")
        if training_args.process_index == 0 and not os.path.isdir(model_dir):
            model, tok = build_embedded_model(facts.corpus(), vocab_size=512, hidden_size=64, num_layers=2)
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
        if world > 1:
            torch.distributed.barrier()
    # loaded after TrainingArguments: under ZeRO-3 each rank then keeps only its shard (zero.Init)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    forget = QADataset(facts.split("forget"), tokenizer, 64)
    retain = QADataset(facts.split("retain"), tokenizer, 64)

    # forget/retain answer probability at the start (once the engine exists) and on trainer.evaluate()
    evaluation = UnlearningEvalCallback({"forget": forget, "retain": retain}, at_start=True)
    trainer = UnlearningTrainer(
        model,
        training_args,
        forget_dataset=forget,
        retain_dataset=retain,
        objective=args.objective,
        reference="auto",  # cached for npo_gd, sharded for npo_kl (π_ref logits)
        processing_class=tokenizer,
        callbacks=[evaluation],
    )
    trainer.remove_callback(PrinterCallback)  # quiet: the summary below instead of every log dict
    trainer.train()
    before, after = evaluation.at_start, trainer.evaluate()
    trainer.save_model(os.path.join(args.output, "model"))  # a HF model directory (ZeRO-3 weights gathered)
    if trainer.is_world_process_zero():
        for row in trainer.state.log_history:
            if "unlearn_loss" in row:
                terms = ", ".join(f"{k} {row[k]:.4f}" for k in ("forget_loss", "retain_loss") if k in row)
                print(f"step {row['step']}: loss {row['unlearn_loss']:.4f} ({terms})", flush=True)
        for split in ("forget", "retain"):
            key = f"eval_{split}_prob"
            print(f"{split} prob {before[key]:.4f} -> {after[key]:.4f}", flush=True)
        print(f"model: {os.path.join(args.output, 'model')}", flush=True)
        summary = {"world_size": world, "before": before, "after": after, "log_history": trainer.state.log_history}
        with open(os.path.join(args.output, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
