"""Write the sentence-transformers module files next to a saved HF encoder, so ``SentenceTransformer(path)`` loads it.

A directory with ``save_pretrained`` output (``config.json``, weights, tokenizer) becomes a sentence-transformers
model by three small JSON files: ``modules.json`` (the pipeline: the HF model, then pooling), the pooling
config under ``1_Pooling/`` and ``sentence_bert_config.json`` (maximum sequence length), plus
``config_sentence_transformers.json`` (the similarity function). The pipeline reproduces
:func:`dist_unlearn.models.encoders.encode_batch` exactly: the encoder's ``last_hidden_state``, masked mean (or
first-token) pooling, no normalisation; the similarity is cosine, as in the contrastive job's losses. Needs no
sentence-transformers at write time (plain JSON in the format of its v2-v6 releases).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_sentence_transformers_files"]


def write_sentence_transformers_files(
    model_dir: str | Path, hidden_size: int, pooling: str = "mean", max_seq_length: int = 256
) -> list[Path]:
    """Add the sentence-transformers files to ``model_dir`` (an HF encoder saved with ``save_pretrained``).

    Args:
        model_dir: the directory holding ``config.json``, the weights and the tokenizer.
        hidden_size: the embedding dimension (the encoder's ``config.hidden_size``).
        pooling: ``"mean"`` (masked mean over tokens) or ``"cls"`` (the first token), as in
            :func:`~dist_unlearn.models.encoders.pool`.
        max_seq_length: inputs longer than this many tokens are truncated (the contrastive job's ``max_length``).

    Returns:
        the files written.

    Raises:
        ValueError: an unknown ``pooling``, or ``model_dir`` without ``config.json``.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise ValueError(f"{root} has no config.json: save the HF model there first (save_pretrained)")
    files = {
        root / "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ],
        root / "sentence_bert_config.json": {"max_seq_length": int(max_seq_length), "do_lower_case": False},
        root / "1_Pooling" / "config.json": {
            "word_embedding_dimension": int(hidden_size),
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
        root / "config_sentence_transformers.json": {"similarity_fn_name": "cosine"},
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    return list(files)
