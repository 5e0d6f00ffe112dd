"""The QA benchmark of a run, from ``data.source``: the embedded fictitious-facts generator, a formatted
benchmark (TOFU, MUSE) or the user's own file."""

from __future__ import annotations

from dist_unlearn.config.schema import FICTITIOUS_SOURCE, DataConfig
from dist_unlearn.data.facts import FactsBenchmark, generate_facts, load_qa_file
from dist_unlearn.data.formats import is_formatted_source, load_formatted


def load_benchmark(data: DataConfig) -> FactsBenchmark:
    """The QA data of a run: the deterministic generator or a local file."""
    if data.source == FICTITIOUS_SOURCE:
        return generate_facts(
            num_people=data.num_people,
            questions_per_person=data.questions_per_person,
            forget_fraction=data.forget_fraction,
            holdout_fraction=data.holdout_fraction,
            seed=data.seed,
        )
    if is_formatted_source(data.source):  # tofu:DIR[@forgetNN] / muse:DIR (or hub names)
        return load_formatted(data.source)
    return load_qa_file(data.source)
