"""``chameleon-ft recipe=NAME [key=value ...]`` (or ``python -m chameleon_ft``): one training run, or a sweep with ``-m``."""

from __future__ import annotations

from chameleon_ft.cli import Command
from chameleon_ft.cli import main as run_command


def train_command(cfg) -> float | None:
    """Train; return ``cfg.monitor``'s final value, for Hydra sweepers to optimise."""
    import logging

    from chameleon_ft.training.train import train

    # Lightning prints through its own handler; without this Hydra's root handler prints it again.
    logging.getLogger("lightning.pytorch").propagate = False
    return train(cfg).get(cfg.monitor)


TRAIN = Command(prog="chameleon-ft", module="chameleon_ft", config_name="config", run=train_command, hydra_app=True,
                summary="Fine-tune Chameleon (LoRA or full) on a recipe: a model, a data set, an adapter, a trainer.")


def main() -> float | None:
    return run_command(TRAIN)


if __name__ == "__main__":
    main()
