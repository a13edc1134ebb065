import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Fully offline, and built artefacts (tiny checkpoint, digit PNGs, pre-tokenized data) cached inside the
# checkout so repeated runs are fast and never touch the user's own cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CHAMELEON_FT_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "chameleon_ft"))


@pytest.fixture(scope="session")
def tiny_grouped() -> Path:
    """The embedded tiny checkpoint, grouped q/k norm (built on first use, then cached)."""
    from chameleon_ft.tiny import tiny_checkpoint

    return tiny_checkpoint("grouped")


@pytest.fixture(scope="session")
def tiny_expanded() -> Path:
    """The same tiny model, expanded q/k norm (converted from the grouped build)."""
    from chameleon_ft.tiny import tiny_checkpoint

    return tiny_checkpoint("expanded")


def run_module(module: str, args: list[str], cwd, timeout: int = 600, env: dict | None = None):
    """``python -m <module> <args>`` as a user types it, in ``cwd``; returns the completed process."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
