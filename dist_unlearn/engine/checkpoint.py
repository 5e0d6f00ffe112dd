"""DeepSpeed checkpoints written atomically: ``step_000010.tmp/`` is filled by every rank, then renamed
to ``step_000010/`` by rank 0 once all ranks are done. A crash mid-write leaves only a ``.tmp``
directory, which loading ignores, so the previous checkpoint stays intact and readable."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from dist_unlearn.distributed.env import barrier, get_rank
from dist_unlearn.io import move_into_place, staging_path

CHECKPOINT_TAG = "state"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(engine: Any, root: str | Path, step: int, client_state: dict[str, Any], keep: int = 2) -> Path:
    """Save the engine (model, optimizer, scheduler, ``client_state``) as ``root/step_NNNNNN``.

    Collective: every rank must call it. Returns the final directory. Keeps the newest ``keep``.
    """
    root = Path(root)
    final = root / checkpoint_dir_name(step)
    staging = staging_path(final)
    if get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(staging), tag=CHECKPOINT_TAG, client_state=client_state, save_latest=False)
    barrier()
    if get_rank() == 0:
        move_into_place(staging, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``.tmp`` leftovers are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


_QUANT_STATE_KEY = re.compile(
    r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|nested_offset|offset|quant_state\..+)$|\.(SCB|weight_format)$"
)
"""State-dict entries bitsandbytes writes beside a quantized weight (its quantization state): saved with
the module, not parameters, and not accepted back by ``load_state_dict`` of an already quantized model."""


def _load_module_state(src: dict[str, Any], dst: Any) -> None:
    """DeepSpeed's module load, strict, except for bitsandbytes' quantization-state entries (the frozen
    quantized base is the same one the model was loaded with; its packed weights are loaded as usual)."""
    kept = {k: v for k, v in src.items() if not _QUANT_STATE_KEY.search(k)}
    result = dst.load_state_dict(kept, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {list(result.missing_keys)[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )


def load_checkpoint(engine: Any, directory: str | Path) -> dict[str, Any]:
    """Restore the engine from a directory written by :func:`save_checkpoint`; returns client state."""
    path, client_state = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, custom_load_fn=_load_module_state)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint with tag '{CHECKPOINT_TAG}' in {directory}")
    return dict(client_state or {})
