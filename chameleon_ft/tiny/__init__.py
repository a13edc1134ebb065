"""The embedded tiny Chameleon checkpoint, built on first use into the cache, and the run's base checkpoint.

``python -m chameleon_ft.tiny OUT_DIR [--layout grouped|expanded] [--seed N]`` writes one anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from chameleon_ft.model.assets import CheckpointAssets
from chameleon_ft.paths import cache_root
from chameleon_ft.tiny.build import IMAGE_SIZE, TINY_VERSION, build_tiny_checkpoint

__all__ = ["IMAGE_SIZE", "TINY_VERSION", "build_tiny_checkpoint", "resolve_checkpoint", "tiny_checkpoint"]


def tiny_checkpoint(layout: str = "grouped", seed: int = 0) -> Path:
    """Path of the cached tiny checkpoint, built on first use (safe across concurrent processes).

    The expanded layout is converted from the grouped build, so both hold the same model.
    """
    from filelock import FileLock

    from chameleon_ft.model.checkpoint import convert_checkpoint

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"tiny-v{TINY_VERSION}-seed{seed}-{layout}"
    with FileLock(str(path) + ".lock"):
        if not (path / "config.json").exists():
            if layout == "grouped":
                build_tiny_checkpoint(path, layout=layout, seed=seed)
            else:
                convert_checkpoint(tiny_checkpoint("grouped", seed), path, layout, max_shard_bytes=4 * 2**20)
    return path


def resolve_checkpoint(path: str | os.PathLike | None, tiny_layout: str = "grouped") -> CheckpointAssets:
    """A run's base checkpoint: ``path`` (``model.path``), or the embedded tiny one when it is None."""
    return CheckpointAssets.open(tiny_checkpoint(tiny_layout) if path is None else path)
