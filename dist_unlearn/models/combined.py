"""Models whose deployed form combines two causal LMs, and the one loader that every scorer uses.

**Logit difference** (ULD: Ji et al. 2024, "Reversing the Forget-Retain Objectives: An Efficient LLM
Unlearning Framework from Logit Difference", arXiv:2406.08607, its "logit subtraction"): the unlearned
model's next-token logits are ``z = z_target − α·z_assistant`` and its distribution is ``softmax(z)``, so its token
log-probabilities are ``log_softmax(z_target − α·z_assistant)``. (The authors' code can also restrict the
subtraction to tokens the target finds likely, a DoLa-style "relative top" filter; that option is not
implemented here, the subtraction applies to the whole vocabulary.)

:class:`LogitDifferenceLM` is that model as a module every metric scores unchanged: ``forward`` returns a
``CausalLMOutput`` with the combined logits, ``generate`` decodes greedily or by sampling from them, and
for the memory-lean scorers (:mod:`dist_unlearn.models.chunked_lm`) it looks like a causal LM whose
"decoder" yields both models' final hidden states side by side ``[b, T, H_t + H_a]`` and whose output head
maps them to ``head_t(h_t) − α·head_a(h_a)``. The two members may be plain modules, PEFT models or
DeepSpeed engines (the assistant while it trains).

**Inference spec**: a saved model directory may hold ``inference.json`` saying how it is deployed
(``{"kind": "logit_difference", "target": DIR, "alpha": α, ...}``, the directory itself being the
assistant). :func:`load_scoring_model` reads it and returns the model to score: the combination when
the spec is there, else the plain causal LM. Objectives write the spec (``inference_spec``); evaluation,
attacks and reports never look at method names.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from dist_unlearn.io import write_json_atomic
from dist_unlearn.models.chunked_lm import _gathered_linear, _is_partitioned, forward_hidden, output_head, unwrap_model

INFERENCE_SPEC = "inference.json"
"""File in a saved model directory that says how the directory's weights are deployed."""

LOGIT_DIFFERENCE = "logit_difference"


