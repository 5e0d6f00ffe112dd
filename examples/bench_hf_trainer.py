"""Step time of ``UnlearningTrainer`` vs the CLI's loop (``run_job``) on the same job, side by side in
one ``torchrun`` launch: npo_gd with a cached reference, DeepSpeed ZeRO-3, the CLI's own DeepSpeed config
for both, the same model, data, seed and batches (the losses agree; the script checks it).

    torchrun --nproc_per_node 2 examples/bench_hf_trainer.py --steps 20 --repeats 2 --out bench_hf.json

Per step: the CLI's ``step_seconds`` (draw the batch, objective, backward, step, average the logs over
ranks; its per-step stop vote and checkpoint check come after and are not counted) and, for the
Trainer, the time between consecutive ``on_step_end`` callbacks (everything its loop does per step,
its own logging included). The first ``--warmup`` steps of each run are dropped; the runs alternate
(CLI, Trainer, CLI, Trainer, ...) so a change of machine load hits both. Reported: median per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

SIZES = {"h64-l2": (64, 2, 4), "h256-l4": (256, 4, 4)}  # hidden, layers, heads
DATA = {"num_people": 40, "questions_per_person": 4, "forget_fraction": 0.25, "holdout_fraction": 0.1}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def model_dir(root: Path, size: str) -> str:
    """The model of ``size``, built by rank 0 (other ranks wait for the directory)."""
    from dist_unlearn.data import generate_facts
    from dist_unlearn.models import build_embedded_model

    path = root / size
    if int(os.environ.get("RANK", "0")) == 0 and not path.is_dir():
        hidden, layers, heads = SIZES[size]
        facts = generate_facts(**DATA, seed=0)
        model, tok = build_embedded_model(facts.corpus(), 512, hidden, layers, heads)
        model.save_pretrained(str(path) + ".tmp")
        tok.save_pretrained(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    while not path.is_dir():
        time.sleep(0.5)
    return str(path)


def cli_run(path: str, out: Path, steps: int, batch: int, world: int) -> list[dict]:
    from dist_unlearn.config import config_from_dict, config_to_dict
    from dist_unlearn.engine.driver import run_job
    from dist_unlearn.engine.job import Job
    from dist_unlearn.engine.metrics_log import read_metrics

    cfg = config_to_dict(
        config_from_dict(
            {
                "model": {"path": path},
                "data": DATA,
                "method": {"names": ["npo_gd"]},
                "train": {"steps": steps, "forget_batch_size": batch, "retain_batch_size": batch, "lr": 1e-3},
                "deepspeed": {"zero_stage": 3},
                "ray": {"enabled": False, "num_workers": world},
                "checkpoint": {"every_steps": 0},
                "eval": {"max_examples": 4},
                "output": {"dir": str(out), "save_dtype": "fp32", "tensorboard": False},
            }
        )
    )
    run_job(Job(cfg, "unlearn", "npo_gd", path, str(out / "npo_gd")))
    return read_metrics(out / "npo_gd")


def trainer_run(path: str, out: Path, steps: int, batch: int, world: int) -> tuple[list[dict], list[float]]:
    import deepspeed

    from dist_unlearn.data import QADataset, generate_facts
    from dist_unlearn.engine.ds_config import build_deepspeed_config
    from dist_unlearn.integrations.hf import UnlearningTrainer

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch // world,
        max_steps=steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        deepspeed=build_deepspeed_config(zero_stage=3, micro_batch_size=batch // world, world_size=world, lr=1e-3),
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    deepspeed.init_distributed(dist_backend="gloo")
    tok = AutoTokenizer.from_pretrained(path)
    facts = generate_facts(**DATA, seed=0)
    timer = StepTimer()
    trainer = UnlearningTrainer(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args,
        forget_dataset=QADataset(facts.split("forget"), tok, 64),
        retain_dataset=QADataset(facts.split("retain"), tok, 64),
        objective="npo_gd",
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    # TrainingArguments(deepspeed=ZeRO-3) makes every later from_pretrained in this process load under
    # zero.Init (partitioned); the CLI's next run loads plain models
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return [row for row in trainer.state.log_history if "unlearn_loss" in row], timer.times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="global forget (and retain) rows per step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--root", default="runs/bench_hf")
    parser.add_argument("--out", default="runs/bench_hf/bench_hf.json")
    args = parser.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    root = Path(args.root).resolve()
    results = {}
    for size in args.sizes.split(","):
        path = model_dir(root, size)
        cli_times, hf_times = [], []
        for repeat in range(args.repeats):
            cli = cli_run(path, root / f"cli-{size}-{repeat}", args.steps, args.batch, world)
            hf, times = trainer_run(path, root / f"hf-{size}-{repeat}", args.steps, args.batch, world)
            for a, b in zip(cli, hf, strict=True):  # the same job: the same losses
                assert abs(a["loss"] - b["unlearn_loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
            cli_times += [row["step_seconds"] for row in cli[args.warmup :]]
            hf_times += times[args.warmup :]
        cli_med, hf_med = statistics.median(cli_times), statistics.median(hf_times)
        results[size] = {"cli_s": cli_med, "trainer_s": hf_med, "ratio": hf_med / cli_med, "steps": len(cli_times)}
        if rank == 0:
            print(
                f"{size}: CLI {cli_med * 1e3:.1f} ms/step, Trainer {hf_med * 1e3:.1f} ms/step, "
                f"ratio {hf_med / cli_med:.3f} ({len(cli_times)} steps each)",
                flush=True,
            )
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"world_size": world, "batch": args.batch, "results": results}, indent=1))


if __name__ == "__main__":
    main()
