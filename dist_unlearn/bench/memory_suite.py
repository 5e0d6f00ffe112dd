"""``dist-unlearn bench memory``: peak memory of the LM loss, of a training step, of reference models and of evaluation.

Parts (``--parts loss,step,reference``), every point measured in a fresh process
(:mod:`dist_unlearn.bench.worker`, probe :class:`~dist_unlearn.bench.memory.PeakProbe`: RSS high-water
mark above the baseline on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA):

loss
    the mean token NLL over ``--tokens`` hidden states ``[n, H]`` through an ``nn.Linear(H, V)`` head and
    its backward, ``plain`` (full logits) vs ``chunked`` (:func:`dist_unlearn.models.chunked_lm.token_values`)
    for each vocabulary in ``--vocabs`` (:func:`dist_unlearn.bench.lm_memory.measure_lm_loss`);
    ``chunked_over_plain`` is the ratio of the peaks (aim: ≤ 1/8 at vocab 128k).
step
    one GradDiff step + AdamW update, ``fp32`` (all weights) vs ``nf4-lora`` (NF4 base + LoRA ``r``), on
    each model of ``--models``: ``quickstart`` (the embedded Llama of ``configs/quickstart/unlearn.yaml``:
    its prepared target if it exists under ``output.dir``, else a model of the same shape built for the
    bench) and ``llama-1024x8`` (random init, hidden 1024, 8 layers, vocab 32k, where weights dominate)
    (:func:`dist_unlearn.bench.lm_memory.measure_train_step`).
reference
    what each ``method.reference`` strategy adds on top of the training model, per rank, on the same
    models (:func:`dist_unlearn.bench.reference_memory.measure_reference`).
eval
    evaluation of each model on ``--eval-ranks`` ranks (fresh processes, one process group): ``full`` (a
    whole fp32 copy per rank) vs ``sharded`` (``--eval-dtype``, ZeRO-3-partitioned, as
    ``dist-unlearn eval`` loads models), the suite on ``--eval-examples`` QA pairs per split with greedy
    answers of ``--eval-new-tokens`` tokens (:func:`dist_unlearn.bench.eval_memory.measure_eval`);
    ``sharded_over_full`` is the ratio of the largest per-rank peaks and ``sharded_over_fp32_weights``
    the largest sharded per-rank peak over the model's fp32 weights (aim: < 0.6 on 2 ranks). With
    ``--eval-relearn-steps N`` (default 2; 0 = none) also the ``relearn`` attack's memory, ``relearn_full``
    (a whole fp32 copy fine-tuned per rank) vs ``relearn_sharded`` (a ZeRO-3 engine in ``--eval-dtype``):
    N steps on half the forget split, then the suite (``relearn_sharded_over_full``).

On the CPU the measuring processes run with glibc's mmap threshold fixed (``--malloc-mmap-threshold``,
default 64 KiB; see :func:`~dist_unlearn.bench.memory.malloc_env`) so that freed blocks leave the RSS;
``--malloc-mmap-threshold 0`` measures with glibc's default instead. The JSON is rewritten (temp file,
then rename) after every part.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dist_unlearn.bench.contrastive import machine_info, write_json

PARTS = ("loss", "step", "reference", "eval")
MODELS = ("quickstart", "llama-1024x8", "tiny")
HEADS = ("trainable", "frozen")
BIG_LLAMA = {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "vocab_size": 32000}
TINY_LLAMA = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 0}
"""``tiny``: a smoke-test model (seconds per point); vocabulary 0 = the quickstart tokenizer's."""
QUICKSTART_CONFIG = "configs/quickstart/unlearn.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench memory`` options."""
    parser.add_argument("--out", default="bench-memory.json", help="JSON output path")
    parser.add_argument(
        "--parts", default="loss,step,reference,eval", help="comma-separated subset of loss,step,reference,eval"
    )
    parser.add_argument("--tokens", type=int, default=2048, help="loss part: scored tokens n")
    parser.add_argument("--hidden", type=int, default=1024, help="loss part: hidden size H")
    parser.add_argument("--vocabs", default="32000,128256", help="loss part: vocabulary sizes")
    parser.add_argument("--heads", default="trainable,frozen", help="loss part: output head trainable and/or frozen")
    parser.add_argument("--models", default="quickstart,llama-1024x8", help=f"step/reference parts: of {MODELS}")
    parser.add_argument("--config", default=QUICKSTART_CONFIG, help="run config giving the data and model shape")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank of the nf4 runs")
    parser.add_argument("--modes", default="none,cached,adapter_disabled,sharded,quantized", help="reference part")
    parser.add_argument("--eval-ranks", type=int, default=2, help="eval part: ranks (processes)")
    parser.add_argument("--eval-dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="eval part: dtype")
    parser.add_argument("--eval-examples", type=int, default=4, help="eval part: QA pairs per split")
    parser.add_argument("--eval-new-tokens", type=int, default=8, help="eval part: greedy tokens (0 = none)")
    parser.add_argument(
        "--eval-relearn-steps", type=int, default=2, help="eval part: relearn attack steps measured (0 = none)"
    )
    parser.add_argument("--work-dir", default=None, help="where bench models are saved (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per measuring subprocess")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=65536,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the measuring processes (0 = glibc's dynamic default)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _names(text: str | list[str], allowed: tuple[str, ...], option: str) -> list[str]:
    values = text if isinstance(text, list) else [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(values) - set(allowed))
    if unknown or not values:
        raise ValueError(f"{option} must be a comma-separated subset of {','.join(allowed)}, got {unknown or 'none'}")
    return values


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Parse and check the lists (one message naming the option and the fix) before any work starts."""
    from dist_unlearn.unlearning.reference import REFERENCE_MODES

    args.parts = _names(args.parts, PARTS, "--parts")
    args.models = _names(args.models, MODELS, "--models")
    args.modes = _names(args.modes, REFERENCE_MODES, "--modes")
    args.heads = _names(args.heads, HEADS, "--heads")
    try:
        args.vocabs = args.vocabs if isinstance(args.vocabs, list) else [int(v) for v in args.vocabs.split(",")]
    except ValueError as exc:
        raise ValueError(f"--vocabs must be comma-separated integers, e.g. 32000,128256; got {args.vocabs!r}") from exc
    for option, value in (
        ("--tokens", args.tokens),
        ("--hidden", args.hidden),
        ("--lora-r", args.lora_r),
        ("--eval-ranks", args.eval_ranks),
        ("--eval-examples", args.eval_examples),
    ):
        if value <= 0:
            raise ValueError(f"{option} must be a positive integer, got {value}")
    if not args.vocabs or min(args.vocabs) <= 1:
        raise ValueError(f"--vocabs needs sizes > 1, got {args.vocabs}")
    if {"step", "reference", "eval"} & set(args.parts) and not Path(args.config).is_file():
        raise ValueError(f"--config {args.config} not found; pass the quickstart config path (run from the repo root)")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def _measure(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from dist_unlearn.bench.memory import malloc_env, run_worker

    return run_worker({**spec, "device": args.device}, args.timeout, malloc_env(args.malloc_mmap_threshold))


def _ratio(top: dict[str, Any], bottom: dict[str, Any]) -> float | None:
    key = "peak_increase_mib"
    if key not in top or key not in bottom or bottom[key] <= 0:
        return None
    return round(top[key] / bottom[key], 4)


def part_loss(args: argparse.Namespace, _models: dict[str, Any]) -> list[dict[str, Any]]:
    """Plain vs chunked LM loss peak for each vocabulary."""
    rows = []
    for head in args.heads:
        for vocab in args.vocabs:
            row: dict[str, Any] = {"tokens": args.tokens, "hidden": args.hidden, "vocab": vocab, "head": head}
            for method in ("plain", "chunked"):
                spec = {"kind": "lm_loss", "method": method, "tokens": args.tokens, "hidden": args.hidden}
                row[method] = _measure({**spec, "vocab": vocab, "head": head}, args)
            row["chunked_over_plain"] = _ratio(row["chunked"], row["plain"])
            rows.append(row)
    return rows


def _model_spec(model: dict[str, Any]) -> dict[str, Any]:
    return {k: model[k] for k in ("model_dir", "facts", "max_length", "forget_batch", "retain_batch")}


def part_step(args: argparse.Namespace, models: dict[str, Any]) -> list[dict[str, Any]]:
    """fp32 vs nf4 + LoRA training-step memory for each model."""
    rows = []
    for name, model in models.items():
        row: dict[str, Any] = {"model": name, "shape": model["shape"], "objective": "grad_diff", "lora_r": args.lora_r}
        for precision in ("fp32", "nf4-lora"):
            spec = {"kind": "train_step", "precision": precision, "lora_r": args.lora_r, **_model_spec(model)}
            row[precision] = _measure(spec, args)
        row["nf4_lora_over_fp32_total"] = _ratio(
            {"peak_increase_mib": row["nf4-lora"].get("total_mib", 0)},
            {"peak_increase_mib": row["fp32"].get("total_mib", 0)},
        )
        rows.append(row)
    return rows


def part_reference(args: argparse.Namespace, models: dict[str, Any]) -> list[dict[str, Any]]:
    """Memory each reference strategy adds (built, then one forget-batch query) for each model."""
    rows = []
    for name, model in models.items():
        row: dict[str, Any] = {"model": name, "shape": model["shape"], "lora_r": args.lora_r}
        for mode in args.modes:
            spec = {"kind": "reference", "mode": mode, "lora_r": args.lora_r, **_model_spec(model)}
            row[mode] = _measure(spec, args)
        rows.append(row)
    return rows


def part_eval(args: argparse.Namespace, models: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-rank memory of evaluating each model on ``--eval-ranks`` ranks, whole fp32 vs sharded."""
    from dist_unlearn.bench.memory import malloc_env, run_ranks

    rows = []
    for name, model in models.items():
        row: dict[str, Any] = {"model": name, "shape": model["shape"], "world_size": args.eval_ranks}
        row |= {"dtype": args.eval_dtype, "examples_per_split": args.eval_examples}
        row["new_tokens"] = args.eval_new_tokens
        spec = {"kind": "eval", "device": args.device, "dtype": args.eval_dtype, **_model_spec(model)}
        spec |= {"max_examples": args.eval_examples, "generate": args.eval_new_tokens > 0}
        spec |= {"max_new_tokens": max(1, args.eval_new_tokens), "batch_size": 4}
        for prefix, steps in (("", 0), ("relearn_", args.eval_relearn_steps)):
            if prefix and steps <= 0:
                continue
            for mode in ("full", "sharded"):
                row[prefix + mode] = run_ranks(
                    {**spec, "mode": mode, "relearn_steps": steps},
                    args.eval_ranks,
                    args.timeout,
                    malloc_env(args.malloc_mmap_threshold),
                )
            peaks = {mode: [r.get("peak_increase_mib") for r in row[prefix + mode]] for mode in ("full", "sharded")}
            complete = all(v is not None for values in peaks.values() for v in values)
            row[f"{prefix}sharded_over_full"] = (
                round(max(peaks["sharded"]) / max(peaks["full"]), 4) if complete else None
            )
            if not prefix:
                fp32_weights = row["full"][0].get("weights_mib") if complete else None
                row["fp32_weights_mib"] = fp32_weights
                row["sharded_over_fp32_weights"] = (
                    round(max(peaks["sharded"]) / fp32_weights, 4) if fp32_weights else None
                )
        row["relearn_steps"] = args.eval_relearn_steps
        rows.append(row)
    return rows


PART_FUNCTIONS = {"loss": ("lm_loss_memory", part_loss), "step": ("train_step_memory", part_step)}
PART_FUNCTIONS["reference"] = ("reference_memory", part_reference)
PART_FUNCTIONS["eval"] = ("eval_memory", part_eval)


def prepare_models(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Save each model of ``--models`` (with the quickstart tokenizer) under ``work_dir``; describe them."""
    from dist_unlearn.config import load_config
    from dist_unlearn.engine.prepare import embedded_dir, load_benchmark
    from dist_unlearn.models.tiny_llama import build_embedded_model, build_tiny_llama

    cfg = load_config(args.config, [])
    facts_args = {
        "num_people": cfg.data.num_people,
        "questions_per_person": cfg.data.questions_per_person,
        "forget_fraction": cfg.data.forget_fraction,
        "holdout_fraction": cfg.data.holdout_fraction,
        "seed": cfg.data.seed,
    }
    p = cfg.prepare
    shape = {"hidden_size": p.hidden_size, "num_layers": p.num_layers, "num_heads": p.num_heads}
    model, tokenizer = build_embedded_model(
        load_benchmark(cfg.data).corpus(), p.vocab_size, p.hidden_size, p.num_layers, p.num_heads, cfg.train.seed
    )
    base = {
        "facts": facts_args,
        "max_length": cfg.data.max_length,
        "forget_batch": cfg.train.forget_batch_size,
        "retain_batch": cfg.train.retain_batch_size,
    }
    out: dict[str, Any] = {}
    for name in args.models:
        target = work_dir / name
        if name == "quickstart":
            prepared = embedded_dir(cfg) / "target"
            if (prepared / "config.json").is_file():
                out[name] = {**base, "model_dir": str(prepared), "source": "prepared target"}
                out[name]["shape"] = {**shape, "vocab_size": len(tokenizer)}
                continue
            net, source, model_shape = model, "untrained, same shape as the prepared target", {**shape}
            model_shape["vocab_size"] = len(tokenizer)
        else:
            model_shape = dict(BIG_LLAMA if name == "llama-1024x8" else TINY_LLAMA)
            net = build_tiny_llama(
                vocab_size=model_shape["vocab_size"] or len(tokenizer),
                hidden_size=model_shape["hidden_size"],
                num_layers=model_shape["num_layers"],
                num_heads=model_shape["num_heads"],
                seed=cfg.train.seed,
            )
            model_shape["vocab_size"] = model_shape["vocab_size"] or len(tokenizer)
            source = "random init"
        net.save_pretrained(target)
        tokenizer.save_pretrained(target)
        model_shape["parameters"] = sum(p.numel() for p in net.parameters())
        out[name] = {**base, "model_dir": str(target), "source": source, "shape": model_shape}
    return out


def _mib(entry: dict[str, Any], key: str = "peak_increase_mib") -> str:
    if key in entry:
        return f"{entry[key]:.0f} MiB"
    return "error" if "error" in entry else "-"


def table(results: dict[str, Any]) -> str:
    """A short plain-text summary of ``results``."""
    lines = []
    for row in results.get("lm_loss_memory", []):
        lines.append(
            f"LM loss n={row['tokens']} H={row['hidden']} V={row['vocab']} head {row['head']}: "
            f"plain {_mib(row['plain'])}  "
            f"chunked {_mib(row['chunked'])}  chunked/plain {row['chunked_over_plain']}"
        )
    for row in results.get("train_step_memory", []):
        for precision in ("fp32", "nf4-lora"):
            entry = row[precision]
            lines.append(
                f"step {row['model']:<13} {precision:<9} model {_mib(entry, 'model_mib'):>9}  "
                f"step peak {_mib(entry):>9}  total {_mib(entry, 'total_mib'):>9}"
            )
    for row in results.get("reference_memory", []):
        cells = "  ".join(f"{mode} {_mib(row[mode], 'reference_mib')}" for mode in PART_MODES if mode in row)
        lines.append(f"reference {row['model']}: {cells}")
    for row in results.get("eval_memory", []):
        cells = "  ".join(f"{mode} peak/rank " + "/".join(_mib(r) for r in row[mode]) for mode in ("full", "sharded"))
        lines.append(
            f"eval {row['model']} on {row['world_size']} ranks (full fp32 vs sharded {row['dtype']}): {cells}  "
            f"sharded/full {row['sharded_over_full']}  sharded/fp32 weights {row['sharded_over_fp32_weights']}"
        )
        if "relearn_full" in row:
            cells = "  ".join(
                f"{mode} peak/rank " + "/".join(_mib(r) for r in row[f"relearn_{mode}"]) for mode in ("full", "sharded")
            )
            lines.append(
                f"relearn {row['relearn_steps']} steps + eval {row['model']}: {cells}  "
                f"sharded/full {row['relearn_sharded_over_full']}"
            )
    return "\n".join(lines)


PART_MODES = ("none", "cached", "adapter_disabled", "sharded", "quantized")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected parts (``args`` from :func:`resolve`), rewriting ``args.out`` after each."""
    results: dict[str, Any] = {"machine": machine_info(args.device)}
    results["malloc_mmap_threshold"] = args.malloc_mmap_threshold or "glibc default (dynamic)"
    own_dir = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="bench-memory-")) if own_dir else Path(args.work_dir)
    try:
        models = prepare_models(args, work_dir) if {"step", "reference", "eval"} & set(args.parts) else {}
        results["models"] = {name: {k: v for k, v in m.items() if k != "model_dir"} for name, m in models.items()}
        for part in args.parts:
            key, function = PART_FUNCTIONS[part]
            print(f"bench memory: part {part} ({key}) ...", flush=True)
            results[key] = function(args, models)
            write_json(args.out, results)
    finally:
        if own_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(table(results))
    print(f"results: {Path(args.out).resolve()}")
    return results
