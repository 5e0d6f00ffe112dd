"""Unlearning inside a Hugging Face ``transformers.Trainer``: :class:`UnlearningTrainer` and its mixin.

A user keeps their own script (``TrainingArguments``, ``--deepspeed``, ``report_to``, checkpoints,
resume) and swaps ``Trainer`` for :class:`UnlearningTrainer`::

    trainer = UnlearningTrainer(
        model, TrainingArguments(output_dir="out", per_device_train_batch_size=2, max_steps=30, deepspeed=ds),
        forget_dataset=forget, retain_dataset=retain, objective="npo_gd", objective_params={"beta": 0.1},
        reference="auto", processing_class=tokenizer,
    )
    trainer.train()

Everything that defines the unlearning step is the project's own, shared with the CLI's loop:
objectives from :func:`dist_unlearn.unlearning.get_objective` (what they read: ``objective.needs``,
:class:`~dist_unlearn.unlearning.batch.DataNeeds`), π_ref from :func:`~dist_unlearn.unlearning.build_reference`
(the mode chosen by :func:`~dist_unlearn.unlearning.reference.choose_reference_mode`), and the per-step
batches from :class:`~dist_unlearn.unlearning.streams.StepBatches`. So on the same data, seed, batch
sizes and optimizer, a Trainer run follows the same loss curve as ``dist-unlearn run``.

**Batches.** Step ``s`` (``state.global_step``) uses a global forget batch of
``G = args.per_device_train_batch_size × world_size`` rows and a global retain batch of
``retain_batch_size`` rows (default ``G``), each drawn by a per-stream
:class:`~dist_unlearn.data.sampling.StepSampler` (seeded by ``args.seed``) and split over ranks: the
union over ranks does not depend on the number of ranks, and a resumed run draws what an uninterrupted
one would. The Trainer's dataloader only paces the steps (one placeholder batch per step,
``ceil(len(forget) / G)`` per epoch); ``args.gradient_accumulation_steps`` must be 1.

**Backward.** Under DeepSpeed (``args.deepspeed``, any ZeRO stage) the step is ``engine.backward(loss)``,
the saliency mask if any, ``engine.step()`` on the Trainer's own engine (what accelerate does, with
the mask in between); otherwise ``accelerator.backward(loss)`` and the mask, then the Trainer clips
and steps. Checkpoints, resume, schedulers and loggers are the Trainer's.

**When π_ref is built.** ``Trainer`` creates the DeepSpeed engine lazily inside ``train()``
(``_inner_training_loop``), and a ZeRO-3 model is partitioned from then on, so the reference (and the
saliency mask) are built right after the Trainer has prepared the model, in
:meth:`UnlearningTrainerMixin._prepare_for_training` (a ``transformers`` hook; before the first step and
the first callback ``on_train_begin``). That is collective: every rank builds it together (``cached``
scores the forget set sharded over ranks; ``sharded`` starts a frozen ZeRO-3 engine). On resume the
checkpoint has already replaced the weights by then, so the quantities that belong to the starting
weights θ₀ are saved with every checkpoint (``unlearning_state/``: the ``cached`` table, each rank's
saliency mask) and read back instead of recomputed; ``sharded``/``quantized`` reload the starting model
from ``reference_model_path`` and ``adapter_disabled`` needs nothing.

**Deployed model.** When the trained weights are not themselves the unlearned model (ULD trains an
assistant; the unlearned model is the starting model − α·the assistant), every saved model and checkpoint
gets the objective's ``inference.json`` (the starting model: ``reference_model_path``, else
``model.name_or_path``), and :class:`UnlearningEvalCallback` scores that combination.

**Logs.** Every step the objective's terms (``forget_loss``, ``retain_loss``, ``forget_nll``, ...; the
objective's ``loss`` as ``unlearn_loss``, unrounded) are averaged over ranks and, at each Trainer log,
averaged over the steps since the last one and passed to ``self.log``, so every ``report_to`` logger
(TensorBoard, W&B, MLflow) receives them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from dist_unlearn.data.qa import QADataset
from dist_unlearn.distributed.env import get_rank, import_deepspeed_muon_uncompiled, mean_over_ranks
from dist_unlearn.eval.answers import evaluate_splits
from dist_unlearn.io import atomic_path
from dist_unlearn.models.chunked_lm import unwrap_model
from dist_unlearn.models.combined import combine, write_inference_spec
from dist_unlearn.models.inference import load_inference_model
from dist_unlearn.unlearning import OBJECTIVES, UnlearningObjective, build_reference, get_objective
from dist_unlearn.unlearning.reference import CachedReference, choose_reference_mode
from dist_unlearn.unlearning.robust import SharpnessAware, unlearning_backward
from dist_unlearn.unlearning.saliency import SaliencyMask, _slots, saliency_mask_for_run
from dist_unlearn.unlearning.streams import PAIRED_STREAMS, StepBatches, missing_streams, paired_stream

STATE_DIR = "unlearning_state"
"""Folder inside each Trainer checkpoint holding what belongs to the starting weights θ₀."""

_STREAM_ARGS = {name: f"{name}_dataset" for name in ("forget", "retain", "holdout", *PAIRED_STREAMS)}
_REQUIRED_FIELDS = ("input_ids", "labels")


class IndexedDataset(Dataset):
    """A map-style dataset of :func:`~dist_unlearn.data.qa.collate_qa` examples whose items carry their
    own dataset index (``index``), as cached references look π_ref values up by it.

    Accepts a :class:`~dist_unlearn.data.qa.QADataset`, a list of dicts or a ``datasets.Dataset``
    whose rows have ``input_ids`` and ``labels`` (``-100`` on prompt tokens); ``attention_mask`` is
    rebuilt by ``collate_qa``. ``max_length`` is the longest ``input_ids`` (for activation caches).
    """

    def __init__(self, data: Any, argument: str = "dataset") -> None:
        try:
            size = len(data)
        except TypeError as exc:
            raise ValueError(
                f"{argument}: needs a map-style dataset with len() (a QADataset, a list of dicts or a "
                "datasets.Dataset); got an iterable. Fix: materialise it, e.g. list(...) or Dataset.from_list"
            ) from exc
        if size == 0:
            raise ValueError(f"{argument} is empty. Fix: pass at least one example")
        first = data[0]
        missing = [f for f in _REQUIRED_FIELDS if not isinstance(first, Mapping) or f not in first]
        if missing:
            keys = sorted(first) if isinstance(first, Mapping) else type(first).__name__
            raise ValueError(
                f"{argument}: items need {', '.join(_REQUIRED_FIELDS)} (collate_qa format) but item 0 lacks "
                f"{', '.join(missing)} (it has {keys}). Fix: tokenize with dist_unlearn.data.QADataset or "
                "dist_unlearn.data.qa.encode_qa (labels = -100 on the prompt)"
            )
        self.data = data
        self.max_length = getattr(data, "max_length", None) or max(len(data[i]["input_ids"]) for i in range(size))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.data[index]
        return {"input_ids": list(row["input_ids"]), "labels": list(row["labels"]), "index": int(index)}


class _StepPlaceholders(Dataset):
    """One item per optimizer step of an epoch; the Trainer's dataloader only paces the steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> int:
        return index