def logit_difference(target_logits: torch.Tensor, assistant_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """``z_target − α·z_assistant`` (any matching shapes, e.g. ``[b, T, V]``), in the wider of the two dtypes
    and at least fp32."""
    dtype = torch.promote_types(torch.promote_types(target_logits.dtype, assistant_logits.dtype), torch.float32)
    return target_logits.to(dtype) - alpha * assistant_logits.to(dtype)


def _apply_head(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``head(h)`` in the head's dtype; a frozen ZeRO-3-partitioned head through a gathered weight copy."""
    params = list(head.parameters())
    if params and _is_partitioned(head) and not any(p.requires_grad for p in params):
        return _gathered_linear(head, h)
    return head(h.to(params[0].dtype) if params else h)


class _PairBody(torch.nn.Module):
    """Runs both members; ``last_hidden_state`` = their final hidden states concatenated on the last dim."""

    def __init__(self, target: torch.nn.Module, assistant: torch.nn.Module) -> None:
        super().__init__()
        self.target, self.assistant = target, assistant

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if attention_mask is None:
            batch["attention_mask"] = torch.ones_like(input_ids)
        ht = forward_hidden(self.target, batch).final
        ha = forward_hidden(self.assistant, batch).final
        dtype = torch.promote_types(torch.promote_types(ht.dtype, ha.dtype), torch.float32)
        return BaseModelOutput(last_hidden_state=torch.cat([ht.to(dtype), ha.to(dtype)], dim=-1))


class _DifferenceHead(torch.nn.Module):
    """``h = [h_t, h_a]`` (``[..., H_t + H_a]``) → ``head_t(h_t) − α·head_a(h_a)`` (``[..., V]``)."""

    def __init__(self, target: torch.nn.Module, assistant: torch.nn.Module, alpha: float) -> None:
        super().__init__()
        self.target_head, self.assistant_head = output_head(target), output_head(assistant)
        self.alpha = float(alpha)
        self.target_width = _hidden_size(target)
        self.out_features = int(getattr(self.target_head, "out_features", 0) or 0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ht, ha = h[..., : self.target_width], h[..., self.target_width :]
        return logit_difference(_apply_head(self.target_head, ht), _apply_head(self.assistant_head, ha), self.alpha)


def _hidden_size(model: torch.nn.Module) -> int:
    inner = unwrap_model(model)
    while hasattr(inner, "get_base_model") and inner is not inner.get_base_model():  # PEFT
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(output_head(model), "in_features", None)
    if not size:
        raise ValueError(f"cannot tell the hidden size of {type(inner).__name__} (no config.hidden_size)")
    return int(size)


def _cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` (transformers ≥ 5.x) or ``past_key_values``: the key/value-cache argument and output field."""
    inner = model
    while hasattr(inner, "get_base_model") and inner is not inner.get_base_model():  # PEFT
        inner = inner.get_base_model()
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


class LogitDifferenceLM(torch.nn.Module):
    """The causal LM with logits ``z_target − α·z_assistant`` (see the module docstring; ULD's unlearned model).

    Args:
        target: the model to unlearn from (frozen in ULD).
        assistant: the model whose knowledge is subtracted (ULD's assistant, trained to remember D_f).
        alpha: weight of the assistant's logits.

    ``forward(input_ids, attention_mask, logits_to_keep=0)`` → ``CausalLMOutput(logits [b, T, V])`` (the
    last ``logits_to_keep`` positions when > 0). Both members run under the caller's grad mode; training
    it (the relearning attack) trains both.
    """

    base_model_prefix = "pair"

    def __init__(self, target: torch.nn.Module, assistant: torch.nn.Module, alpha: float) -> None:
        super().__init__()
        self.pair = _PairBody(target, assistant)
        self.head = _DifferenceHead(target, assistant, alpha)
        self.alpha = float(alpha)

    @property
    def target(self) -> torch.nn.Module:
        return self.pair.target

    @property
    def assistant(self) -> torch.nn.Module:
        return self.pair.assistant

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> CausalLMOutput:
        h = self.pair(input_ids, attention_mask).last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return CausalLMOutput(logits=self.head(h))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        num_return_sequences: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        synced_gpus: bool = False,
        **unused: Any,
    ) -> torch.Tensor:
        """Greedy (``do_sample=False``) or sampled (``softmax(z/temperature)``, whole vocabulary) decoding
        from the combined logits, with both members' key/value caches; returns ``[b·n, T + new]`` like
        ``transformers``' ``generate`` (rows that reached ``eos_token_id`` continue with ``pad_token_id``).
        ``synced_gpus`` (members ZeRO-3-partitioned over the ranks, so every forward is collective): stop
        only when every rank's rows have ended.

        Raises:
            ValueError: an option it does not implement (``top_k > 0``, ``top_p < 1``, other keywords).
        """
        if unused or (do_sample and (top_k or top_p < 1.0)):
            raise ValueError(
                "LogitDifferenceLM.generate supports max_new_tokens, num_return_sequences, do_sample, temperature, "
                f"pad_token_id and eos_token_id (top_k=0, top_p=1); got {sorted(unused) or [top_k, top_p]}"
            )
        ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
        mask = (
            torch.ones_like(ids)
            if attention_mask is None
            else attention_mask.repeat_interleave(num_return_sequences, dim=0)
        )
        members = [unwrap_model(self.target), unwrap_model(self.assistant)]
        keys = [_cache_keyword(lm) for lm in members]
        caches: list[Any] = [None, None]
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        step_ids = ids
        for _ in range(max_new_tokens):
            logits = []
            for i, lm in enumerate(members):
                out = lm(input_ids=step_ids, attention_mask=mask, use_cache=True, **{keys[i]: caches[i]})
                caches[i] = out[keys[i]]
                logits.append(out.logits[:, -1])
            z = logit_difference(logits[0], logits[1], self.alpha)
            if do_sample:
                nxt = torch.multinomial(torch.softmax(z / temperature, dim=-1), 1).squeeze(-1)
            else:
                nxt = z.argmax(dim=-1)
            if pad_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step_ids = nxt[:, None]
            if eos_token_id is not None:
                finished |= nxt == eos_token_id
                if _all_ranks_done(bool(finished.all()), synced_gpus, ids.device):
                    break
        return ids


def _all_ranks_done(done: bool, synced: bool, device: torch.device) -> bool:
    """``done`` on this rank (and, when ``synced``, on every rank of the process group)."""
    if not synced or not torch.distributed.is_initialized():
        return done
    flag = torch.tensor([1.0 if done else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


# --- inference spec and the one loader ----------------------------------------------------------


def write_inference_spec(model_dir: str | Path, spec: dict[str, Any]) -> Path:
    """Write ``MODEL_DIR/inference.json`` (temporary name, then rename); returns its path."""
    return write_json_atomic(Path(model_dir) / INFERENCE_SPEC, spec)


def read_inference_spec(model_dir: str | Path) -> dict[str, Any] | None:
    """The spec saved in ``model_dir`` (``None`` for a plain model directory or a hub name)."""
    path = Path(model_dir) / INFERENCE_SPEC
    return json.loads(path.read_text()) if path.is_file() else None


def combine(
    trained: torch.nn.Module, spec: dict[str, Any] | None, load: Callable[[str], torch.nn.Module]
) -> torch.nn.Module:
    """The deployed model of ``trained`` weights under ``spec``: ``trained`` itself without a spec, else
    :class:`LogitDifferenceLM` (``load(spec["target"])`` − α·``trained``).

    Raises:
        ValueError: a spec of an unknown kind.
    """
    if spec is None:
        return trained
    if spec.get("kind") != LOGIT_DIFFERENCE:
        raise ValueError(f"{INFERENCE_SPEC}: unknown kind {spec.get('kind')!r}; known: {LOGIT_DIFFERENCE}")
    return LogitDifferenceLM(load(spec["target"]), trained, float(spec["alpha"]))


def load_scoring_model(model_dir: str | Path, load: Callable[[str], torch.nn.Module] | None = None) -> torch.nn.Module:
    """The model evaluation scores for the saved directory ``model_dir``: ``load(model_dir)`` (default:
    fp32, eager attention), combined as its ``inference.json`` says (the target loaded with the same
    ``load``, e.g. quantized for the quantization attacks). In eval mode."""
    if load is None:
        from dist_unlearn.models.loading import load_causal_lm

        def load(path: str) -> torch.nn.Module:
            return load_causal_lm(path, torch.float32, "eager")

    model = combine(load(str(model_dir)), read_inference_spec(model_dir), load)
    model.eval()  # (a DeepSpeedEngine's eval returns None)
    return model
