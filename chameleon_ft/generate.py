"""``chameleon-ft-generate mode=text|image input=FILE [adapter=DIR] [key=value ...]``
(or ``python -m chameleon_ft.generate ...``).

See :class:`chameleon_ft.generation.config.GenerateConfig` for the keys and
:mod:`chameleon_ft.generation.command` for what is written.
"""

from __future__ import annotations

from chameleon_ft.cli import Command
from chameleon_ft.cli import main as run_command


def generate_command(cfg):
    from chameleon_ft.generation.command import run

    path = run(cfg)
    print(f"wrote {path}")
    return path


GENERATE = Command(prog="chameleon-ft-generate", module="chameleon_ft.generate", config_name="generate",
                   run=generate_command,
                   summary="Generate answers, captions or images from a JSONL of requests, with a fine-tuned model.")


def main() -> None:
    run_command(GENERATE)


if __name__ == "__main__":
    main()
