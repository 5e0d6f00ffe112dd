"""Data: the fictitious-facts benchmark, local QA files and tokenized QA examples."""

from dist_unlearn.data.facts import (
    ATTRIBUTE_NAMES,
    SPLITS,
    FactsBenchmark,
    QAItem,
    generate_facts,
    load_qa_file,
)
from dist_unlearn.data.qa import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    QADataset,
    collate_qa,
    encode_answers,
    encode_qa,
)

__all__ = [
    "ATTRIBUTE_NAMES",
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "SPLITS",
    "FactsBenchmark",
    "QADataset",
    "QAItem",
    "collate_qa",
    "encode_answers",
    "encode_qa",
    "generate_facts",
    "load_qa_file",
]
