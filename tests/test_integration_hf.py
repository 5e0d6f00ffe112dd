"""``UnlearningTrainer`` (a Hugging Face ``Trainer``) against the CLI's own loop, and its examples.

One ``torchrun`` launch on 2 CPU ranks under DeepSpeed ZeRO-3 runs, for ``npo_gd`` (cached reference),
``npo_kl`` (sharded reference) and ``rmu`` (hidden states, cached reference), first the CLI's loop
(``run_job``, which writes ``metrics.jsonl``) and then ``UnlearningTrainer`` with the same model,
data, seed, batch sizes and the CLI's own DeepSpeed config: the per-step losses agree (rel 1e-4). The
same launch resumes the ``npo_gd`` Trainer run from its step-2 checkpoint (the cached π_ref comes from
the checkpoint), writes TensorBoard events (the forget/retain terms are checked in them when
``tensorboard`` is installed), and runs nf4 + LoRA (QLoRA, reference ``adapter_disabled``), whose saved
adapter the test reloads. The same launch also runs ``npo_gd`` under DDP (no DeepSpeed), ZeRO-0, ZeRO-1
and ZeRO-2, keeping the trained weights, under DDP with the saliency and evaluation callbacks (and
resumed from its checkpoint-1), and under ZeRO-3 with the ``quantized`` (nf4) reference. A 1-rank
launch runs the Trainer alone: 1 rank equals 2 ranks. The Trainer without DeepSpeed in this process
(cached and quantized π_ref, the callbacks) is the one-process run the 2-rank curves (ZeRO-3, DDP,
ZeRO-0/1/2, quantized), weights (DDP, ZeRO-0/1/2), masks and evaluations are held to. The bad-input
checks construct the Trainer in this process; the two examples (``torchrun`` and Ray Train on 2
workers) are checked against one process's step-1 loss.

This file is also the worker: ``torchrun tests/test_integration_hf.py compare|trainer|qlora MODEL_DIR OUT_DIR``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import BIN, REPO, SMALL_DATA, small_run_config  # noqa: E402

OBJECTIVES = {"npo_gd": {}, "npo_kl": {}, "rmu": {"steering": 20.0}}
REFERENCES = {"npo_gd": "cached", "npo_kl": "sharded", "rmu": "cached"}
STEPS, BATCH = 3, 4
TERMS = ("loss", "forget_loss", "retain_loss")
BACKENDS = {"ddp": None, "zero0": 0, "zero1": 1, "zero2": 2}  # label → ZeRO stage (None: no DeepSpeed)
CALLBACK_STEPS = 2  # the DDP run with the saliency and evaluation callbacks


# --- worker (runs under torchrun) ------------------------------------------------------------------


def _cli_config(out: Path, model_dir: str, world: int, saliency: float = 1.0) -> dict:
    from dist_unlearn.config import config_from_dict, config_to_dict

    names = list(OBJECTIVES) if saliency == 1.0 else ["npo_gd"]
    cfg = small_run_config(
        out,
        model_dir,
        method={"names": names, "params": {"rmu": OBJECTIVES["rmu"]}, "saliency": saliency},
        train={"steps": STEPS, "forget_batch_size": BATCH, "retain_batch_size": BATCH, "lr": 1e-3},
        ray={"enabled": False, "num_workers": world},
        checkpoint={"every_steps": 0},
        eval={"max_examples": 4, "generate": False, "sampled_generations": 0},  # the loss curve is compared
        output={"dir": str(out), "save_dtype": "fp32", "tensorboard": False},
    )
    return config_to_dict(config_from_dict(cfg))


def _trainer_run(
    name: str,
    model_dir: str,
    out: Path,
    world: int,
    resume: str | None = None,
    callbacks=(),
    zero: int | None = 3,
    reference: str = "auto",
    save_weights: bool = False,
    **extra,
) -> dict:
    """One UnlearningTrainer run; its per-step rows, evaluations, best checkpoint, what it ran on (the
    wrapper's class and ZeRO stage) and its wall time. ``zero=None``: no DeepSpeed (DDP on several ranks,
    the plain Trainer on one), torch AdamW. ``save_weights``: rank 0 writes the trained weights (whole on
    every rank without ZeRO-3) to ``out/weights.pt``."""
    import time

    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dist_unlearn.data import QADataset, generate_facts
    from dist_unlearn.engine.ds_config import build_deepspeed_config
    from dist_unlearn.integrations.hf import UnlearningTrainer

    start = time.perf_counter()
    ds = None
    if zero is None:
        # Earlier DeepSpeed runs of this process leave HF's zero.Init config and ACCELERATE_USE_DEEPSPEED
        # (accelerate sets it, never clears it): with it a Trainer without args.deepspeed builds an engine.
        unset_hf_deepspeed_config()
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    else:
        ds = build_deepspeed_config(zero_stage=zero, micro_batch_size=BATCH // world, world_size=world, lr=1e-3)
    settings = {
        "output_dir": str(out),
        "per_device_train_batch_size": BATCH // world,
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "deepspeed": ds,
        "optim": "adamw_torch",  # used without DeepSpeed (the DeepSpeed config has its own torch AdamW)
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    args = TrainingArguments(**{**settings, **extra})
    if ds is not None or world > 1:
        deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # ZeRO-3: zero.Init shards
    facts = generate_facts(**SMALL_DATA, seed=0)
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=QADataset(facts.split("forget"), tokenizer, 64),
        retain_dataset=QADataset(facts.split("retain"), tokenizer, 64),
        objective=name,
        objective_params=OBJECTIVES[name],
        reference=reference,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    assert trainer.reference_mode == (REFERENCES[name] if reference == "auto" else reference)
    trainer.train(resume_from_checkpoint=resume)
    if save_weights and trainer.args.process_index == 0:
        torch.save({key: value.detach().cpu() for key, value in trainer.model.state_dict().items()}, out / "weights.pt")
    history = trainer.state.log_history
    wrapped = trainer.model_wrapped
    return {
        "steps": [row for row in history if "unlearn_loss" in row],
        "evals": [row for row in history if "eval_forget_prob" in row],
        "best": trainer.state.best_model_checkpoint,
        "wrapper": type(wrapped).__name__,
        "zero": wrapped.zero_optimization_stage() if trainer.is_deepspeed_enabled else None,
        "reference_4bit": sum(type(m).__name__ == "Linear4bit" for m in _modules(trainer.reference)),
        "seconds": time.perf_counter() - start,
    }


def _modules(reference) -> list:
    """The modules of a reference that holds a model (none for ``cached``)."""
    model = getattr(reference, "model", None)
    return list(model.modules()) if model is not None else []


def _forget_set(model_dir: str):
    from transformers import AutoTokenizer

    from dist_unlearn.data import QADataset, generate_facts

    return QADataset(generate_facts(**SMALL_DATA, seed=0).split("forget"), AutoTokenizer.from_pretrained(model_dir), 64)


@contextmanager
def _rows_through(model) -> Iterator[list[int]]:
    """Count the example rows that go through ``model``'s transformers module (inside DDP) in the block."""
    from dist_unlearn.models.chunked_lm import unwrap_model

    rows = [0]

    def count(_module, args: tuple, kwargs: dict) -> None:
        rows[0] += int(kwargs.get("input_ids", args[0] if args else None).shape[0])

    handle = unwrap_model(model).register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def _callbacks_run(model_dir: str, out: Path, world: int, resume: str | None = None) -> dict:
    """npo_gd without DeepSpeed (DDP on several ranks, the plain Trainer on one), 2 steps, a checkpoint
    every step, with ``SaliencyCallback(0.5)`` and ``UnlearningEvalCallback`` (forget and 5 retain rows, at
    the start and every step), each counting the rows this rank scored; what the test compares."""
    from dist_unlearn.integrations.hf import SaliencyCallback, UnlearningEvalCallback

    class CountedSaliency(SaliencyCallback):
        def setup(self, trainer, model, resume_dir) -> None:
            with _rows_through(model) as rows:
                super().setup(trainer, model, resume_dir)
            self.rows = rows[0]

    class CountedEval(UnlearningEvalCallback):
        rows: list[int]

        def evaluate(self, trainer, prefix="eval", model=None):
            with _rows_through(model if model is not None else trainer.model) as rows:
                metrics = super().evaluate(trainer, prefix, model)
            self.rows = [*getattr(self, "rows", []), rows[0]]
            return metrics

    saliency = CountedSaliency(0.5)
    evaluation = CountedEval(_callback_eval_sets(model_dir), every_steps=1, batch_size=4, at_start=True)
    run = _trainer_run(
        "npo_gd",
        model_dir,
        out,
        world,
        resume,
        callbacks=[saliency, evaluation],
        zero=None,
        max_steps=CALLBACK_STEPS,
        save_strategy="steps",
        save_steps=1,
    )
    run.update(
        masks=saliency.mask.full_masks(),
        selected=saliency.mask.selected,
        saliency_rows=saliency.rows,
        at_start=evaluation.at_start,
        eval_rows=evaluation.rows,
    )
    return run