def _collate_steps(rows: list[int]) -> dict[str, torch.Tensor]:
    return {"unlearn_step": torch.tensor(rows, dtype=torch.long)}


def _is_peft(model: Any) -> bool:
    return hasattr(unwrap_model(model), "disable_adapter")


class UnlearningCallback(TrainerCallback):
    """A ``TrainerCallback`` that also gets the trainer once the model is prepared (engine built):
    :meth:`setup` runs collectively on every rank, before the first step."""

    def setup(self, trainer: UnlearningTrainerMixin, model: torch.nn.Module, resume_dir: str | None) -> None:
        """Called with the prepared model (DeepSpeed engine, DDP module or plain module)."""

    def after_backward(self, trainer: UnlearningTrainerMixin, model: torch.nn.Module) -> None:
        """Called every step between backward and the optimizer step (gradients are this step's)."""

    def save(self, trainer: UnlearningTrainerMixin, state_dir: Path) -> None:
        """Called by every rank when the Trainer saves a checkpoint; write into ``state_dir``."""


class SaliencyCallback(UnlearningCallback):
    """SalUn/WAGLE weight saliency (:mod:`dist_unlearn.unlearning.saliency`): only the top ``fraction`` of
    the trainable weights by ``|∂L_forget(θ₀)/∂θ|`` are updated. The mask is computed from every forget
    example at the starting weights and applied to the gradients every step before the optimizer step.
    Under DDP or DeepSpeed (any ZeRO stage) it is collective: each rank scores only its share of the
    forget set (every ``world``-th example) and the backward averages the gradients over ranks, so the
    mask is the one-process mask (exact under ZeRO-3 too, where each rank holds its partition of it).
    With AdamW, use ``weight_decay=0`` so masked weights stay at θ₀.

    Saved with each checkpoint (each rank its share) and read back on resume.
    """

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"SaliencyCallback: fraction must be in (0, 1], got {fraction}. Fix: e.g. 0.5")
        self.fraction = fraction
        self.mask: SaliencyMask | None = None

    def _file(self, state_dir: Path) -> Path:
        return Path(state_dir) / f"saliency_rank{get_rank()}.pt"

    def setup(self, trainer: UnlearningTrainerMixin, model: torch.nn.Module, resume_dir: str | None) -> None:
        saved = self._file(Path(resume_dir) / STATE_DIR) if resume_dir else None
        if saved is not None and saved.is_file():
            state = torch.load(saved, weights_only=True)
            slots, partitioned = _slots(model)
            masks = [m.to(s.device) for m, s in zip(state["masks"], slots, strict=True)]  # before any backward
            self.mask = SaliencyMask(slots, masks, partitioned, float(state["threshold"]), state["unranked"])
            return
        if resume_dir:
            raise ValueError(
                f"SaliencyCallback: {resume_dir} holds no saliency mask ({STATE_DIR}/), so the mask of the starting "
                "weights is lost. Fix: resume from a checkpoint written by an UnlearningTrainer with this callback"
            )
        forget = trainer.unlearn_streams["forget"]
        self.mask = saliency_mask_for_run(model, forget, trainer.pad_token_id, self.fraction, trainer.args.device)

    def after_backward(self, trainer: UnlearningTrainerMixin, model: torch.nn.Module) -> None:
        if self.mask is not None:
            self.mask.apply(model)

    def save(self, trainer: UnlearningTrainerMixin, state_dir: Path) -> None:
        if self.mask is None:
            return
        state = {"masks": [m.cpu() for m in self.mask._masks], "threshold": self.mask.threshold}
        state["unranked"] = list(self.mask.unranked)
        _save_atomic(state, self._file(state_dir))


