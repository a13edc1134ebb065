"""A training run in a process of its own, for the multi-process (FSDP) checks.

``python -m tests.gpu.train_worker RUN_DIR OVERRIDES_JSON`` composes the config from the overrides as the
command line does and trains into ``RUN_DIR``. Each rank writes ``RUN_DIR/dtypes_rank<r>.json`` (see
:class:`tests.gpu.checks.DtypeProbe`). Under a multi-process strategy Lightning runs this same command
line again for every other rank.
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    run_dir, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # several CPU ranks share the cores
    from chameleon_ft.config.store import compose
    from chameleon_ft.training.train import train
    from tests.gpu.checks import DtypeProbe

    train(compose(overrides), run_dir, callbacks=[DtypeProbe(run_dir)])


if __name__ == "__main__":
    main()