def _callback_eval_sets(model_dir: str) -> dict:
    from transformers import AutoTokenizer

    from dist_unlearn.data import QADataset, generate_facts

    facts, tok = generate_facts(**SMALL_DATA, seed=0), AutoTokenizer.from_pretrained(model_dir)
    forget, retain = facts.split("forget"), facts.split("retain")[:5]
    return {"forget": QADataset(forget, tok, 64), "retain": QADataset(retain, tok, 64)}


def _qlora_run(model_dir: str, out: Path, world: int) -> dict:
    """npo_gd on an nf4 base with LoRA adapters under ZeRO-3 (reference: adapter_disabled); saves the adapter."""
    import deepspeed
    from transformers import AutoTokenizer, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dist_unlearn.config.schema import LoraSettings
    from dist_unlearn.data import QADataset, generate_facts
    from dist_unlearn.engine.ds_config import build_deepspeed_config
    from dist_unlearn.integrations.hf import UnlearningEvalCallback, UnlearningTrainer
    from dist_unlearn.models.loading import load_model_for_training

    unset_hf_deepspeed_config()  # earlier TrainingArguments: no zero.Init for a bitsandbytes model
    model = load_model_for_training(model_dir, quantization="nf4", lora=LoraSettings(r=8, alpha=16))
    ds = build_deepspeed_config(zero_stage=3, micro_batch_size=BATCH // world, world_size=world, lr=1e-2)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH // world,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        deepspeed=ds,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    facts = generate_facts(**SMALL_DATA, seed=0)
    forget = QADataset(facts.split("forget"), tokenizer, 64)
    evaluation = UnlearningEvalCallback({"forget": forget}, at_start=True)
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=forget,
        retain_dataset=QADataset(facts.split("retain"), tokenizer, 64),
        objective="npo_gd",
        processing_class=tokenizer,
        callbacks=[evaluation],
    )
    assert trainer.reference_mode == "adapter_disabled"
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(str(out / "adapter"))
    steps = [row for row in trainer.state.log_history if "unlearn_loss" in row]
    return {"before": evaluation.at_start, "after": after, "steps": steps}


