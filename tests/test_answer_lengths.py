"""The run's QA examples against ``data.max_length``, checked on the driver before any work: counts
against :func:`encode_qa` itself (what training and scoring feed the model), the warning's numbers and
the refusal of a prompt with no room for an answer."""

from __future__ import annotations

import pytest
from conftest import SMALL_DATA, small_run_config

from dist_unlearn.config import ConfigError, config_from_dict, config_to_dict
from dist_unlearn.data import encode_qa, generate_facts
from dist_unlearn.data.qa import length_fit
from dist_unlearn.engine.job import Job
from dist_unlearn.engine.runner import check_answer_lengths
from dist_unlearn.models.loading import load_tokenizer


def _job(tmp_path, model_dir: str, max_length: int) -> Job:
    cfg = config_to_dict(config_from_dict(small_run_config(tmp_path, model_dir, data={"max_length": max_length})))
    return Job(cfg, "unlearn", "grad_diff", model_dir, str(tmp_path / "grad_diff"))


def test_length_fit_counts_what_encode_qa_cuts(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    items = generate_facts(**SMALL_DATA, seed=0).items
    full = [len(encode_qa(tokenizer, it.question, it.answer, 10_000)["input_ids"]) for it in items]
    limit = sorted(full)[len(full) // 2]  # about half the examples are longer
    fit = length_fit(tokenizer, items, limit)
    cut = sum(len(encode_qa(tokenizer, it.question, it.answer, limit)["input_ids"]) < n for it, n in zip(items, full))
    assert (fit.examples, fit.longest, fit.truncated, fit.prompt_too_long) == (len(items), max(full), cut, None)
    assert 0 < cut < len(items)


def test_cut_answers_warn_with_the_length_that_fits_and_short_prompts_are_refused(tmp_path, tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    items = generate_facts(**SMALL_DATA, seed=0).items
    longest = length_fit(tokenizer, items, 10_000).longest
    lines: list[str] = []
    check_answer_lengths(_job(tmp_path, tiny_dir, longest), log=lambda *a, **_: lines.append(" ".join(a)))
    assert lines == []
    check_answer_lengths(_job(tmp_path, tiny_dir, longest - 1), log=lambda *a, **_: lines.append(" ".join(a)))
    cut = length_fit(tokenizer, items, longest - 1).truncated
    assert lines == [
        f"dist-unlearn: data.max_length={longest - 1} cuts {cut} of {len(items)} answers short (the longest "
        f"example needs {longest} tokens); they are trained on and scored in part. Fix: data.max_length={longest}"
    ]
    with pytest.raises(ConfigError, match=rf"data.max_length \(8\) leaves no room .* Fix: data.max_length={longest}"):
        check_answer_lengths(_job(tmp_path, tiny_dir, 8))
