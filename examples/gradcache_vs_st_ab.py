"""Step times of GradCache + InfoNCE vs sentence-transformers' ``CachedMultipleNegativesRankingLoss``, streamed.

The same two steps as part (c) of ``dist-unlearn bench contrastive`` (:class:`dist_unlearn.bench.steps.Stepper`
``gradcache`` and ``st``: the packaged all-MiniLM-L6-v2, one batch of queries and passages, AdamW step included),
in one process, in ABBA order (ours, st, st, ours, ...), each step's seconds printed as a JSON line as soon as it
is measured, so that a run on a slow, shared machine gives usable pairs even if it is cut short. No peak-memory
measurement (use the bench for that). GradCache is Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup".

    OMP_NUM_THREADS=1 python examples/gradcache_vs_st_ab.py --batch 256 --chunk 32 --pairs 8 --texts varied

The last line is the summary: median step time of each side and the median of the per-pair ratios
``st / ours`` (the throughput of ours relative to theirs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256, help="queries (= passages) per step")
    parser.add_argument("--chunk", type=int, default=32, help="GradCache chunk = the ST loss's mini_batch_size")
    parser.add_argument("--pairs", type=int, default=8, help="timed (ours, st) pairs")
    parser.add_argument("--texts", default="varied", choices=["facts", "varied"])
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    import torch

    from dist_unlearn.bench.steps import Stepper, load_encoder, load_st_model, load_tokenizer, make_batch, timed_step

    model, _ = load_encoder("embedded")
    steppers = {
        "ours": Stepper("gradcache", model, args.chunk),
        "st": Stepper("st", load_st_model("embedded", "cpu"), args.chunk),
    }
    queries, docs = make_batch(load_tokenizer(), args.batch, args.max_length, "cpu", args.texts)
    shapes = {"queries": list(queries["input_ids"].shape), "passages": list(docs["input_ids"].shape)}
    print(json.dumps({"shapes": shapes, "torch_threads": torch.get_num_threads()}), flush=True)
    times: dict[str, list[float]] = {"ours": [], "st": []}
    for pair in range(args.pairs):
        for name in ("ours", "st") if pair % 2 == 0 else ("st", "ours"):
            seconds = timed_step(steppers[name], queries, docs, "cpu")
            times[name].append(seconds)
            print(json.dumps({"pair": pair, "method": name, "s": round(seconds, 3), "at": time.strftime("%X")}))
    ratios = [st / ours for ours, st in zip(times["ours"], times["st"], strict=True)]
    summary = {name: round(statistics.median(ts), 3) for name, ts in times.items()}
    print(json.dumps({"median_s": summary, "median_throughput_ours_over_st": round(statistics.median(ratios), 3)}))


if __name__ == "__main__":
    main()
