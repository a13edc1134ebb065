"""Split names and the deterministic holdout that carves a validation split out of train."""

from __future__ import annotations

import hashlib

from chameleon_ft.data.errors import DataConfigError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val", "test": "test"}


def canonical_split(split: str) -> str:
    """``"validation"``/``"dev"`` -> ``"val"`` etc.; raises on an unknown split name."""
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise DataConfigError(f"unknown split {split!r}; use one of {SPLITS}") from None


def holdout_indices(n: int, fraction: float, seed: int) -> list[int]:
    """Sorted positions (of ``n``) held out for validation: the ``round(n * fraction)`` (at least 1) with the
    smallest ``blake2b(f"{seed}:{i}")``. Independent of library versions and platform."""
    k = max(1, round(n * fraction))
    keys = sorted(range(n), key=lambda i: hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())
    return sorted(keys[:k])
