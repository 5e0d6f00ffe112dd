"""``dist-unlearn bench contrastive``: what gradient caching and the tiled loss cost and save, measured.

Parts (``--parts a,b,c,d``), all in one run so that every ratio compares runs made side by side:

a. **GradCache overhead** (``gradcache_overhead``): one encoder, one batch of ``B`` queries + ``B``
   passages; a plain step (encode all, InfoNCE, backward, AdamW) vs a GradCache step (``chunk`` rows per
   forward), interleaved, median seconds; ``gradcache_over_plain`` (floor about 4/3: one extra forward).
b. **Peak memory vs global batch** (``memory_vs_batch``): a small random BERT (:data:`~.steps.TINY_BERT`)
   at a fixed chunk, batch 64, 128, ...; GradCache vs plain (plain skipped where its extrapolated peak
   exceeds ``--mem-cap-gib``); each point in a fresh process (:mod:`dist_unlearn.bench.worker`).
c. **sentence-transformers** (``sentence_transformers``): the same model, batch and chunk through
   ``CachedMultipleNegativesRankingLoss`` (scale ``1/tau = 20``) vs our GradCache + InfoNCE: interleaved
   step times and, in fresh processes, peak memory; ratios are ours / theirs.
d. **Tiled vs full InfoNCE loss memory** (``tiled_loss_memory``): random normalised float32 embeddings
   ``[B, dim]``; the loss forward + backward alone, one fresh process per point; full-matrix points whose
   estimated peak exceeds ``--mem-cap-gib`` are skipped with a note.

Memory is the peak resident set size above the process's baseline on the CPU and
``torch.cuda.max_memory_allocated`` above the baseline on CUDA (see :mod:`dist_unlearn.bench.memory`).
``--device cuda`` runs every part on the current GPU (choose it with ``CUDA_VISIBLE_DEVICES``; timed steps
synchronise it before and after); ``--bf16`` runs parts a-c's encoder forwards under bfloat16 autocast
(:class:`~dist_unlearn.bench.steps.Stepper`).
The JSON is rewritten (temp file, then rename) after every part.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from dist_unlearn.io import write_json_atomic

PARTS = ("a", "b", "c", "d")
GIB = 1024**3
FULL_LOSS_MATRICES = 3.5
"""Peak of the full InfoNCE forward + backward in ``B x B`` float32 matrices (measured about 3.1 on CPU)."""

# mode -> option -> default; the options left at None on the command line take these.
DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {
        "batch": 128,
        "chunk": 32,
        "repeats": 5,
        "mem_batches": "64,128,256,512,1024,2048,4096",
        "loss_sizes": "16384,32768,65536",
    },
    "quick": {"batch": 64, "chunk": 16, "repeats": 2, "mem_batches": "64,128,256", "loss_sizes": "2048,4096,8192"},
}


# --- options ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench contrastive`` options (defaults by mode in :data:`DEFAULTS`)."""
    parser.add_argument("--out", default="bench-contrastive.json", help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run in a few minutes")
    parser.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--model", default="embedded", help="encoder for parts a and c (embedded = MiniLM-L6)")
    parser.add_argument("--batch", type=int, help="queries (= passages) per step, parts a and c")
    parser.add_argument("--chunk", type=int, help="GradCache chunk / ST mini_batch_size, parts a and c")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per text")
    parser.add_argument(
        "--texts",
        default="facts",
        choices=["facts", "varied"],
        help="parts a and c: fictitious-facts pairs (near-equal lengths) or varied (queries 8-30 words, "
        "passages 15-60 words; use --max-length 128)",
    )
    parser.add_argument("--repeats", type=int, help="timed steps per method (after one warm-up)")
    parser.add_argument("--mem-batches", help="part b batches, e.g. 64,128,256")
    parser.add_argument("--mem-chunk", type=int, default=32, help="part b GradCache chunk")
    parser.add_argument("--loss-sizes", help="part d batches, e.g. 16384,32768")
    parser.add_argument("--loss-dim", type=int, default=384, help="part d embedding size")
    parser.add_argument("--tile-size", type=int, default=1024, help="part d TiledInfoNCELoss tile size")
    parser.add_argument("--mem-cap-gib", type=float, default=14.0, help="skip points estimated above this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measuring subprocess")
    parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda if available; pick a GPU with CUDA_VISIBLE_DEVICES)"
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="parts a-c: the encoder's forwards under torch.autocast(bfloat16), float32 weights and gradients "
        "(part d stays float32)",
    )


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the mode-dependent defaults, parse the size lists and check ``--parts``."""
    defaults = DEFAULTS["quick" if args.quick else "full"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mem_batches = _ints(args.mem_batches, "--mem-batches")
    args.loss_sizes = _ints(args.loss_sizes, "--loss-sizes")
    if isinstance(args.parts, str):
        args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        raise ValueError(f"--parts must be a comma-separated subset of {','.join(PARTS)}, got {unknown or 'none'}")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        # timing syncs and the peak probes use the current CUDA device: choose it with CUDA_VISIBLE_DEVICES
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}; pick a GPU with CUDA_VISIBLE_DEVICES")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu"
        )
    return args


def autocast_dtype(args: argparse.Namespace) -> Any:
    """``torch.bfloat16`` with ``--bf16``, else None (float32 throughout)."""
    import torch

    return torch.bfloat16 if args.bf16 else None


def _ints(text: str | list[int], option: str) -> list[int]:
    if isinstance(text, list):
        return text
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from exc
    if not values or min(values) <= 0:
        raise ValueError(f"{option} needs positive integers, got {text!r}")
    return values


# --- machine ------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            kib = int(handle.readline().split()[1])  # MemTotal
    except (OSError, ValueError, IndexError):
        return None
    return round(kib / 1024**2, 2)


def machine_info(device: str) -> dict[str, Any]:
    """CPU count, RAM, library versions and the device the benchmark ran on."""
    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "sentence_transformers": _version("sentence-transformers"),
        "device": device,
        "device_name": name,
    }


# --- parts --------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def part_a(args: argparse.Namespace) -> dict[str, Any]:
    """GradCache vs plain step time on the same encoder and batch (in this process, interleaved)."""
    from dist_unlearn.bench.steps import (
        GRADCACHE_OPTIONS,
        Stepper,
        interleaved_times,
        load_encoder,
        load_tokenizer,
        make_batch,
    )

    model, info = load_encoder(args.model)
    model.to(args.device)
    queries, docs = make_batch(load_tokenizer(), args.batch, args.max_length, args.device, args.texts)
    steppers = {name: Stepper(name, model, args.chunk, autocast_dtype(args)) for name in ("plain", "gradcache")}
    times = interleaved_times(steppers, queries, docs, args.repeats, args.device)
    plain, cached = _median(times["plain"]), _median(times["gradcache"])
    return {
        "model": info,
        "batch": args.batch,
        "chunk": args.chunk,
        "max_length": args.max_length,
        "texts": args.texts,
        "autocast": "bfloat16" if args.bf16 else None,
        "gradcache_options": GRADCACHE_OPTIONS,
        "repeats": args.repeats,
        "step": "zero_grad + forward + InfoNCE(tau=0.05) + backward + AdamW step",
        "plain_s": plain,
        "gradcache_s": cached,
        "gradcache_over_plain": round(cached / plain, 3),
        "floor": round(4 / 3, 3),
        "times_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
    }


def _step_spec(args: argparse.Namespace, method: str, model: str, batch: int, chunk: int) -> dict[str, Any]:
    return {
        "kind": "step",
        "method": method,
        "model": model,
        "batch": batch,
        "chunk": chunk,
        "max_length": args.max_length,
        "texts": args.texts,
        "device": args.device,
        "bf16": args.bf16,
    }


def _measure(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from dist_unlearn.bench.memory import run_worker

    return run_worker(spec, args.timeout)


def _plain_estimate_mib(previous: dict[str, Any] | None, batch: int) -> float | None:
    """Plain-step peak at ``batch`` extrapolated linearly from the last measured point (None without one)."""
    if previous is None or "peak_increase_mib" not in previous:
        return None
    return previous["peak_increase_mib"] * batch / previous["batch"]


def part_b(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak memory vs batch for the tiny BERT, GradCache and plain, one fresh process per point."""
    from dist_unlearn.bench.steps import TINY_BERT, load_tokenizer, tiny_bert_config

    model = {"name": TINY_BERT, "init": "random", **tiny_bert_config(load_tokenizer().vocab_size)}
    rows, last_plain = [], None
    cap_mib = args.mem_cap_gib * 1024
    for batch in args.mem_batches:
        row: dict[str, Any] = {"batch": batch, "chunk": args.mem_chunk, "model": model}
        row["gradcache"] = _measure(_step_spec(args, "gradcache", TINY_BERT, batch, args.mem_chunk), args)
        estimate = _plain_estimate_mib(last_plain, batch)
        if estimate is not None and estimate > cap_mib:
            row["plain"] = {"skipped": f"estimated {estimate:.0f} MiB > cap {cap_mib:.0f} MiB"}
        else:
            row["plain"] = _measure(_step_spec(args, "plain", TINY_BERT, batch, args.mem_chunk), args)
            last_plain = {**row["plain"], "batch": batch}
        row["plain_over_gradcache"] = _ratio(row["plain"], row["gradcache"])
        rows.append(row)
    return rows


