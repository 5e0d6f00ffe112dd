"""The suite inside ``dist-unlearn run``: every ``eval.every_steps`` steps and at the end.

* Periodic (``eval.every_steps > 0``): :func:`~dist_unlearn.eval.suite.evaluate_model` on the live engine
  (scores sharded over the ranks; greedy generation only when the engine is not ZeRO-3, since
  ``generate`` needs whole weights on each rank; no sampled generations), appended to
  ``RUN/eval_steps.jsonl``. When ``eval.best_metric`` improves, the weights are exported to
  ``RUN/best_model`` (HF format, written to a temporary directory and renamed by the exporter) and
  ``RUN/best.json`` records the step and value. A metric the run cannot measure is refused before the
  run starts where the config shows it (forget quality or PrivLeak without an oracle,
  :mod:`dist_unlearn.config.validate`); one that turns out to have no value in the first
  periodic evaluation (e.g. no perturbed answers in the data) is replaced, with a warning, by
  :data:`~dist_unlearn.eval.suite.BEST_METRIC_FALLBACK` (−forget probability) for the whole run, and
  ``best.json`` says so (``metric`` used, ``requested``).
* Final: the exported ``RUN/model`` is evaluated with the full suite and the ``eval.attacks``
  (:func:`~dist_unlearn.eval.suite.evaluate_directory`), written to ``RUN/eval.json``; an oracle model's
  statistics go to ``OUTPUT/oracle_stats.json`` (:mod:`dist_unlearn.eval.oracle_stats`).

The oracle (for forget quality and PrivLeak) is ``eval.oracle_dir``, else the embedded benchmark's
``oracle`` next to the target model directory, when it exists; it is scored once. With
``eval.oracle_stats=FILE`` its saved statistics are the reference instead (:mod:`dist_unlearn.eval.oracle_stats`).

When the trained weights are not themselves the unlearned model (``inference``: the objective's
``inference.json`` spec, e.g. ULD's assistant), every evaluation scores the model the spec describes
(:func:`dist_unlearn.models.combined.combine`: the starting model − α·the live engine) and the spec is
saved next to ``RUN/best_model`` (the unlearning task saves it next to ``RUN/model``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from dist_unlearn.data.facts import FactsBenchmark
from dist_unlearn.distributed.env import barrier, is_main_process
from dist_unlearn.eval.suite import (
    BEST_METRIC_FALLBACK,
    BEST_METRIC_NEEDS,
    best_score,
    evaluate_directory,
    evaluate_model,
    load_for_eval,
    settings_from_config,
)
from dist_unlearn.io import write_json_atomic


def oracle_dir_for(model_dir: str | Path) -> str | None:
    """``<dir>/../oracle`` when ``model_dir`` is the embedded benchmark's target, else ``None``."""
    path = Path(model_dir)
    oracle = path.parent / "oracle"
    return str(oracle) if path.name == "target" and (oracle / "config.json").is_file() else None


