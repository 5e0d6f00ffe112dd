"""Every registered unlearning objective through ``UnlearningTrainer``, checked number for number.

For each name in :data:`~dist_unlearn.unlearning.OBJECTIVES` as collected (an objective added to the
registry is covered without editing this file), the plain ``Trainer`` path in this one process (no
DeepSpeed, reference ``auto``) runs 2 steps on the tiny Llama. A callback keeps the weights each step
starts from; the test then recomputes each step's terms on its own: the step's global
forget/retain/holdout rows drawn by their samplers, the refusal / target rows paired with the forget
rows, the objective applied to a copy of the model at those weights, and π_ref a frozen copy of the
starting model run live (where the Trainer reads a cached table, or its own reference copy). Every
logged term (``forget_loss``, ``retain_loss``, ``forget_nll``, ``retain_nll``, ``unlearn_loss``, the
Trainer's own ``loss``) must equal the recomputed one. ULD, whose trained model is an assistant, is also
checked for what it saves and what its evaluation scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import SMALL_DATA  # noqa: E402

from dist_unlearn.unlearning import OBJECTIVES  # noqa: E402

BATCH, STEPS, SEED = 4, 2, 0
PARAMS = {"rmu": {"steering": 20.0}}  # RMU's steering for a 32-wide model (its layer: the middle block)
REFERENCES = {"npo_kl": "sharded", "undial": "sharded"}  # auto: token logits need a model; seq/hidden a table


@pytest.fixture(scope="module")
def setup(tiny_dir):
    """The tokenizer, the forget/retain/holdout QA datasets and a frozen copy of the starting model.

    The objects alive by then are frozen out of the garbage collector (``gc.freeze``) for the module: the
    Trainer ends each ``train()`` with a full ``gc.collect()`` (accelerate's ``free_memory``), which would
    otherwise walk every object of the pytest process each time. Torch computes on one thread meanwhile:
    on a tiny model a second one only contends."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dist_unlearn.integrations.hf  # noqa: F401  (the Trainer's modules: loaded before the freeze)
    from dist_unlearn.data import QADataset, generate_facts

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    facts = generate_facts(**SMALL_DATA, seed=0)
    data = {split: QADataset(facts.split(split), tok, 64) for split in ("forget", "retain", "holdout")}
    start = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval().requires_grad_(False)
    gc.collect()
    gc.freeze()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tok, data, start
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()


def _expected_logs(name: str, weights: dict, step: int, setup) -> dict[str, float]:
    """The objective's logs at ``step`` (0-based) recomputed from the model at ``weights``: this step's
    rows of each stream it reads, π_ref the starting model run live."""
    import copy

    import torch

    from dist_unlearn.data.qa import collate_qa
    from dist_unlearn.data.sampling import StepSampler
    from dist_unlearn.unlearning import UnlearnBatch, get_objective
    from dist_unlearn.unlearning.reference import ModelReference
    from dist_unlearn.unlearning.streams import PAIRED_STREAMS, paired_stream

    tok, data, start = setup
    objective = get_objective(name, **PARAMS.get(name, {}))
    needs = objective.needs
    rows = {}
    for stream in ("forget", "retain", "holdout"):
        if stream == "forget" or getattr(needs, stream):
            indices = StepSampler(len(data[stream]), BATCH, 0, 1, SEED, stream).global_indices(step)
            rows[stream] = collate_qa([data[stream][i] for i in indices], tok.pad_token_id)
    for paired in PAIRED_STREAMS:
        if getattr(needs, paired):
            stream = paired_stream(paired, data["forget"].items, tok, data["forget"].max_length)
            rows[paired] = collate_qa([stream[i] for i in rows["forget"]["index"].tolist()], tok.pad_token_id)
    model = copy.deepcopy(start)
    model.load_state_dict(weights)
    reference = ModelReference("live", start) if objective.needs_reference else None
    with torch.no_grad():
        return objective(model, UnlearnBatch(**rows), reference=reference).logs


def _training_args(tmp_path, **overrides):
    """CPU ``TrainingArguments`` of these tests: ``STEPS`` steps of ``BATCH`` rows, no reporting, no saving."""
    from transformers import TrainingArguments

    given = {"save_strategy": "no", **overrides}
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        report_to=[],
        use_cpu=True,
        seed=SEED,
        disable_tqdm=True,
        **given,
    )


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_runs_through_the_trainer_and_logs_its_own_terms(name, setup, tiny_dir, tmp_path):
    """2 Trainer steps of ``name``: the logged terms of each step equal the objective recomputed
    independently (rel 1e-5) from the weights that step started from, and the weights moved."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from dist_unlearn.integrations.hf import UnlearningTrainer

    class StartingWeights(TrainerCallback):
        def __init__(self) -> None:
            self.weights: list[dict[str, torch.Tensor]] = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    tok, data, _ = setup
    args = _training_args(tmp_path, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1)
    weights = StartingWeights()
    trainer = UnlearningTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
        args,
        forget_dataset=data["forget"],
        retain_dataset=data["retain"],
        holdout_dataset=data["holdout"],
        objective=name,
        objective_params=PARAMS.get(name),
        processing_class=tok,  # idk / target rows derived from the forget set
        callbacks=[weights],
    )
    needs = trainer.unlearn_objective.needs
    expected_mode = REFERENCES.get(name, "cached") if needs.needs_reference else "none"
    assert trainer.reference_mode == expected_mode
    trainer.train()
    logged = [row for row in trainer.state.log_history if "unlearn_loss" in row]
    assert [row["step"] for row in logged] == [1, 2]
    assert len(weights.weights) == STEPS
    moved = [k for k, v in weights.weights[0].items() if not torch.equal(v, weights.weights[1][k])]
    assert moved, "step 1 changed no weight"
    for step, (row, start_weights) in enumerate(zip(logged, weights.weights, strict=True)):
        expected = _expected_logs(name, start_weights, step, setup)
        assert set(expected) >= {"forget_loss", "forget_nll", "loss"}
        got = {key: row["unlearn_loss" if key == "loss" else key] for key in expected}
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-9), (name, step + 1)
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-9), (name, step + 1)
        assert ("retain_loss" in row) == trainer.unlearn_objective.uses_retain


def test_uld_saves_its_inference_spec_and_evaluates_the_unlearned_model(setup, tiny_dir, tmp_path):
    """ULD trains an assistant; the unlearned model is the starting model − α·the assistant. Through the
    Trainer: every saved model (checkpoints too) carries ``inference.json`` naming the starting model and α,
    ``load_scoring_model`` of the saved directory is that combination, and ``UnlearningEvalCallback``
    scores the combination (at the start, before any step, it already differs from the plain model).
    Without a starting model directory the Trainer refuses ULD at construction."""
    import copy
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from dist_unlearn.eval.answers import evaluate_splits
    from dist_unlearn.integrations.hf import UnlearningEvalCallback, UnlearningTrainer
    from dist_unlearn.models.combined import LogitDifferenceLM, load_scoring_model

    tok, data, start = setup
    alpha = 0.25
    forget = {"forget": data["forget"]}
    args = _training_args(tmp_path, learning_rate=1e-2, save_strategy="steps", save_steps=STEPS)
    given = {"forget_dataset": data["forget"], "retain_dataset": data["retain"], "processing_class": tok}
    evaluation = UnlearningEvalCallback(forget, at_start=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    trainer = UnlearningTrainer(
        model, args, objective="uld", objective_params={"alpha": alpha}, callbacks=[evaluation], **given
    )
    trainer.train()

    def forget_prob(scored) -> float:
        return evaluate_splits(scored.eval(), forget, tok.pad_token_id, collective=False)["forget"]["prob"]

    at_start = forget_prob(LogitDifferenceLM(start, copy.deepcopy(start), alpha))
    assert evaluation.at_start["eval_forget_prob"] == pytest.approx(at_start, rel=1e-5)
    assert at_start != pytest.approx(forget_prob(start), rel=1e-3)  # the assistant's own score would not pass
    trainer.save_model(str(tmp_path / "model"))
    for saved in (tmp_path / "model", tmp_path / "out" / f"checkpoint-{STEPS}"):
        spec = json.loads((saved / "inference.json").read_text())
        assert (spec["kind"], spec["alpha"], spec["target"]) == (
            "logit_difference",
            alpha,
            str(Path(tiny_dir).resolve()),
        )
    deployed = load_scoring_model(tmp_path / "model")
    assert isinstance(deployed, LogitDifferenceLM)
    assert trainer.evaluate()["eval_forget_prob"] == pytest.approx(forget_prob(deployed), rel=1e-5)

    nameless = copy.deepcopy(start)
    nameless.name_or_path = ""
    with pytest.raises(ValueError, match=r"reference_model_path: objective 'uld' .* Fix: pass reference_model_path"):
        UnlearningTrainer(nameless, args, objective="uld", **given)