def _ratio(top: dict[str, Any], bottom: dict[str, Any], key: str = "peak_increase_mib") -> float | None:
    if key not in top or key not in bottom or bottom[key] <= 0:
        return None
    return round(top[key] / bottom[key], 3)


def part_c(args: argparse.Namespace) -> dict[str, Any]:
    """Our GradCache + InfoNCE vs sentence-transformers' CachedMultipleNegativesRankingLoss."""
    from dist_unlearn.bench.steps import (
        GRADCACHE_OPTIONS,
        TEMPERATURE,
        Stepper,
        interleaved_times,
        load_encoder,
        load_st_model,
        load_tokenizer,
        make_batch,
    )

    ours_model, info = load_encoder(args.model)
    steppers = {
        "ours": Stepper("gradcache", ours_model.to(args.device), args.chunk, autocast_dtype(args)),
        "st": Stepper("st", load_st_model(args.model, args.device), args.chunk, autocast_dtype(args)),
    }
    queries, docs = make_batch(load_tokenizer(), args.batch, args.max_length, args.device, args.texts)
    times = interleaved_times(steppers, queries, docs, args.repeats, args.device)
    del steppers, ours_model
    memory = {
        "ours": _measure(_step_spec(args, "gradcache", args.model, args.batch, args.chunk), args),
        "st": _measure(_step_spec(args, "st", args.model, args.batch, args.chunk), args),
    }
    ours_s, st_s = _median(times["ours"]), _median(times["st"])
    return {
        "model": info,
        "batch": args.batch,
        "chunk": args.chunk,
        "max_length": args.max_length,
        "texts": args.texts,
        "autocast": "bfloat16" if args.bf16 else None,
        "gradcache_options": GRADCACHE_OPTIONS,
        "repeats": args.repeats,
        "temperature": TEMPERATURE,
        "st_scale": 1 / TEMPERATURE,
        "st_loss": "CachedMultipleNegativesRankingLoss(mini_batch_size=chunk), called directly + backward",
        "ours_s": ours_s,
        "st_s": st_s,
        "throughput_ours_over_st": round(st_s / ours_s, 3),
        "memory": memory,
        "peak_memory_ours_over_st": _ratio(memory["ours"], memory["st"]),
        "times_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
    }


