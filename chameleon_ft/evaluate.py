"""``chameleon-ft-evaluate recipe=NAME [adapter=DIR] [split=val] [output=FILE] [key=value ...]``
(or ``python -m chameleon_ft.evaluate ...``).

Evaluates a checkpoint (``model.path``, base or merged) with an optional adapter on a split of the
recipe's data, built exactly as the model was trained (see :mod:`chameleon_ft.evaluation.evaluate`).
"""

from __future__ import annotations

import json
import sys

from chameleon_ft.cli import Command
from chameleon_ft.cli import main as run_command


def evaluate_command(cfg) -> dict:
    from chameleon_ft.evaluation.evaluate import evaluate

    explicit = {a.split("=", 1)[0].lstrip("+~") for a in sys.argv[1:] if "=" in a}
    metrics, path = evaluate(cfg, adapter=cfg.adapter, split=cfg.split, output=cfg.output, explicit=explicit)
    print(json.dumps(metrics, indent=2))
    print(f"metrics written to {path}")
    return metrics


EVALUATE = Command(prog="chameleon-ft-evaluate", module="chameleon_ft.evaluate", config_name="evaluate",
                   run=evaluate_command,
                   summary="Evaluate a model (+ adapter) on a split of a recipe's data; the task's metrics as JSON.")


def main() -> None:
    run_command(EVALUATE)


if __name__ == "__main__":
    main()
