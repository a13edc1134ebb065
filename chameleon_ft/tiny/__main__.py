"""``python -m chameleon_ft.tiny out=DIR [layout=grouped|expanded] [seed=N]``: write a tiny checkpoint."""

from __future__ import annotations

from chameleon_ft.cli import Command
from chameleon_ft.cli import main as run_command
from chameleon_ft.errors import ConfigError


def tiny_command(cfg):
    from chameleon_ft.tiny.build import build_tiny_checkpoint

    if cfg.out is None:
        raise ConfigError("out=DIR is required")
    if cfg.layout not in ("grouped", "expanded"):
        raise ConfigError(f"layout={cfg.layout!r}: choose grouped or expanded")
    path = build_tiny_checkpoint(cfg.out, layout=cfg.layout, seed=int(cfg.seed))
    print(f"tiny Chameleon checkpoint ({cfg.layout} q/k norm) written to {path}")
    return path


TINY = Command(prog="python -m chameleon_ft.tiny", config_name="tiny", run=tiny_command,
               summary="Write the embedded tiny Chameleon checkpoint (the real on-disk layout) to a directory.")

if __name__ == "__main__":
    run_command(TINY)