def _loss_spec(args: argparse.Namespace, loss: str, batch: int) -> dict[str, Any]:
    return {
        "kind": "loss",
        "loss": loss,
        "batch": batch,
        "dim": args.loss_dim,
        "tile_size": args.tile_size,
        "device": args.device,
    }


def part_d(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak memory of the full vs tiled InfoNCE forward + backward, one fresh process per point."""
    rows = []
    cap_mib = args.mem_cap_gib * 1024
    for batch in args.loss_sizes:
        row: dict[str, Any] = {"batch": batch, "dim": args.loss_dim, "tile_size": args.tile_size}
        estimate = FULL_LOSS_MATRICES * batch * batch * 4 / 1024**2
        if estimate > cap_mib:
            row["full"] = {"skipped": f"estimated {estimate:.0f} MiB (~{FULL_LOSS_MATRICES} BxB fp32) > cap"}
        else:
            row["full"] = _measure(_loss_spec(args, "full", batch), args)
        row["tiled"] = _measure(_loss_spec(args, "tiled", batch), args)
        row["tiled_over_full"] = _ratio(row["tiled"], row["full"])
        rows.append(row)
    return rows


PART_FUNCTIONS: dict[str, tuple[str, Callable[[argparse.Namespace], Any]]] = {
    "a": ("gradcache_overhead", part_a),
    "b": ("memory_vs_batch", part_b),
    "c": ("sentence_transformers", part_c),
    "d": ("tiled_loss_memory", part_d),
}


# --- output -------------------------------------------------------------------------------------


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (``path.tmp``, then rename)."""
    write_json_atomic(path, data)


def _mib(entry: dict[str, Any]) -> str:
    if "peak_increase_mib" in entry:
        return f"{entry['peak_increase_mib']:.0f} MiB"
    return "skipped" if "skipped" in entry else "error"


def table(results: dict[str, Any]) -> str:
    """A short plain-text summary of ``results``."""
    lines = []
    if "gradcache_overhead" in results:
        a = results["gradcache_overhead"]
        lines.append(
            f"(a) GradCache overhead, {a['model']['name']}, batch {a['batch']}+{a['batch']}, chunk {a['chunk']}"
        )
        lines.append(
            f"    plain {a['plain_s']:.3f} s  gradcache {a['gradcache_s']:.3f} s  ratio {a['gradcache_over_plain']}"
        )
    if "memory_vs_batch" in results:
        lines.append("(b) peak memory vs batch (tiny-bert)   batch  gradcache     plain")
        for row in results["memory_vs_batch"]:
            lines.append(f"{'':39}{row['batch']:>6}  {_mib(row['gradcache']):>9}  {_mib(row['plain']):>9}")
    if "sentence_transformers" in results:
        c = results["sentence_transformers"]
        lines.append(
            f"(c) vs sentence-transformers cached MNRL, batch {c['batch']}, chunk {c['chunk']}, "
            f"texts {c.get('texts', 'facts')}, max length {c['max_length']}"
        )
        lines.append(
            f"    ours {c['ours_s']:.3f} s  st {c['st_s']:.3f} s  throughput ours/st {c['throughput_ours_over_st']}"
        )
        mem = c["memory"]
        lines.append(f"    peak ours {_mib(mem['ours'])}  st {_mib(mem['st'])}  ratio {c['peak_memory_ours_over_st']}")
    if "tiled_loss_memory" in results:
        lines.append("(d) InfoNCE loss memory                batch       full     tiled")
        for row in results["tiled_loss_memory"]:
            lines.append(f"{'':39}{row['batch']:>6}  {_mib(row['full']):>9}  {_mib(row['tiled']):>9}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected parts (``args`` as returned by :func:`resolve`), rewriting ``args.out`` after each."""
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": machine_info(args.device)}
    for part in args.parts:
        key, function = PART_FUNCTIONS[part]
        print(f"bench contrastive: part {part} ({key}) ...", flush=True)
        results[key] = function(args)
        write_json(args.out, results)
    print(table(results))
    print(f"results: {Path(args.out).resolve()}")
    return results
