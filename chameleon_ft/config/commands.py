"""The typed config of each command, by the config name it is composed under."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from chameleon_ft.config.schema import ExperimentConfig
from chameleon_ft.export.merge import MergeConfig
from chameleon_ft.generation.config import GenerateConfig


@dataclass
class EvaluateConfig(ExperimentConfig):
    """The experiment config (a recipe chooses task and data) plus what to evaluate and where to write."""

    adapter: Optional[str] = None  # adapter directory (<run dir>/adapter); None: the model alone
    split: str = "val"  # train | val | test
    output: Optional[str] = None  # metrics JSON; None: eval-<split>.json beside the adapter (or here)


@dataclass
class TinyConfig:
    """``python -m chameleon_ft.tiny out=DIR``: write the embedded tiny checkpoint somewhere."""

    out: Optional[str] = None
    layout: str = "grouped"  # grouped | expanded
    seed: int = 0


COMMAND_SCHEMAS: dict[str, type] = {
    "config": ExperimentConfig,
    "evaluate": EvaluateConfig,
    "generate": GenerateConfig,
    "merge": MergeConfig,
    "tiny": TinyConfig,
}
