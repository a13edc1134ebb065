"""``chameleon-ft-merge base=DIR adapter=DIR out=DIR [layout=expanded|grouped] [dtype=...]``
(or ``python -m chameleon_ft.merge ...``).

Merges an adapter into its base checkpoint, streaming; see :mod:`chameleon_ft.export.merge`.
"""

from __future__ import annotations

from chameleon_ft.cli import Command
from chameleon_ft.cli import main as run_command
from chameleon_ft.export.merge import merge

MERGE = Command(prog="chameleon-ft-merge", module="chameleon_ft.merge", config_name="merge", run=merge,
                summary="Merge an adapter into its base checkpoint (streaming), in either q/k-norm layout.")


def main() -> None:
    run_command(MERGE)


if __name__ == "__main__":
    main()
