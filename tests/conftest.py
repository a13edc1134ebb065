import os
from pathlib import Path

import pytest

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
