"""Register the schema, the config groups and the recipes with Hydra; compose configs for code and tests."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from chameleon_ft.config.schema import ExperimentConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
RECIPES_DIR = REPO_ROOT / "recipes"


class ConfigKeyError(KeyError):
    """An override names a key that the schema does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def register_configs() -> None:
    """Schema as ``base_config``; each ``recipes/*.yaml`` as option of group ``recipe`` (package _global_)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=ExperimentConfig)
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def _schema_fields(tp: Any) -> dict[str, Any] | None:
    """Field name -> resolved type of a dataclass, or None for free-form values."""
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp)
    return None


def check_overrides(overrides: list[str]) -> None:
    """Fail fast, listing the valid keys, when a command-line override names an unknown key.

    Hydra's own message ("Key 'lrr' is not in struct") does not say what the valid keys are.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    groups = {"recipe"} | {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for ov in parsed:
        key = ov.key_or_group
        if ov.is_add() or ov.is_force_add() or key.startswith("hydra") or key in groups:
            continue
        node: Any = ExperimentConfig
        parts = key.split(".")
        for depth, part in enumerate(parts):
            fields = _schema_fields(node)
            if fields is None:  # a dict/Any value: free-form below this point
                break
            if part not in fields:
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigKeyError(
                    f"unknown config key '{key}': '{part}' is not a key of {where}; "
                    f"valid keys: {', '.join(sorted(fields))}"
                )
            node = fields[part]


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the config exactly as the CLI does (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides or [])
    check_overrides(overrides)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=False)


def run_with_config(task_fn):
    """Compose the config from the command line exactly as training does and call ``task_fn(cfg)``.

    Unknown keys fail before Hydra starts, listing the valid ones; Hydra then handles ``-m`` sweeps,
    the run directory and logging. Returns what ``task_fn`` returns (for sweepers).
    """
    import sys

    import hydra

    try:
        check_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    except ConfigKeyError as e:
        sys.exit(f"error: {e}")
    register_configs()
    return hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task_fn)()