class UnlearningEvalCallback(UnlearningCallback):
    """Periodic forget/retain evaluation: every ``every_steps`` steps (and when the Trainer evaluates)
    the mean answer probability, token accuracy and NLL of each split
    (:func:`dist_unlearn.eval.answers.evaluate_splits`, sharded over ranks) are logged as
    ``eval_<split>_<metric>`` (e.g. ``eval_forget_prob``). On several ranks (DDP or DeepSpeed) each rank
    scores only every ``world``-th example and the per-example scores are all-gathered, so every rank
    logs the numbers one process would, without repeating the others' work.

    It serves as the Trainer's evaluation (``UnlearningTrainer.evaluate``), so the Trainer's
    best-checkpoint machinery works: ``TrainingArguments(save_strategy="best",
    metric_for_best_model="forget_prob", greater_is_better=False)`` keeps the checkpoint with the lowest
    forget-set probability (or ``load_best_model_at_end=True`` with matching eval/save steps).

    Args:
        datasets: split name → QA dataset (a ``QADataset`` or rows as for :class:`IndexedDataset`).
        every_steps: evaluate every N optimizer steps (0 = only when the Trainer evaluates).
        batch_size: rows per forward.
        at_start: also evaluate the starting model once the Trainer has prepared it (a fresh run, not a
            resumed one); logged at step 0 and kept in :attr:`at_start` (``None`` until then).
    """

    def __init__(
        self, datasets: Mapping[str, Any], every_steps: int = 0, batch_size: int = 32, at_start: bool = False
    ) -> None:
        if every_steps < 0:
            raise ValueError(f"UnlearningEvalCallback: every_steps must be >= 0, got {every_steps}")
        self.datasets = {
            name: IndexedDataset(ds, f"UnlearningEvalCallback datasets[{name!r}]") for name, ds in datasets.items()
        }
        self.every_steps, self.batch_size = every_steps, batch_size
        self.evaluate_at_start = at_start
        self.at_start: dict[str, float] | None = None
        self._members: dict[str, torch.nn.Module] = {}  # frozen models an inference spec adds (ULD: the target)

    def _member(self, trainer: UnlearningTrainerMixin, path: str) -> torch.nn.Module:
        """The model at ``path``, loaded once: frozen, in the run's dtype, partitioned over ranks as
        :func:`~dist_unlearn.models.inference.load_inference_model` does (collective then)."""
        if path not in self._members:
            dtype = "bf16" if trainer.args.bf16 else ("fp16" if trainer.args.fp16 else "fp32")
            self._members[path] = load_inference_model(path, dtype, device=trainer.args.device)
        return self._members[path]

    def setup(self, trainer: UnlearningTrainerMixin, model: torch.nn.Module, resume_dir: str | None) -> None:
        if self.evaluate_at_start and resume_dir is None:
            self.at_start = self.evaluate(trainer, model=model)
            trainer.log(dict(self.at_start))

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            control.should_evaluate = True
        return control

    def evaluate(
        self, trainer: UnlearningTrainerMixin, prefix: str = "eval", model: torch.nn.Module | None = None
    ) -> dict[str, float]:
        """The metrics of every split (collective). Under ZeRO-3 only once the Trainer has built its engine
        (during or after ``train()``). When the trained weights are not themselves the unlearned model
        (ULD), what is scored is the model the objective's ``inference.json`` describes."""
        if model is None:
            model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
        if trainer.unlearn_inference is not None:  # ULD: score the unlearned model, not the assistant
            model = combine(model, trainer.unlearn_inference, lambda path: self._member(trainer, path)).eval()
        results = evaluate_splits(model, self.datasets, trainer.pad_token_id, self.batch_size, trainer.args.device)
        return {
            f"{prefix}_{split}_{key}": float(value)
            for split, values in results.items()
            for key, value in values.items()
            if key != "count"
        }


