"""``python -m chameleon_ft recipe=NAME [overrides...]``: one training run (or a sweep with ``-m``)."""

from __future__ import annotations


def _train(cfg) -> float | None:
    import logging

    from chameleon_ft.training.train import train

    # Lightning prints through its own handler; without this Hydra's root handler prints it again.
    logging.getLogger("lightning.pytorch").propagate = False
    metrics = train(cfg)
    return metrics.get(cfg.monitor)


def main() -> float | None:
    """Hydra entry point; returns ``cfg.monitor``'s final value for Hydra sweepers to optimise."""
    from chameleon_ft.config.store import run_with_config

    return run_with_config(_train)


if __name__ == "__main__":
    main()