def _worker(mode: str, model_dir: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from dist_unlearn.integrations.hf import SaliencyCallback, UnlearningEvalCallback

    world = int(os.environ["WORLD_SIZE"])
    out = Path(out_dir)
    result: dict = {"world": world, "trainer": {}, "cli": {}}
    if mode == "compare":
        from dist_unlearn.engine.driver import run_job
        from dist_unlearn.engine.job import Job
        from dist_unlearn.engine.metrics_log import read_metrics

        cfg = _cli_config(out / "cli", model_dir, world)
        for name in OBJECTIVES:
            run_job(Job(cfg, "unlearn", name, model_dir, str(out / "cli" / name)))
            result["cli"][name] = read_metrics(out / "cli" / name)
        cfg = _cli_config(out / "cli-saliency", model_dir, world, saliency=0.5)
        run_job(Job(cfg, "unlearn", "npo_gd", model_dir, str(out / "cli-saliency" / "npo_gd")))
        result["cli"]["saliency"] = read_metrics(out / "cli-saliency" / "npo_gd")
    for name in OBJECTIVES if mode in ("compare", "trainer") else ():
        extra = {}
        if mode == "compare" and name == "npo_gd":  # checkpoints for the resume check, TensorBoard events
            loggers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []  # skipped below if not
            extra = {"save_strategy": "steps", "save_steps": 2, "report_to": loggers}
        result["trainer"][name] = _trainer_run(name, model_dir, out / f"hf-{name}", world, **extra)["steps"]
    if mode == "compare":  # SalUn mask (half the weights) applied between the engine's backward and step
        mask = SaliencyCallback(0.5)
        run = _trainer_run("npo_gd", model_dir, out / "hf-saliency", world, callbacks=[mask])
        result["trainer"]["saliency"] = run["steps"]
    if mode == "trainer":  # forget evaluation every step; the Trainer keeps the lowest forget probability
        evaluation = UnlearningEvalCallback({"forget": _forget_set(model_dir)}, every_steps=1)
        best = {"save_strategy": "best", "metric_for_best_model": "forget_prob", "greater_is_better": False}
        result["best"] = _trainer_run("npo_gd", model_dir, out / "hf-best", world, callbacks=[evaluation], **best)
    if mode == "compare":
        checkpoint = str(out / "hf-npo_gd" / "checkpoint-2")
        result["resumed"] = _trainer_run("npo_gd", model_dir, out / "hf-npo_gd", world, checkpoint)["steps"]
        for label, zero in BACKENDS.items():  # npo_gd without DeepSpeed (DDP) and under ZeRO-0/1/2, weights kept
            result[label] = _trainer_run("npo_gd", model_dir, out / f"hf-{label}", world, zero=zero, save_weights=True)
        # DDP with the saliency and evaluation callbacks, then resumed from its checkpoint-1: every rank
        # keeps its own record (masks, rows it scored) for the test
        folder = out / "hf-ddp-callbacks"
        runs = {"first": _callbacks_run(model_dir, folder, world)}
        runs["resumed"] = _callbacks_run(model_dir, folder, world, str(folder / "checkpoint-1"))
        torch.save(runs, folder / f"record-rank{dist.get_rank()}.pt")
        result["quantized"] = _trainer_run("npo_gd", model_dir, out / "hf-quantized", world, reference="quantized")
    if mode in ("compare", "qlora"):
        result["qlora"] = _qlora_run(model_dir, out / "qlora", world)
    if dist.get_rank() == 0:
        (out / f"{mode}.json").write_text(json.dumps(result))


# --- tests ---------------------------------------------------------------------------------------


def _launch(mode: str, nproc: int, model_dir: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", __file__, mode, model_dir, str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads((out / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_dir) -> tuple[dict, dict, Path]:
    """The 2-rank launch (CLI loop, Trainer, resume, nf4 + LoRA) and the 1-rank launch (Trainer), once."""
    root = tmp_path_factory.mktemp("launches")
    return _launch("compare", 2, tiny_dir, root / "w2"), _launch("trainer", 1, tiny_dir, root / "w1"), root


@pytest.mark.slow
def test_trainer_equals_cli_loop_and_one_rank_equals_two_under_zero3(launches):
    two, one, tmp_path = launches
    assert two["world"] == 2 and one["world"] == 1
    hf1_gd = one["trainer"]["npo_gd"]
    for name in OBJECTIVES:
        cli, hf2, hf1 = two["cli"][name], two["trainer"][name], one["trainer"][name]
        assert [r["step"] for r in cli] == [r["step"] for r in hf2] == [r["step"] for r in hf1] == [1, 2, 3], name
        for term in TERMS:
            key = "unlearn_loss" if term == "loss" else term
            expected = [r[term] for r in cli]
            assert [r[key] for r in hf2] == pytest.approx(expected, rel=1e-4), (name, term)
            assert [r[key] for r in hf1] == pytest.approx(expected, rel=1e-4), (name, term)
        assert hf2[-1]["unlearn_loss"] < hf2[0]["unlearn_loss"], name  # it trains
        assert [r["loss"] for r in hf2] == pytest.approx([r["unlearn_loss"] for r in hf2], rel=1e-3)  # Trainer's own
    # SalUn mask under ZeRO-3: the CLI's method.saliency=0.5 and SaliencyCallback(0.5) give the same curve
    expected = [r["loss"] for r in two["cli"]["saliency"]]
    assert [r["unlearn_loss"] for r in two["trainer"]["saliency"]] == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx([r["loss"] for r in two["cli"]["npo_gd"]], rel=1e-6)  # the mask matters
    # periodic evaluation every step; the Trainer's best checkpoint is the one with the lowest forget prob
    best = one["best"]
    evals = {row["step"]: row["eval_forget_prob"] for row in best["evals"]}
    assert sorted(evals) == [1, 2, 3]
    assert best["best"].endswith(f"checkpoint-{min(evals, key=evals.get)}")
    assert [r["unlearn_loss"] for r in best["steps"]] == pytest.approx([r["unlearn_loss"] for r in hf1_gd], rel=1e-6)
    # resumed from checkpoint-2 (π_ref table from the checkpoint): step 3 as in the uninterrupted run
    resumed = two["resumed"]  # its log history: steps 1-2 read from the checkpoint, step 3 trained now
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[-1]["unlearn_loss"] == pytest.approx(two["trainer"]["npo_gd"][2]["unlearn_loss"], rel=1e-5)
    assert (tmp_path / "w2" / "hf-npo_gd" / "checkpoint-2" / "unlearning_state" / "cached_reference.pt").is_file()


@pytest.mark.slow
def test_forget_and_retain_losses_reach_tensorboard(launches):
    """``report_to=["tensorboard"]`` (the 2-rank ZeRO-3 ``npo_gd`` run): every step's forget and retain
    terms and the objective's loss, as the Trainer logged them (averaged over ranks), are TensorBoard
    scalars ``train/<term>`` at that step, written once (rank 0). Skipped without ``tensorboard``."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    two, _, root = launches
    events = sorted((root / "w2" / "hf-npo_gd").rglob("events.out.tfevents.*"))
    assert events
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in acc.Scalars(tag))
    rows = two["trainer"]["npo_gd"]
    for key in ("forget_loss", "retain_loss", "forget_nll", "unlearn_loss"):
        got = sorted(scalars.get(f"train/{key}", []))
        assert [step for step, _ in got] == [row["step"] for row in rows] == [1, 2, 3], key
        assert [value for _, value in got] == pytest.approx([row[key] for row in rows], rel=1e-6), key


@pytest.mark.slow
def test_nf4_lora_under_zero3_lowers_forget_probability_and_saves_a_loadable_adapter(launches, tiny_dir):
    """QLoRA on 2 ZeRO-3 ranks (reference: the base with adapters off): forget probability falls; the saved
    adapter, loaded in this process on the nf4 base, scores what the trained engine scored; merged into
    the fp32 base it is a plain HF model that loads, with lower forget probability than the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_unlearn.data import QADataset, generate_facts
    from dist_unlearn.eval.answers import evaluate_splits
    from dist_unlearn.models.quantization import load_quantized

    two, _, root = launches
    run = two["qlora"]
    assert run["steps"][0]["forget_loss"] == pytest.approx(20 * math.log(2), rel=1e-6)  # adapters start at 0
    assert run["after"]["eval_forget_prob"] < run["before"]["eval_forget_prob"]
    adapter = root / "w2" / "qlora" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    forget = {"forget": QADataset(generate_facts(**SMALL_DATA, seed=0).split("forget"), tok, 64)}

    def forget_prob(model) -> float:
        return evaluate_splits(model.eval(), forget, tok.pad_token_id, collective=False)["forget"]["prob"]

    quantized = PeftModel.from_pretrained(
        load_quantized(AutoModelForCausalLM, tiny_dir, "nf4", torch.float32, "sdpa"), adapter
    )
    assert forget_prob(quantized) == pytest.approx(run["after"]["eval_forget_prob"], rel=1e-4)
    merged_dir = root / "merged"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).merge_and_unload()
    merged.save_pretrained(merged_dir)
    loaded = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    assert forget_prob(loaded) < forget_prob(AutoModelForCausalLM.from_pretrained(tiny_dir))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir) -> dict:
    """The plain Trainer (accelerate backward, torch AdamW, its own clipping) in this one process on the
    whole global batch: ``npo_gd`` with the cached π_ref (its rows and trained weights), with the
    quantized π_ref (its rows), and with the saliency and evaluation callbacks (:func:`_callbacks_run`)."""
    import torch

    root = tmp_path_factory.mktemp("one_process")
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank of the launches; a second thread on a loaded 2-core machine only contends
    try:
        with pytest.MonkeyPatch.context() as patch:  # _trainer_run clears accelerate's DeepSpeed switch
            patch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
            for reference in ("cached", "quantized"):
                save = reference == "cached"
                runs[reference] = _trainer_run(
                    "npo_gd", tiny_dir, root / reference, 1, zero=None, reference=reference, save_weights=save
                )
            runs["callbacks"] = _callbacks_run(tiny_dir, root / "callbacks", 1)
    finally:
        torch.set_num_threads(threads)
    runs["cached"]["weights"] = torch.load(root / "cached" / "weights.pt", weights_only=True)
    return runs


