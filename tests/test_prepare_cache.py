"""The embedded-model cache is keyed by everything the preparation reads, the seed included."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import small_run_config
from safetensors.torch import load_file

from dist_unlearn.config import config_from_dict
from dist_unlearn.engine.prepare import prepare_embedded

TINY_PREPARE = {"steps": 2, "batch_size": 4, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "vocab_size": 300}


def _prepare(out: Path, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = config_from_dict(small_run_config(out, None, prepare=TINY_PREPARE, train={"seed": seed}))
    assets = prepare_embedded(cfg, log=lambda *_: None)
    marker = json.loads((out / "embedded" / "prepare.json").read_text())
    return marker, load_file(str(Path(assets.target_dir) / "model.safetensors"))


def test_another_seed_rebuilds_the_models_and_the_same_seed_reuses_them(tmp_path: Path) -> None:
    first, weights_first = _prepare(tmp_path, seed=1)
    again, weights_again = _prepare(tmp_path, seed=1)
    assert again["seconds"] == first["seconds"]  # the cache was reused, not rebuilt
    other, weights_other = _prepare(tmp_path, seed=2)
    assert other["fingerprint"] != first["fingerprint"]
    assert other["config"]["seed"] == 2
    name = "model.embed_tokens.weight"
    assert torch.equal(weights_first[name], weights_again[name])
    assert not torch.equal(weights_first[name], weights_other[name])
