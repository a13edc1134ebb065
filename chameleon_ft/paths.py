"""Where chameleon-ft caches what it builds (tiny checkpoint, rendered digits, pre-tokenized data)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CHAMELEON_FT_CACHE"


def cache_root() -> Path:
    """``$CHAMELEON_FT_CACHE`` or ``~/.cache/chameleon_ft``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chameleon_ft"