@pytest.mark.slow
def test_one_process_without_deepspeed_matches_zero3(launches, one_process):
    """The Trainer's plain path in this one process gives the per-step losses of the ZeRO-3 runs (1 rank
    here, equal to 2 ranks above)."""
    _, one, _ = launches
    assert one_process["cached"]["wrapper"] == "LlamaForCausalLM"  # no DeepSpeed engine, no DDP
    losses = [row["unlearn_loss"] for row in one_process["cached"]["steps"]]
    assert losses == pytest.approx([row["unlearn_loss"] for row in one["trainer"]["npo_gd"]], rel=1e-4)


@pytest.mark.slow
def test_ddp_and_zero0_zero1_zero2_on_two_ranks_equal_one_process(launches, one_process, tiny_dir):
    """``npo_gd`` on 2 ranks under DDP (no DeepSpeed), DeepSpeed ZeRO-0, ZeRO-1 and ZeRO-2 draws the same global
    forget/retain batches as one process: the same per-step losses and terms (rel 1e-4) and, after the
    last step, the same weights (each tensor within 1e-4 of its norm; training moved them far more)."""
    import torch
    from transformers import AutoModelForCausalLM

    two, _, root = launches
    expected = one_process["cached"]
    start = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).state_dict()
    moved = max(float((expected["weights"][k] - start[k]).norm() / start[k].norm()) for k in start)
    assert moved > 1e-2
    for label, zero in BACKENDS.items():
        run = two[label]
        assert (run["wrapper"], run["zero"]) == (
            ("DistributedDataParallel", None) if zero is None else ("DeepSpeedEngine", zero)
        ), label
        assert [r["step"] for r in run["steps"]] == [1, 2, 3], label
        for term in TERMS:
            key = "unlearn_loss" if term == "loss" else term
            got = [r[key] for r in run["steps"]]
            assert got == pytest.approx([r[key] for r in expected["steps"]], rel=1e-4), (label, term)
        weights = torch.load(root / "w2" / f"hf-{label}" / "weights.pt", weights_only=True)
        assert weights.keys() == expected["weights"].keys(), label
        for key, value in expected["weights"].items():
            assert float((weights[key] - value).norm() / value.norm()) <= 1e-4, (label, key)


