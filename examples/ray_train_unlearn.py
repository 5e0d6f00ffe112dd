"""Unlearning with ``UnlearningTrainer`` inside Ray Train: a ``train_func`` for ``TorchTrainer`` on 2 CPU workers,
DeepSpeed ZeRO-3, Ray's ``RayTrainReportCallback`` (metrics and the Trainer's checkpoints reported to Ray)
and ``prepare_trainer``. NPO + NLL on retain (``npo_gd``) with a cached reference.

    python examples/ray_train_unlearn.py --model runs/default/embedded/target \\
        --facts runs/default/embedded/facts.jsonl --steps 10 --workers 2

(``dist-unlearn prepare`` writes both.) Without ``--model`` a tiny random Llama is built and saved under
``--output`` first: it knows nothing, but the run shows the wiring.
"""

from __future__ import annotations

import argparse
import json
import os

import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def train_func(config: dict) -> None:
    """Runs on every Ray Train worker (torch.distributed already set up by Ray, gloo on CPU)."""
    import deepspeed
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from dist_unlearn.data import QADataset, generate_facts
    from dist_unlearn.data.facts import load_qa_file
    from dist_unlearn.integrations.hf import UnlearningTrainer

    world = ray.train.get_context().get_world_size()
    args = TrainingArguments(
        output_dir=os.path.join(config["output"], "hf"),
        per_device_train_batch_size=config["batch"] // world,
        max_steps=config["steps"],
        learning_rate=config["lr"],
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=config["steps"],  # RayTrainReportCallback reports at every save
        report_to=[],
        deepspeed={
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
            "zero_optimization": {
                "stage": 3,
                "stage3_param_persistence_threshold": 0,
                "stage3_gather_16bit_weights_on_model_save": True,  # checkpoints hold a loadable HF model
            },
        },
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
    )
    deepspeed.init_distributed(dist_backend="gloo" if args.use_cpu else "nccl", auto_mpi_discovery=False)
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    facts = load_qa_file(config["facts"]) if config["facts"] else generate_facts(num_people=12, questions_per_person=3)
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=QADataset(facts.split("forget"), tokenizer, 64),
        retain_dataset=QADataset(facts.split("retain"), tokenizer, 64),
        objective="npo_gd",
        objective_params={"beta": 0.1},
        processing_class=tokenizer,
        callbacks=[RayTrainReportCallback()],
    )
    trainer = prepare_trainer(trainer)
    trainer.train()
    if ray.train.get_context().get_world_rank() == 0:
        rows = [row for row in trainer.state.log_history if "unlearn_loss" in row]
        with open(os.path.join(config["output"], "losses.json"), "w") as handle:
            json.dump({"world_size": world, "steps": rows}, handle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="HF model directory (default: a tiny random Llama)")
    parser.add_argument("--facts", default=None, help="QA .jsonl with forget/retain splits (default: generated)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="global forget (and retain) rows per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default="runs/ray_train")
    parser.add_argument("--address", default=None, help="join this Ray cluster (HOST:PORT); default: start one")
    args = parser.parse_args()
    output = os.path.abspath(args.output)
    model_dir = args.model and os.path.abspath(args.model)
    if model_dir is None:  # a tiny random Llama, saved so every worker loads the same weights
        from dist_unlearn.data import generate_facts
        from dist_unlearn.models import build_embedded_model

        model_dir = os.path.join(output, "tiny-llama")
        if not os.path.isdir(model_dir):
            facts = generate_facts(num_people=12, questions_per_person=3)
            model, tokenizer = build_embedded_model(facts.corpus(), vocab_size=512, hidden_size=64, num_layers=2)
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)

    if args.address:  # quiet: the workers' output stays in Ray's session logs
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, args.workers),
            include_dashboard=False,
            log_to_driver=False,
        )
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "model": model_dir,
            "facts": args.facts and os.path.abspath(args.facts),
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "output": output,
        },
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="unlearn", storage_path=os.path.join(output, "ray_results")),
    )
    result = trainer.fit()
    ray.shutdown()
    print(f"forget_loss {result.metrics['forget_loss']:.4f}, retain_loss {result.metrics['retain_loss']:.4f}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    with open(os.path.join(output, "losses.json")) as handle:
        for row in json.load(handle)["steps"]:
            print(f"step {row['step']}: loss {row['unlearn_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