def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class UnlearningTrainerMixin:
    """Unlearning for a ``transformers.Trainer`` subclass: put it first, ``class T(UnlearningTrainerMixin,
    MyTrainer)``. See the module docstring for batches, backward, reference timing and logs.

    Args:
        model: the model to unlearn from (a ``transformers`` causal LM, or a ``peft`` model, e.g. LoRA on an
            nf4 base); ``args``: its ``TrainingArguments``.
        forget_dataset: the forget set; rows with ``input_ids`` and ``labels`` (a
            :class:`~dist_unlearn.data.qa.QADataset`, a list of dicts or a ``datasets.Dataset``).
        retain_dataset, holdout_dataset: the retain set and held-out set, when the objective reads them.
        idk_dataset, target_dataset: refusal / targeted answers to the forget questions, row ``i`` paired
            with forget row ``i``; derived from ``forget_dataset`` when it is a ``QADataset`` and
            ``processing_class`` (the tokenizer) is given.
        objective: a name in :data:`~dist_unlearn.unlearning.OBJECTIVES` or an ``UnlearningObjective``;
            ``objective_params``: its parameters (``beta``, ``forget_weight``, ``retain_weight``, ...).
        reference: ``auto`` (as the CLI: ``adapter_disabled`` for a peft model, ``sharded`` when π_ref
            logits are needed, else ``cached``), ``none``, ``cached``, ``adapter_disabled``, ``sharded``
            or ``quantized``; ``reference_model_path``: the starting model's directory (``sharded``,
            ``quantized``; default ``model.name_or_path``).
        retain_batch_size: global retain rows per step (default: the global forget batch).
        pad_token_id: padding id (default: the tokenizer's, else ``model.config``'s).
        robust: ``None`` / ``"none"``, ``"sam"`` or a :class:`~dist_unlearn.unlearning.robust.SharpnessAware`
            (sharpness-aware unlearning against relearning, Fan et al. 2025; ``"sam"`` = ρ 0.01): each step
            then takes the objective's forget gradient at θ + δ (the same function as ``method.robust=sam``
            of the CLI). SURE (``method.robust=sure``) is ``callbacks=[SaliencyCallback(0.1)]`` with a
            10× ``learning_rate`` here; ``"sure"`` is refused with that fix.
        Other keyword arguments go to the Trainer (``processing_class``, ``callbacks``, ...).

    Raises:
        ValueError: bad input, before any work (the message names the argument and the fix).
    """

    def __init__(
        self,
        model: Any = None,
        args: TrainingArguments | None = None,
        *,
        forget_dataset: Any = None,
        retain_dataset: Any = None,
        holdout_dataset: Any = None,
        idk_dataset: Any = None,
        target_dataset: Any = None,
        objective: str | UnlearningObjective = "npo_gd",
        objective_params: Mapping[str, Any] | None = None,
        reference: str = "auto",
        reference_model_path: str | os.PathLike | None = None,
        retain_batch_size: int | None = None,
        pad_token_id: int | None = None,
        robust: str | SharpnessAware | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("model: UnlearningTrainer needs the model to unlearn from. Fix: pass model=...")
        args = args if args is not None else TrainingArguments(output_dir="trainer_output")
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"args.gradient_accumulation_steps={args.gradient_accumulation_steps}: UnlearningTrainer draws one "
                "paired forget/retain batch per optimizer step and does not accumulate. Fix: "
                "gradient_accumulation_steps=1 and a larger per_device_train_batch_size (or more ranks)"
            )
        if args.deepspeed:  # before the Trainer builds its engine (see import_deepspeed_muon_uncompiled)
            import_deepspeed_muon_uncompiled(getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {})
        self.unlearn_objective = self._objective(objective, objective_params)
        self.unlearn_sam = self._robust(robust, args)
        name, needs = self.unlearn_objective.name, self.unlearn_objective.needs
        self.reference_mode = choose_reference_mode(
            needs.reference,
            reference,
            lora=_is_peft(model),
            method=name,
            field="reference",
            lora_fix="pass a peft LoRA model (peft.get_peft_model)",
            lora_option="adapter_disabled with a peft LoRA model",
        )
        tokenizer = kwargs.get("processing_class")
        self.pad_token_id = self._pad_id(pad_token_id, tokenizer, model)
        given = {
            "forget": forget_dataset,
            "retain": retain_dataset,
            "holdout": holdout_dataset,
            "idk": idk_dataset,
            "target": target_dataset,
        }
        for paired in PAIRED_STREAMS:
            derivable = isinstance(forget_dataset, QADataset) and tokenizer is not None
            if getattr(needs, paired) and given[paired] is None and derivable:
                given[paired] = paired_stream(paired, forget_dataset.items, tokenizer, forget_dataset.max_length)
        missing = missing_streams(needs, given)
        if missing:
            what = ", ".join(f"{_STREAM_ARGS[m]}" for m in missing)
            hint = " (or objective_params={'retain_weight': 0})" if missing == ["retain"] else ""
            paired_hint = (
                " (derived automatically from a QADataset forget_dataset when processing_class=tokenizer is given)"
                if set(missing) & set(PAIRED_STREAMS)
                else ""
            )
            raise ValueError(
                f"{what}: objective '{name}' reads it but it was not given. Fix: pass {what}=...{hint}{paired_hint}"
            )
        self.unlearn_streams = {
            stream: IndexedDataset(data, _STREAM_ARGS[stream])
            for stream, data in given.items()
            if data is not None and (stream == "forget" or getattr(needs, stream))
        }
        for paired in PAIRED_STREAMS:
            if paired in self.unlearn_streams and len(self.unlearn_streams[paired]) != len(
                self.unlearn_streams["forget"]
            ):
                raise ValueError(
                    f"{_STREAM_ARGS[paired]}: {len(self.unlearn_streams[paired])} rows but forget_dataset has "
                    f"{len(self.unlearn_streams['forget'])}; row i must answer forget question i. "
                    "Fix: one row per forget row"
                )
        world = max(1, args.world_size)
        self.forget_batch_size = args.per_device_train_batch_size * world
        self.retain_batch_size = self.forget_batch_size if retain_batch_size is None else retain_batch_size
        if needs.retain and self.retain_batch_size <= 0:
            raise ValueError(
                f"retain_batch_size: '{name}' has a retain term but retain_batch_size={self.retain_batch_size}. "
                f"Fix: a positive multiple of the world size ({world}), or objective_params={{'retain_weight': 0}}"
            )
        if needs.retain and self.retain_batch_size % world:
            raise ValueError(
                f"retain_batch_size={self.retain_batch_size} does not divide over {world} ranks. "
                f"Fix: a multiple of {world}"
            )
        self.reference_model_path = self._reference_path(reference_model_path, model)
        self.unlearn_inference = self._inference_spec(reference_model_path, model)
        self.unlearn_batches = StepBatches(
            self.unlearn_streams,
            needs,
            forget_batch_size=self.forget_batch_size,
            retain_batch_size=self.retain_batch_size,
            rank=args.process_index,
            world_size=world,
            seed=args.seed,
            pad_token_id=self.pad_token_id,
        )
        self.unlearn_objective.prepare_model(model)  # e.g. RMU: only the chosen layers train
        self.reference = None
        self._unlearn_ready = False
        self._log_sums: dict[str, float] = {}
        self._log_steps = 0
        super().__init__(model=model, args=args, train_dataset=self.unlearn_streams["forget"], **kwargs)

    # --- construction helpers ------------------------------------------------------------------------

    @staticmethod
    def _objective(objective: Any, params: Mapping[str, Any] | None) -> UnlearningObjective:
        if isinstance(objective, UnlearningObjective):
            if params:
                raise ValueError(
                    "objective_params: given with an UnlearningObjective instance, which has its parameters. "
                    "Fix: pass objective=<name> with objective_params, or the instance alone"
                )
            return objective
        if not isinstance(objective, str) or objective not in OBJECTIVES:
            raise ValueError(f"objective: unknown unlearning method {objective!r}. Fix: one of {', '.join(OBJECTIVES)}")
        try:
            return get_objective(objective, **dict(params or {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"objective_params: {exc}") from exc

    @staticmethod
    def _robust(robust: Any, args: TrainingArguments) -> SharpnessAware | None:
        if robust is None or robust == "none":
            return None
        if robust == "sure":
            raise ValueError(
                "robust: 'sure' is not an option of UnlearningTrainer. Fix: SURE is saliency plus a larger learning "
                "rate: pass callbacks=[SaliencyCallback(0.1)] and a learning_rate 10x your usual one"
            )
        if robust == "sam":
            robust = SharpnessAware()
        if not isinstance(robust, SharpnessAware):
            raise ValueError(f"robust: expected None, 'none', 'sam' or a SharpnessAware, got {robust!r}")
        if args.fp16 and not args.deepspeed:
            raise ValueError(
                "robust: sharpness-aware unlearning runs three backward passes per step, which the fp16 loss "
                "scaler of the plain Trainer path does not support. Fix: bf16=True, fp32, or a DeepSpeed config"
            )
        return robust

    @staticmethod
    def _pad_id(pad_token_id: int | None, tokenizer: Any, model: Any) -> int:
        for candidate in (
            pad_token_id,
            getattr(tokenizer, "pad_token_id", None),
            getattr(getattr(unwrap_model(model), "config", None), "pad_token_id", None),
            getattr(tokenizer, "eos_token_id", None),
        ):
            if candidate is not None:
                return int(candidate)
        raise ValueError("pad_token_id: neither the tokenizer nor model.config has one. Fix: pass pad_token_id=...")

    @staticmethod
    def _starting_dir(path: Any, model: Any, user: str) -> str:
        """The starting model's directory (``path``, else ``model.name_or_path``) that ``user`` loads."""
        path = path or getattr(unwrap_model(model), "name_or_path", None)
        if not path or not Path(str(path)).is_dir():
            raise ValueError(
                f"reference_model_path: {user} loads the starting model from disk, and "
                f"{path or 'model.name_or_path'} is not a directory. Fix: pass reference_model_path=DIR "
                "(where save_pretrained wrote the starting weights)"
            )
        return str(path)

    def _reference_path(self, path: Any, model: Any) -> str | None:
        if self.reference_mode not in ("sharded", "quantized"):
            return None
        return self._starting_dir(path, model, f"reference={self.reference_mode}")

    def _inference_spec(self, path: Any, model: Any) -> dict[str, Any] | None:
        """How the trained weights deploy when they are not themselves the unlearned model (ULD: the starting
        model − α·the trained assistant, :meth:`~dist_unlearn.unlearning.UnlearningObjective.inference_spec`)."""
        if self.unlearn_objective.forget.inference is None:
            return None
        user = f"objective '{self.unlearn_objective.name}' (its unlearned model combines the starting model)"
        return self.unlearn_objective.inference_spec(self._starting_dir(path, model, user))

    # --- set-up once the Trainer has prepared the model ------------------------------------------

    def _unlearning_callbacks(self) -> list[UnlearningCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, UnlearningCallback)]

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self._setup_unlearning(model, resume_from_checkpoint)
        return model, train_dataloader

    def _setup_unlearning(self, model: torch.nn.Module, resume_dir: str | None) -> None:
        """Build π_ref and let the callbacks set up (collective); see the module docstring."""
        if self._unlearn_ready:
            return
        needs, device = self.unlearn_objective.needs, self.args.device
        saved = Path(resume_dir) / STATE_DIR / "cached_reference.pt" if resume_dir else None
        if self.reference_mode == "cached" and saved is not None:
            if not saved.is_file():
                raise ValueError(
                    f"resume_from_checkpoint: {resume_dir} holds no cached reference ({STATE_DIR}/), and π_ref of the "
                    "starting weights cannot be recomputed from resumed weights. Fix: resume from a checkpoint "
                    "written by UnlearningTrainer, or use reference='sharded' with reference_model_path"
                )
            state = torch.load(saved, weights_only=True)
            self.reference = CachedReference(state["logprobs"], state["activations"])
        else:
            self.reference = build_reference(
                self.reference_mode,
                model,
                model_path=self.reference_model_path,
                pad_token_id=self.pad_token_id,
                seq_datasets={name: self.unlearn_streams[name] for name in sorted(needs.seq_streams)},
                hidden_datasets={name: self.unlearn_streams[name] for name in sorted(needs.hidden_streams)},
                layer_names=self.unlearn_objective.layer_names(model),
                micro_batch_size=self.args.per_device_train_batch_size,
                dtype="bf16" if self.args.bf16 else ("fp16" if self.args.fp16 else "fp32"),
                device=device,
            )
        for callback in self._unlearning_callbacks():
            callback.setup(self, model, resume_dir)
        self._unlearn_ready = True

    # --- Trainer overrides ---------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """One placeholder batch per optimizer step (``ceil(len(forget) / G)`` per epoch); the rows of
        step ``s`` are drawn in :meth:`training_step` from ``state.global_step``."""
        steps = math.ceil(len(self.unlearn_streams["forget"]) / self.forget_batch_size)
        return DataLoader(_StepPlaceholders(steps), batch_size=1, shuffle=False, collate_fn=_collate_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The objective's loss on this rank's batch of step ``state.global_step`` (``inputs`` only pace);
        on other inputs (e.g. a user's ``eval_dataset``) the Trainer's own loss."""
        if "unlearn_step" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self._unlearn_ready:  # a transformers version without _prepare_for_training: build now
            self._setup_unlearning(model, None)
        batch = self.unlearn_batches.batch(self.state.global_step, self.args.device)
        out = self.unlearn_objective(model, batch, reference=self.reference)
        self._record(out.logs)
        return (out.loss, out) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Objective forward, backward through the Trainer's engine/accelerator, saliency mask, and (under
        DeepSpeed) the engine's step; returns the detached loss for the Trainer's own logging. With
        ``robust`` the gradients come from :func:`~dist_unlearn.unlearning.robust.unlearning_backward`
        (the CLI loop's function: three passes, weights restored before the step)."""
        model.train()
        callbacks = self._unlearning_callbacks()
        if self.unlearn_sam is not None and "unlearn_step" in inputs:
            if not self._unlearn_ready:
                self._setup_unlearning(model, None)
            batch = self.unlearn_batches.batch(self.state.global_step, self.args.device)
            with self.compute_loss_context_manager():
                out = unlearning_backward(model, self.unlearn_objective, batch, self.reference, self.unlearn_sam)
            self._record(out.logs)
            for callback in callbacks:
                callback.after_backward(self, model)
            if self.is_deepspeed_enabled:
                model.step()
            return out.loss.detach()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if self.is_deepspeed_enabled:
            model.backward(loss)
            for callback in callbacks:
                callback.after_backward(self, model)
            model.step()
        else:
            self.accelerator.backward(loss)
            for callback in callbacks:
                callback.after_backward(self, model)
        return loss.detach()

    def _record(self, logs: dict[str, float]) -> None:
        values = mean_over_ranks({("unlearn_loss" if k == "loss" else k): v for k, v in logs.items()}, self.args.device)
        for key, value in values.items():
            self._log_sums[key] = self._log_sums.get(key, 0.0) + value
        self._log_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log plus the objective's terms averaged over the steps since the last log."""
        if "loss" in logs and self._log_steps:
            logs = {**logs, **{k: v / self._log_steps for k, v in self._log_sums.items()}}
            self._log_sums, self._log_steps = {}, 0
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With an :class:`UnlearningEvalCallback` and no ``eval_dataset``: its forget/retain metrics
        (logged, and seen by ``metric_for_best_model``); otherwise the Trainer's own evaluation."""
        callbacks = [cb for cb in self._unlearning_callbacks() if isinstance(cb, UnlearningEvalCallback)]
        if eval_dataset is not None or self.eval_dataset is not None or not callbacks:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics: dict[str, float] = {}
        for callback in callbacks:
            metrics.update(callback.evaluate(self, metric_key_prefix))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save, plus ``inference.json`` next to the weights when they are not themselves the
        unlearned model (ULD's assistant), so that :func:`~dist_unlearn.models.combined.load_scoring_model`
        and ``dist-unlearn eval`` load the unlearned model. Checkpoints save through here too."""
        super().save_model(output_dir, _internal_call)
        if self.unlearn_inference is not None and self.args.should_save:
            write_inference_spec(output_dir or self.args.output_dir, self.unlearn_inference)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        state_dir = folder / STATE_DIR
        if isinstance(self.reference, CachedReference) and self.args.should_save:
            state = {"logprobs": self.reference.logprobs, "activations": self.reference.activations}
            _save_atomic(state, state_dir / "cached_reference.pt")
        for callback in self._unlearning_callbacks():
            callback.save(self, state_dir)


class UnlearningTrainer(UnlearningTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that unlearns with any registered objective and reference strategy.

    ``UnlearningTrainer(model, args, forget_dataset=..., retain_dataset=..., objective="npo_gd",
    objective_params={"beta": 0.1}, reference="auto", processing_class=tokenizer)``; see
    :class:`UnlearningTrainerMixin` for the arguments and the module docstring for how it works.
    """


__all__ = [
    "IndexedDataset",
    "SaliencyCallback",
    "UnlearningCallback",
    "UnlearningEvalCallback",
    "UnlearningTrainer",
    "UnlearningTrainerMixin",
]
