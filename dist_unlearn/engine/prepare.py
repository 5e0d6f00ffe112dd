"""The embedded default: a fictitious-facts benchmark, a tokenizer trained on it, and two fine-tuned
tiny Llamas built from the same random initialisation:

* **target**: fine-tuned on forget + retain facts (the model to unlearn from);
* **oracle**: fine-tuned on retain facts only (what perfect unlearning would look like; forget-quality
  metrics compare against it).

Holdout facts are seen by neither, so they serve as non-members for membership-inference attacks
(TOFU's setup). Everything is cached under ``OUTPUT/embedded/`` keyed by a fingerprint of everything
the preparation reads (data and prepare settings, the seed), and written atomically (``.tmp`` then
rename). Preparation is single-process work: under a launched process group one rank does it alone
(:func:`dist_unlearn.engine.runner.prepared_assets`), so it runs no collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dist_unlearn.config.schema import EMBEDDED_MODEL, RunConfig
from dist_unlearn.data.benchmark import load_benchmark
from dist_unlearn.data.qa import QADataset, set_prompt_format
from dist_unlearn.engine.preemption import Preempted, stop_requested
from dist_unlearn.eval.answers import evaluate_splits
from dist_unlearn.io import move_into_place, staging_path
from dist_unlearn.models.encoders import encoder_path
from dist_unlearn.models.finetune import finetune
from dist_unlearn.models.tiny_llama import build_embedded_model


@dataclass(frozen=True)
class ModelAssets:
    """Where the model to unlearn (and, when known, the oracle) lives."""

    target_dir: str
    oracle_dir: str | None


def _prepare_inputs(cfg: RunConfig) -> dict[str, object]:
    """Every setting :func:`prepare_embedded` reads: its cache is valid exactly while these are equal."""
    data = asdict(cfg.data)
    for key, default in (("prompt_format", "auto"), ("chat_template", "")):
        if data[key] == default:  # the embedded tokenizer has no chat template: the default is the plain format
            del data[key]  # models were always prepared with, so caches from before these fields stay valid
    return {"data": data, "prepare": asdict(cfg.prepare), "seed": cfg.train.seed}


def _fingerprint(cfg: RunConfig) -> str:
    payload = json.dumps(_prepare_inputs(cfg), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def embedded_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output.dir) / "embedded"


def prepare_embedded(cfg: RunConfig, force: bool = False, log=print) -> ModelAssets:
    """Build (or reuse) the embedded target and oracle models for ``cfg``; returns their paths."""
    root = embedded_dir(cfg)
    fingerprint = _fingerprint(cfg)
    marker = root / "prepare.json"
    if not force and marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return ModelAssets(str(root / "target"), str(root / "oracle"))

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.time()
    facts = load_benchmark(cfg.data)
    p = cfg.prepare
    staging = staging_path(root)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    facts.to_jsonl(staging / "facts.jsonl")
    summary: dict[str, object] = {
        "fingerprint": fingerprint,
        "config": _prepare_inputs(cfg),
    }
    for name, splits in (("target", ("forget", "retain")), ("oracle", ("retain",))):
        model, tokenizer = build_embedded_model(
            facts.corpus(),
            vocab_size=p.vocab_size,
            hidden_size=p.hidden_size,
            num_layers=p.num_layers,
            num_heads=p.num_heads,
            seed=cfg.train.seed,
        )
        set_prompt_format(tokenizer, cfg.data.prompt_format, cfg.data.chat_template)  # as unlearning will see it
        items = [item for split in splits for item in facts.split(split)]
        train_set = QADataset(items, tokenizer, cfg.data.max_length)
        log(f"prepare: fine-tuning the {name} model on {'+'.join(splits)} ({len(items)} QA pairs, {p.steps} steps)")
        losses = finetune(
            model,
            train_set,
            tokenizer.pad_token_id,
            p.steps,
            p.batch_size,
            p.lr,
            seed=cfg.train.seed,
            desc=f"prepare {name}",
            on_step=_stop_when_asked(cfg.output.dir, f"preparing the {name} model"),
        )
        evals = evaluate_splits(
            model,
            {s: QADataset(facts.split(s), tokenizer, cfg.data.max_length) for s in ("forget", "retain", "holdout")},
            tokenizer.pad_token_id,
            collective=False,
        )
        summary[name] = {"final_loss": losses[-1], "eval": evals}
        log(f"prepare: {name} answer probability " + ", ".join(f"{s}={v['prob']:.3f}" for s, v in evals.items()))
        model.save_pretrained(staging / name)
        tokenizer.save_pretrained(staging / name)
    summary["seconds"] = round(time.time() - started, 1)
    (staging / "prepare.json").write_text(json.dumps(summary, indent=2))
    move_into_place(staging, root)
    return ModelAssets(str(root / "target"), str(root / "oracle"))


def _stop_when_asked(output_dir: str, what: str):
    """A fine-tuning step callback that ends the preparation when a stop was asked for (a signal or
    ``OUTPUT/STOP``): minutes of preparation are not worth finishing for a run that is told to stop. The
    models appear only when complete (staging directory), so the next run prepares them again."""

    def check(step: int, _loss: float) -> None:
        if stop_requested(output_dir):
            raise Preempted(step + 1, None, what)

    return check


def resolve_model_assets(cfg: RunConfig, log=print) -> ModelAssets:
    """The embedded models (prepared if missing) or the user's model path (no oracle); for a contrastive
    job the encoder (``embedded`` = the bundled all-MiniLM-L6-v2)."""
    if cfg.job.kind == "contrastive":
        return ModelAssets(encoder_path(cfg.model.path), None)
    if cfg.model.path == EMBEDDED_MODEL:
        return prepare_embedded(cfg, log=log)
    return ModelAssets(cfg.model.path, None)