class RunEvaluator:
    """Periodic and final evaluation of one unlearning run (all methods are collective)."""

    def __init__(
        self,
        cfg: Any,
        tokenizer: Any,
        facts: FactsBenchmark,
        run_dir: Path,
        model_dir: str,
        device: Any,
        inference: dict[str, Any] | None = None,
    ):
        self.cfg, self.tokenizer, self.facts, self.run_dir, self.device = cfg, tokenizer, facts, Path(run_dir), device
        self.oracle_stats = cfg.eval.oracle_stats  # the reference as a file: no oracle model is loaded
        self.oracle_dir = None if self.oracle_stats else cfg.eval.oracle_dir or oracle_dir_for(model_dir)
        self.inference = inference
        self._members: dict[str, torch.nn.Module] = {}  # frozen models the spec adds (ULD: the target)
        self.oracle_result: dict[str, Any] | None = None
        self.best = float("-inf")
        self.metric = cfg.eval.best_metric  # the metric that picks best_model (the fallback when it has no value)
        best_file = self.run_dir / "best.json"
        if best_file.is_file():  # resumed run: keep the best so far, by the metric it was picked by
            kept = json.loads(best_file.read_text())
            self.best, self.metric = float(kept["value"]), kept.get("metric", self.metric)

    def _reference(self) -> dict[str, Any] | None:
        if self.oracle_result is None and self.oracle_stats:
            from dist_unlearn.eval.oracle_stats import load_oracle_stats

            self.oracle_result = load_oracle_stats(self.oracle_stats)
        if self.oracle_result is None and self.oracle_dir is not None:
            settings = settings_from_config(self.cfg, generate=False)
            oracle = load_for_eval(self.oracle_dir, settings, self.device)
            self.oracle_result = evaluate_model(oracle, self.tokenizer, self.facts, settings, device=self.device)
            del oracle
        return self.oracle_result

    def scored(self, engine: Any) -> torch.nn.Module:
        """The model to score for the live ``engine``: the engine itself, or the combination of
        ``inference`` (the models it adds loaded once by :func:`~dist_unlearn.eval.suite.load_for_eval`:
        frozen, in eval mode, in ``model.dtype``, partitioned over the ranks as ``eval.shard_weights`` says)."""
        from dist_unlearn.models.combined import combine

        def load(path: str) -> torch.nn.Module:
            if path not in self._members:
                self._members[path] = load_for_eval(path, settings_from_config(self.cfg), self.device)
            return self._members[path]

        return engine if self.inference is None else combine(engine, self.inference, load).eval()

    def after_step(self, engine: Any, step: int, export) -> dict[str, Any] | None:
        """Evaluate at multiples of ``eval.every_steps``; ``export(engine, out_dir)`` saves a best model.
        Returns the evaluation's result (``None`` at steps without one)."""
        every = self.cfg.eval.every_steps
        if not every or step % every:
            return None
        settings = settings_from_config(
            self.cfg, generate=self.cfg.eval.generate and self.cfg.deepspeed.zero_stage < 3, sampled_generations=0
        )
        result = evaluate_model(
            self.scored(engine), self.tokenizer, self.facts, settings, self._reference(), self.device
        )
        engine.train()
        score = best_score(result, self.metric)
        if score == float("-inf") and self.metric != BEST_METRIC_FALLBACK:
            if is_main_process():
                warnings.warn(
                    f"eval.best_metric={self.metric} has no value in this run's evaluation (it needs "
                    f"{BEST_METRIC_NEEDS[self.metric]}); RUN/best_model is picked by {BEST_METRIC_FALLBACK} "
                    f"(−forget probability) instead. Fix: set eval.best_metric={BEST_METRIC_FALLBACK} or a metric "
                    "the data has.",
                    stacklevel=2,
                )
            self.metric = BEST_METRIC_FALLBACK
            score = best_score(result, self.metric)
        if is_main_process():
            with open(self.run_dir / "eval_steps.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, "result": _lean(result)}) + "\n")
        if score > self.best:
            self.best = score
            export(engine, self.run_dir / "best_model")
            if is_main_process():
                record = {"step": step, "metric": self.metric, "value": score}
                if self.metric != self.cfg.eval.best_metric:
                    record["requested"] = self.cfg.eval.best_metric
                write_json_atomic(self.run_dir / "best.json", record)
            if self.inference is not None and is_main_process():  # best_model is deployed as RUN/model is
                from dist_unlearn.models.combined import write_inference_spec

                write_inference_spec(self.run_dir / "best_model", self.inference)
        return result

    def finish(self, model_dir: Path) -> dict[str, Any]:
        """Full suite (and attacks) on the exported model; rank 0 writes ``eval.json``. Returns the result."""
        barrier()  # the exported model is complete on disk before any rank loads it
        evaluation = evaluate_directory(
            self.cfg, str(model_dir), self.oracle_dir, self.facts, self.device, self._reference()
        )
        if is_main_process():
            evaluation["name"] = self.run_dir.name
            write_json_atomic(self.run_dir / "eval.json", evaluation)
            if self.oracle_dir is not None and self.oracle_result is not None:  # for eval.oracle_stats later
                from dist_unlearn.eval.oracle_stats import ORACLE_STATS_FILE, stats_meta, write_oracle_stats

                meta = stats_meta(self.cfg, self.oracle_dir)
                write_oracle_stats(self.run_dir.parent / ORACLE_STATS_FILE, self.oracle_result, meta)
        return evaluation


def _lean(result: dict[str, Any]) -> dict[str, Any]:
    """A result without its per-example lists (periodic records stay small)."""
    return {**result, "per_example": {}}
