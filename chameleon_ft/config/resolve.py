"""Checks and derived values of a composed experiment config, applied before anything loads.

Recipes name a task; what follows from it is filled in here unless the config sets it: the monitored
metric and its mode, and the sample task of formats made for fixed tasks. A task the data format cannot
produce fails here, at compose time, with the valid choices.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from chameleon_ft.data.config import check_data_config
from chameleon_ft.data.errors import DataConfigError
from chameleon_ft.data.formats import get_format
from chameleon_ft.errors import ConfigError
from chameleon_ft.tasks import get_task


def resolve_experiment(cfg: DictConfig) -> DictConfig:
    """A checked copy of ``cfg`` with derived values filled in (idempotent)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    task = get_task(cfg.task)
    fmt = get_format(cfg.data.format)
    if fmt.tasks is not None and task.name not in fmt.tasks:
        raise DataConfigError(f"task={task.name} but data.format={fmt.name} only makes {list(fmt.tasks)} samples; "
                              f"choose a recipe for one of those, or another data format")
    if cfg.data.task == "auto" and fmt.tasks is not None:
        cfg.data.task = task.name
    if cfg.monitor is None:
        cfg.monitor = task.monitor
        if cfg.monitor_mode is None:
            cfg.monitor_mode = task.monitor_mode
    if cfg.monitor_mode is None:
        cfg.monitor_mode = "min" if cfg.monitor.endswith(("loss", "ppl", "perplexity")) else "max"
    if cfg.monitor_mode not in ("max", "min"):
        raise ConfigError(f"monitor_mode={cfg.monitor_mode!r}: choose max or min")
    # Validation draws happen only at the first validation: a bad value must fail before any step.
    if cfg.eval.image_top_k < 1:
        raise ConfigError(f"eval.image_top_k={cfg.eval.image_top_k}: must be >= 1 (2000 keeps every code)")
    if cfg.eval.image_temperature <= 0:
        raise ConfigError(f"eval.image_temperature={cfg.eval.image_temperature}: must be > 0")
    check_data_config(cfg.data)
    return cfg