def _eval_rows(run: dict) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k.startswith("eval_")} for row in run["evals"]]


@pytest.mark.slow
def test_saliency_and_evaluation_callbacks_under_ddp_are_sharded_and_equal_one_process(launches, one_process, tiny_dir):
    """Under DDP (2 ranks, no DeepSpeed) each rank scores only its share of the forget set for the
    saliency mask (every 2nd example; DDP's all-reduce averages the gradients), and the mask is one
    process's, element for element, on both ranks; each evaluation scores only its share of each split
    (padded to equal batches) and logs one process's numbers. Resumed from checkpoint-1 under DDP, the
    mask is read back (nothing rescored) and step 2 and its evaluation are the uninterrupted run's."""
    import torch

    _, _, root = launches
    one = one_process["callbacks"]
    sizes = {split: len(ds) for split, ds in _callback_eval_sets(tiny_dir).items()}
    n = sizes["forget"]
    assert one["wrapper"] == "LlamaForCausalLM" and one["saliency_rows"] == n  # one process scores all
    assert 0 < one["selected"] < sum(mask.numel() for mask in one["masks"].values())
    for rank in range(2):
        record = torch.load(root / "w2" / "hf-ddp-callbacks" / f"record-rank{rank}.pt", weights_only=False)
        run, resumed = record["first"], record["resumed"]
        assert run["wrapper"] == "DistributedDataParallel", rank
        assert run["saliency_rows"] == len(range(rank, n, 2)), rank
        assert run["selected"] == one["selected"] and run["masks"].keys() == one["masks"].keys()
        for name, mask in one["masks"].items():
            assert torch.equal(run["masks"][name], mask), (rank, name)
        assert run["eval_rows"] == [sum(-(-size // 2) for size in sizes.values())] * (CALLBACK_STEPS + 1), rank
        assert [row["step"] for row in run["evals"]] == list(range(CALLBACK_STEPS + 1)), rank
        assert run["at_start"] == pytest.approx(one["at_start"], rel=1e-6), rank
        for got, want in zip(_eval_rows(run), _eval_rows(one), strict=True):
            assert len(got) == 6 and got == pytest.approx(want, rel=1e-5), rank  # prob, acc, nll × 2 splits
        losses = [row["unlearn_loss"] for row in run["steps"]]
        assert losses == pytest.approx([row["unlearn_loss"] for row in one["steps"]], rel=1e-5), rank
        assert resumed["saliency_rows"] == 0 and resumed["selected"] == one["selected"], rank
        for name, mask in one["masks"].items():
            assert torch.equal(resumed["masks"][name], mask), (rank, name)
        assert [row["step"] for row in resumed["steps"]] == [1, 2], rank
        assert resumed["steps"][-1]["unlearn_loss"] == pytest.approx(losses[-1], rel=1e-6), rank
        assert _eval_rows(resumed)[-1] == pytest.approx(_eval_rows(run)[-1], rel=1e-6), rank


@pytest.mark.slow
def test_quantized_reference_under_zero3_equals_one_process(launches, one_process):
    """``reference="quantized"``: π_ref is a frozen nf4 copy of the starting model (bitsandbytes
    ``Linear4bit`` layers), loaded on every rank next to the ZeRO-3 engine. On 2 ranks it gives one
    process's curve (rel 1e-4); at step 1, where the cached π_ref equals π_θ and NPO's term is exactly
    2/β·log 2, the 4-bit π_ref is close to, not equal to, the full-precision one."""
    two, _, _ = launches
    run, expected = two["quantized"], one_process["quantized"]
    assert run["zero"] == 3 and run["reference_4bit"] > 0 and expected["reference_4bit"] > 0
    for term in TERMS:
        key = "unlearn_loss" if term == "loss" else term
        got = [r[key] for r in run["steps"]]
        assert got == pytest.approx([r[key] for r in expected["steps"]], rel=1e-4), term
    first = run["steps"][0]["forget_loss"]
    assert first != pytest.approx(20 * math.log(2), rel=1e-5)
    assert first == pytest.approx(20 * math.log(2), rel=1e-2)


@pytest.fixture(scope="module")
def small_setup(tiny_dir):
    """A tiny model loaded in this process, its tokenizer and forget/retain QA datasets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_unlearn.data import QADataset, generate_facts

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    facts = generate_facts(**SMALL_DATA, seed=0)
    forget = QADataset(facts.split("forget"), tok, 64)
    retain = QADataset(facts.split("retain"), tok, 64)
    return AutoModelForCausalLM.from_pretrained(tiny_dir), tok, forget, retain


def _bad_inputs(forget, retain):
    """(TrainingArguments overrides, UnlearningTrainer keyword arguments, expected message) per case."""
    unlabeled = [{"input_ids": row["input_ids"]} for row in forget]
    return [
        ({"gradient_accumulation_steps": 2}, {}, r"args.gradient_accumulation_steps=2: .* Fix: gradient_accumul"),
        ({}, {"objective": "npo", "reference": "none"}, r"reference: 'npo' needs a reference model but reference=none"),
        (
            {},
            {"objective": "grad_diff", "retain_dataset": None},
            r"retain_dataset: objective 'grad_diff' reads it.*Fix",
        ),
        ({}, {"reference": "adapter_disabled"}, r"adapter_disabled needs LoRA adapters. Fix: pass a peft LoRA model"),
        ({}, {"objective": "npo_kl", "reference": "cached"}, r"needs π_ref logits.*Fix: reference=sharded"),
        (
            {},
            {"objective": "forget_it"},
            r"objective: unknown unlearning method 'forget_it'. Fix: one of ga, grad_diff",
        ),
        ({}, {"objective_params": {"betta": 1}}, r"objective_params: method 'npo_gd' does not take .*betta"),
        ({}, {"forget_dataset": unlabeled}, r"forget_dataset: items need input_ids, labels .* lacks labels"),
        ({}, {"objective": "dpo", "processing_class": None}, r"idk_dataset: objective 'dpo' reads it"),
        ({}, {"objective": "grad_diff", "retain_batch_size": 0}, r"retain_batch_size: 'grad_diff' has a retain term"),
        (
            {},
            {"objective": "npo_kl", "reference_model_path": "/nonexistent"},
            r"reference_model_path: reference=sharded",
        ),
    ]


def test_bad_input_fails_at_construction_naming_the_argument(tmp_path, small_setup):
    """Each bad input raises one ValueError naming the argument and the fix, before any work (no output)."""
    from transformers import TrainingArguments

    from dist_unlearn.integrations.hf import UnlearningTrainer

    model, tok, forget, retain = small_setup
    for overrides, kwargs, message in _bad_inputs(forget, retain):
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], **overrides)
        given = {"forget_dataset": forget, "retain_dataset": retain, "processing_class": tok, **kwargs}
        with pytest.raises(ValueError, match=message):
            UnlearningTrainer(model, args, **given)
        assert not (tmp_path / "out").exists()


def _first_step_loss_one_process(model_dir: str, batch: int) -> float:
    """npo_gd's loss at step 1 of the Ray example's job, computed in this one process on the whole global
    batch: π_θ = π_ref there, so NPO's term is 2/β·log 2 and the retain term is the retain NLL/|y| at θ₀."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_unlearn.data import QADataset, collate_qa, generate_facts
    from dist_unlearn.data.sampling import StepSampler
    from dist_unlearn.models.logprobs import forward_sequence_stats
    from dist_unlearn.unlearning import UnlearnBatch, get_objective

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    facts = generate_facts(num_people=12, questions_per_person=3)  # the example's default data
    rows = {}
    for split in ("forget", "retain"):
        data = QADataset(facts.split(split), tok, 64)
        indices = StepSampler(len(data), batch, 0, 1, 0, split).global_indices(0)
        rows[split] = collate_qa([data[i] for i in indices], tok.pad_token_id)
    with torch.no_grad():
        reference = forward_sequence_stats(model, rows["forget"]).logprob
        out = get_objective("npo_gd", beta=0.1)(model, UnlearnBatch(**rows), reference=reference)
    assert out.logs["forget_loss"] == pytest.approx(20 * math.log(2), rel=1e-6)
    return float(out.loss)


@pytest.mark.slow
def test_hf_trainer_example_runs_under_torchrun(tmp_path, tiny_dir):
    """examples/hf_trainer_unlearn.py on 2 ranks (ZeRO-3): step 1's loss equals one process's on the same
    global batch, the forget probability falls, and the saved model loads."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "examples/hf_trainer_unlearn.py"]
    cmd += ["--model", tiny_dir, "--steps", "3", "--lr", "3e-3", "--output", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = [row for row in summary["log_history"] if "unlearn_loss" in row]
    assert summary["world_size"] == 2 and [row["step"] for row in steps] == [1, 2, 3]
    assert steps[0]["unlearn_loss"] == pytest.approx(_first_step_loss_one_process(tiny_dir, 4), rel=1e-5)
    assert summary["after"]["eval_forget_prob"] < summary["before"]["eval_forget_prob"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").num_parameters() > 0


@pytest.mark.slow
def test_ray_train_example_runs_on_two_workers(tmp_path, tiny_dir, ray_address):
    """examples/ray_train_unlearn.py on 2 Ray Train workers (ZeRO-3): Ray gets the reports and checkpoint,
    and step 1's loss equals one process's on the same global batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "examples/ray_train_unlearn.py",
        "--model",
        tiny_dir,
        "--steps",
        "3",
        "--output",
        str(tmp_path),
        "--address",
        ray_address,  # the session's cluster: Ray's start-up is not what this test is about
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["world_size"] == 2 and [row["step"] for row in losses["steps"]] == [1, 2, 3]
    assert losses["steps"][0]["unlearn_loss"] == pytest.approx(_first_step_loss_one_process(tiny_dir, 4), rel=1e-5)
    assert losses["steps"][-1]["forget_loss"] < losses["steps"][0]["forget_loss"]
    checkpoints = list((tmp_path / "ray_results" / "unlearn").glob("checkpoint_*/checkpoint"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "model.safetensors").is_file()  # Ray's copy of the Trainer's
    assert f"step 3: loss {losses['steps'][-1]['unlearn_loss']:.4f}" in result.stdout


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
