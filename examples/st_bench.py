"""Step time and peak memory of ``SentenceTransformerTrainer`` with dist-unlearn's ``GradCacheInfoNCELoss`` vs with
sentence-transformers' own ``CachedMultipleNegativesRankingLoss``, at the same batch and mini-batch.

    python examples/st_bench.py --batch 32 --mini-batch 8 --steps 6 --repeats 2

One process, CPU, the packaged all-MiniLM-L6-v2, (anchor, positive, hard negative) triplets. The two losses compute
the same function here (InfoNCE at temperature 0.05 = MNRL at scale 20, cosine scores, every positive and hard
negative of the batch as candidates): the first step's losses are printed side by side as a check. Each run is a
fresh subprocess (so its peak RSS is its own), alternating the two losses; the first step of each run (warm-up)
is left out of the step time. Prints a markdown table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

WORDS = [
    "river", "mountain", "city", "forest", "ocean", "desert", "island", "valley", "bridge", "castle", "garden",
    "market", "library", "station", "harbor", "village", "tower", "meadow", "canyon", "glacier", "volcano",
]  # fmt: skip


def triplets(rows: int) -> dict[str, list[str]]:
    """Deterministic made-up triplets: the positive paraphrases the anchor, the negative is about another place."""
    anchors, positives, negatives = [], [], []
    for i in range(rows):
        a, b = WORDS[i % len(WORDS)], WORDS[(7 * i + 3) % len(WORDS)]
        c = WORDS[(i + 11) % len(WORDS)]
        anchors.append(f"where is the {a} near the {b} number {i}")
        positives.append(f"the {b} has a {a} close to it, item {i}")
        negatives.append(f"the {c} is far from any {b}, item {i + 1}")
    return {"anchor": anchors, "positive": positives, "negative": negatives}


def run_one(loss_name: str, batch: int, mini_batch: int, steps: int) -> dict:
    """One Trainer run in this process; step times from a callback, peak RSS of this process."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from dist_unlearn.integrations.sentence_transformers import GradCacheInfoNCELoss
    from dist_unlearn.models.encoders import encoder_path

    torch.manual_seed(0)
    model = SentenceTransformer(encoder_path("embedded"), device="cpu")
    if loss_name == "ours":
        loss = GradCacheInfoNCELoss(model, mini_batch_size=mini_batch, temperature=0.05)
    else:
        loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=mini_batch)
    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = Args(
        output_dir="/tmp/st_bench",
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-5,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        log_level="error",
        seed=0,
    )
    data = Dataset.from_dict(triplets(batch * steps))
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss, callbacks=[Timer()])
    trainer.train()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": loss_name, "step_s": times, "losses": losses, "peak_rss_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32, help="anchors per step (each with a positive and a negative)")
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.child, args.batch, args.mini_batch, args.steps)))
        return
    runs = []
    for repeat in range(args.repeats):
        for name in ("ours", "cached_mnrl") if repeat % 2 == 0 else ("cached_mnrl", "ours"):
            cmd = [sys.executable, __file__, "--child", name, "--batch", str(args.batch)]
            cmd += ["--mini-batch", str(args.mini_batch), "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat} {name}: median step {statistics.median(runs[-1]['step_s'][1:]):.3f} s", flush=True)
    table = [
        "| loss | median step (s) | min step (s) | peak RSS (MiB) | first-step loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    summary = {}
    for name, label in (("ours", "GradCacheInfoNCELoss"), ("cached_mnrl", "CachedMultipleNegativesRankingLoss")):
        mine = [r for r in runs if r["loss"] == name]
        steps = [t for r in mine for t in r["step_s"][1:]]
        summary[name] = {
            "median_step_s": statistics.median(steps),
            "min_step_s": min(steps),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
            "first_loss": mine[0]["losses"][0],
        }
        s = summary[name]
        table.append(
            f"| {label} | {s['median_step_s']:.3f} | {s['min_step_s']:.3f} | {s['peak_rss_mib']:.0f} | "
            f"{s['first_loss']:.4f} |"
        )
    ratio = summary["ours"]["median_step_s"] / summary["cached_mnrl"]["median_step_s"]
    print("\n".join(table))
    print(f"step-time ratio ours / CachedMNRL: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "summary": summary, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
