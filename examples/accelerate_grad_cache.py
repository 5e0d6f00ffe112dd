"""GradCache in a plain ``accelerate`` script with a ``DeepSpeedPlugin``: contrastive steps over a batch larger than
one forward, with negatives shared across processes and a learnable temperature.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_grad_cache.py --zero-stage 2

On a CPU-only machine ``--multi_gpu`` still starts 2 processes (gloo); ``--cpu`` would make ``accelerate
launch`` start one process, and ``Accelerator(cpu=True)`` turns DeepSpeed off (see ``main``). The encoder is
the packaged all-MiniLM-L6-v2 (no network).

The one change to an ordinary accelerate loop: ``cache.step_deferred(queries, docs)`` replaces the forward, and
``accelerator.backward`` gets the surrogate it returns. GradCache encodes ``--chunk`` rows at a time, computes
InfoNCE on the whole global batch, backpropagates every chunk but the last through the DeepSpeed engine (gradient
accumulation boundary off under ZeRO-0/1/2), and ``accelerator.backward`` (``engine.backward`` + ``engine.step``
under DeepSpeed) adds the last chunk and reduces once. The temperature lives in the loss, outside the engine:
GradCache averages its gradient over the processes and a small optimizer of our own steps it.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator, DeepSpeedPlugin, PartialState
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

from dist_unlearn import GradCache, InfoNCELoss
from dist_unlearn.models.encoders import encoder_path

PAIRS = [
    ("how do plants make food", "Photosynthesis turns light, water and carbon dioxide into sugar."),
    ("capital of france", "Paris is the capital and largest city of France."),
    ("why is the sky blue", "Air scatters short blue wavelengths of sunlight more than red ones."),
    ("boiling point of water", "At sea level water boils at 100 degrees Celsius."),
    ("who wrote hamlet", "Hamlet is a tragedy written by William Shakespeare."),
    ("largest planet", "Jupiter is the largest planet in the Solar System."),
    ("speed of light", "Light travels about 300,000 kilometres per second in a vacuum."),
    ("what do bees make", "Bees collect nectar and turn it into honey."),
    ("tallest mountain", "Mount Everest is the highest mountain above sea level."),
    ("freezing point of water", "Pure water freezes at 0 degrees Celsius."),
    ("what is dna", "DNA carries the genetic instructions of living organisms."),
    ("longest river", "The Nile is often called the longest river in the world."),
    ("how do magnets work", "Magnets attract iron because of aligned electron spins."),
    ("what is a prime number", "A prime has exactly two divisors: one and itself."),
    ("who painted the mona lisa", "Leonardo da Vinci painted the Mona Lisa."),
    ("what causes tides", "The Moon's gravity pulls the oceans and causes tides."),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--batch", type=int, default=8, help="global rows per step (split over the processes)")
    parser.add_argument("--chunk", type=int, default=2, help="rows per forward (GradCache's chunk_size)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=0.05, help="initial temperature (learned)")
    parser.add_argument("--dropout", type=float, default=0.1, help="the encoder's dropout (replayed exactly)")
    parser.add_argument("--out", default=None, help="save the weights and temperature after training here (.pt)")
    return parser.parse_args(argv)


def load_encoder(dropout: float) -> tuple[torch.nn.Module, object]:
    path = encoder_path("embedded")
    model = AutoModel.from_pretrained(
        path, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, add_pooling_layer=False
    )  # the pooler is unused (mean pooling): DDP wants every parameter to get a gradient
    return model, AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,  # rows are GradCache's business; DeepSpeed only needs a number
        "gradient_accumulation_steps": 1,  # one GradCache step is one optimizer step
        "zero_optimization": {
            "stage": args.zero_stage,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,  # for accelerator.get_state_dict
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if not torch.cuda.is_available():
        # CPU only: set up the process group as a CPU one first (as transformers' TrainingArguments(use_cpu=True)
        # does); Accelerator(cpu=True) would turn DeepSpeed off, and without this accelerate counts 1 process
        PartialState(cpu=True)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    world = accelerator.num_processes
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the number of processes ({world})")

    torch.manual_seed(0)
    model, tokenizer = load_encoder(args.dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loader = DataLoader(PAIRS, batch_size=args.batch // world, shuffle=False)  # accelerate deals batches to ranks
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    loss_fn = InfoNCELoss(args.temperature, learnable_temperature=True).to(accelerator.device)
    loss_optimizer = torch.optim.SGD(loss_fn.parameters(), lr=args.lr)
    cache = GradCache(model, chunk_size=args.chunk, loss_fn=loss_fn)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    model.train()
    step = 0
    while step < args.steps:
        for queries, docs in loader:
            loss, surrogate = cache.step_deferred(tokenize(list(queries)), tokenize(list(docs)))
            accelerator.backward(surrogate)  # DeepSpeed: engine.backward (the last chunk, one reduction) + engine.step
            optimizer.step()  # a no-op under DeepSpeed (the engine stepped); the real step otherwise
            optimizer.zero_grad()
            loss_optimizer.step()
            loss_optimizer.zero_grad()
            loss_fn.clamp_parameters_()
            step += 1
            accelerator.print(
                f"step {step}: loss {loss_fn.last_global_loss.item():.4f}  temperature "
                f"{1 / loss_fn.log_inverse_temperature.exp().item():.4f}  ({cache.ds_accumulation or cache.kind})"
            )
            if step == args.steps:
                break

    state = accelerator.get_state_dict(model)  # whole tensors on every process (gathered under ZeRO-3)
    if args.out and accelerator.is_main_process:
        weights = {name: tensor.detach().double().cpu() for name, tensor in state.items()}
        weights["log_inverse_temperature"] = loss_fn.log_inverse_temperature.detach().double().cpu()
        torch.save(weights, args.out)
        accelerator.print(f"weights: {args.out}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
