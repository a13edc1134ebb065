"""``python -m chameleon_ft recipe=NAME [overrides...]``: one training run (or a sweep with ``-m``)."""

from __future__ import annotations

import sys


def main() -> float | None:
    """Hydra entry point; returns ``cfg.monitor``'s final value for Hydra sweepers to optimise."""
    import hydra
    from omegaconf import DictConfig

    from chameleon_ft.config.store import CONF_DIR, ConfigKeyError, check_overrides, register_configs

    try:
        check_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    except ConfigKeyError as e:
        sys.exit(f"error: {e}")
    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> float | None:
        import logging

        from chameleon_ft.training.train import train

        # Lightning prints through its own handler; without this Hydra's root handler prints it again.
        logging.getLogger("lightning.pytorch").propagate = False

        metrics = train(cfg)
        return metrics.get(cfg.monitor)

    return _run()


if __name__ == "__main__":
    main()
