"""sentence-transformers' own Trainer with dist-unlearn's ``GradCacheInfoNCELoss``: a batch far larger than one forward,
negatives shared across all ranks, a learnable temperature, under DeepSpeed ZeRO-3 (or ZeRO-2, or DDP).

    torchrun --nproc_per_node 2 examples/st_grad_cache.py --zero-stage 2 --steps 4

The only change to an ordinary ``SentenceTransformerTrainer`` script is the loss. CPU here (``use_cpu=True``); on
GPUs drop it. The model is the packaged all-MiniLM-L6-v2 (no network); the data are (anchor, positive, hard
negative) triplets made from a few facts. The trained model is saved in sentence-transformers' format and loaded
back with ``SentenceTransformer(path)``.
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import PrinterCallback, TrainerCallback

from dist_unlearn import GradCacheInfoNCELoss
from dist_unlearn.models.encoders import encoder_path

CAPITALS = [
    ("Paris", "France"),
    ("Rome", "Italy"),
    ("Lima", "Peru"),
    ("Oslo", "Norway"),
    ("Cairo", "Egypt"),
    ("Hanoi", "Vietnam"),
    ("Quito", "Ecuador"),
    ("Bern", "Switzerland"),
]
QUESTIONS = ["capital of {}", "what is the capital of {}", "{} capital city", "name the capital of {}"]


def triplets() -> dict[str, list[str]]:
    """Anchor = a question, positive = its answer, hard negative = the answer about the next country."""
    anchors, positives, negatives = [], [], []
    for i, (city, country) in enumerate(CAPITALS):
        other_city, other_country = CAPITALS[(i + 1) % len(CAPITALS)]
        for question in QUESTIONS:
            anchors.append(question.format(country))
            positives.append(f"{city} is the capital of {country}.")
            negatives.append(f"{other_city} is the capital of {other_country}.")
    return {"anchor": anchors, "positive": positives, "negative": negatives}


class PrintSteps(TrainerCallback):
    """One line per step on rank 0: the loss the Trainer logged (the global-batch loss) and the temperature."""

    def __init__(self, loss: GradCacheInfoNCELoss) -> None:
        self.loss = loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            print(f"step {state.global_step}: loss {logs['loss']:.4f}  temperature {self.loss.temperature:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed ZeRO stage; -1: DDP without DeepSpeed")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="rows per rank per step (anchors)")
    parser.add_argument("--mini-batch", type=int, default=4, help="rows per forward (bounds activation memory)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--temperature-lr", type=float, default=1e-2)
    parser.add_argument("--output", default="runs/st_grad_cache")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = SentenceTransformer(encoder_path("embedded"), device="cpu")
    loss = GradCacheInfoNCELoss(model, mini_batch_size=args.mini_batch, temperature=0.05, learnable_temperature=True)
    deepspeed = None
    if args.zero_stage >= 0:
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": args.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            "zero_allow_untested_optimizer": True,
        }
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=0,
        use_cpu=True,
        deepspeed=deepspeed,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        log_level="error",
        seed=0,
        # the temperature's own learning rate (it is the model parameter named below; see GradCacheInfoNCELoss)
        learning_rate_mapping={"log_inverse_temperature": args.temperature_lr},
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict(triplets()),
        loss=loss,
        callbacks=[PrintSteps(loss)],
    )
    trainer.remove_callback(PrinterCallback)  # PrintSteps prints the loss and the temperature instead
    trainer.train()
    final = os.path.join(args.output, "final")
    trainer.save_model(final)
    if trainer.is_world_process_zero():
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # a plain load on one rank (not ZeRO-3's collective zero.Init)
        loaded = SentenceTransformer(final, device="cpu")
        a, b, c = loaded.encode(["capital of Peru", "Lima is the capital of Peru.", "Oslo is the capital of Norway."])
        print(
            f"saved {final}; SentenceTransformer(path) loads it: cos(question, answer) {a @ b:.3f}, "
            f"cos(question, other answer) {a @ c:.3f}"
        )


if __name__ == "__main__":
    main()
