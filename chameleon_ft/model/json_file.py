"""Read the JSON of a checkpoint (files, safetensors headers) with errors that name the source and where
it broke, never its content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parse_json(raw: bytes, where: str, error: type[Exception]) -> Any:
    """Parse UTF-8 JSON ``raw``; non-UTF-8, truncated, malformed or too deeply nested input raises
    ``error`` whose message starts with ``where``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 (invalid byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON, truncated or corrupt ({e.msg} at line {e.lineno} "
                    f"column {e.colno})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to parse") from None


def read_json(path: Path, error: type[Exception]) -> Any:
    """Parse the file ``path`` with :func:`parse_json`; an unreadable file raises ``error`` too."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise error(f"{path}: not found") from e
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from e
    return parse_json(raw, str(path), error)
