"""Export the trained weights of a DeepSpeed engine as a Hugging Face model directory.

Under ZeRO-3 the parameters are partitioned, so the full state dict is gathered first (collective);
rank 0 then writes ``save_pretrained`` output into ``DIR.tmp`` and renames it to ``DIR``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dist_unlearn.distributed.env import barrier, get_rank


def gather_full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full (unpartitioned) state dict on rank 0, ``None`` elsewhere. Collective under ZeRO-3."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = {k: v.detach() for k, v in engine.module.state_dict().items()}
    return state if get_rank() == 0 else None


def export_hf_model(engine: Any, tokenizer: Any, out_dir: str | Path, dtype: torch.dtype) -> Path:
    """Write ``engine.module`` (weights cast to ``dtype``) and ``tokenizer`` to ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    state = gather_full_state_dict(engine)
    if state is not None:
        staging = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        state = {k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in state.items()}
        module = engine.module
        module.config.dtype = dtype
        module.save_pretrained(staging, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    barrier()
    return out_dir
