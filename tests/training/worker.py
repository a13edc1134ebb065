"""A training run in its own process(es), for the FSDP and kill-and-resume tests.

``python tests/training/worker.py RUN_DIR CHECKPOINT_DIR JSON_OVERRIDES [--sampler global|length] [--delay S]
[--global-batch N]``.
Under FSDP Lightning re-runs this same command line for every other rank. Each rank writes
``RUN_DIR/rank<r>.json`` with its local/global parameter sizes.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from chameleon_ft.training.train import train  # noqa: E402
from tests.training.helpers import loader_factory, make_cfg  # noqa: E402


class ShardReport(Callback):
    def __init__(self, run_dir: Path, delay: float):
        self.run_dir, self.delay = run_dir, delay

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.run_dir / "batches.txt", "a") as f:
            f.write(f"{trainer.global_step} {int(batch['input_ids'].sum())} {trainer.global_rank}\n")

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.delay:
            time.sleep(self.delay)

    def on_train_end(self, trainer, pl_module):
        pl_module.reshard()
        sizes = {"trainable_local": 0, "trainable_global": 0, "all_local": 0, "all_global": 0}
        for p in pl_module.parameters():
            local = p.to_local().numel() if hasattr(p, "to_local") else p.numel()
            sizes["all_local"] += local
            sizes["all_global"] += p.numel()
            if p.requires_grad:
                sizes["trainable_local"] += local
                sizes["trainable_global"] += p.numel()
        (self.run_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(sizes))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("checkpoint")
    ap.add_argument("overrides")
    ap.add_argument("--sampler", default="global")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--global-batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    cfg = make_cfg(args.checkpoint, **json.loads(args.overrides))
    train(cfg, run_dir, loader_factory=loader_factory(sampler=args.sampler, global_batch=args.global_batch),
          callbacks=[ShardReport(run_dir, args.delay)])


if __name__ == "__main__":
    main()
