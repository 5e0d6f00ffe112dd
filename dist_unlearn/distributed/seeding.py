"""Reproducible seeding: one global seed, derived per-purpose and per-rank seeds."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *names: str | int) -> int:
    """A stable 31-bit seed derived from ``seed`` and any labels (a purpose, a rank, an epoch).

    Uses SHA-256 so that seeds for different purposes are unrelated, unlike ``seed + k``.
    """
    text = ":".join([str(seed), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def rank_seed(seed: int, rank: int, purpose: str = "train") -> int:
    """The seed rank ``rank`` uses for ``purpose`` (distinct across ranks and purposes)."""
    return derive_seed(seed, purpose, rank)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
