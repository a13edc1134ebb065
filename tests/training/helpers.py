"""Small checkpoints, configs, token datasets and samplers for the training-engine tests."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from chameleon_ft.data.collator import ConversationCollator
from chameleon_ft.data.sampler import LengthGroupedBatchSampler
from chameleon_ft.model.checkpoint import save_state_dict
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.training.dataloading import ResumableDataLoader, private_generator
from tests.model.helpers import randomize_, small_config


def small_checkpoint(out_dir: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A random small Chameleon checkpoint on disk (real file layout, grouped q/k norm)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    cfg = small_config(layers=layers, hidden=hidden)
    torch.manual_seed(seed)
    model = randomize_(ChameleonFTForCausalLM(cfg), seed=seed)
    save_state_dict(model.state_dict(), cfg, out_dir, max_shard_bytes=60_000)
    return out_dir


# What the engine tests change from the schema's defaults: a small model, few fast steps on the CPU.
SMALL_RUN = {
    "task": "chat", "monitor": "val/loss", "monitor_mode": "min",
    "model.mask_image_logits": False, "model.z_loss_weight": 1e-4, "model.loss_chunk_size": 16,
    "data.format": "jsonl", "data.batch_size": 4, "data.eval_batch_size": 4, "data.max_length": 64,
    "peft.r": 4, "peft.alpha": 8, "peft.dropout": 0.0, "peft.target_modules": "attention",
    "optim.lr": 1e-2, "optim.weight_decay": 0.1, "optim.warmup_steps": 2,
    "trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.max_steps": 6, "trainer.log_every_n_steps": 1,
    "trainer.enable_progress_bar": False,
    "logger.tensorboard": False,
}


def make_cfg(model_path: str, **over) -> "OmegaConf":
    """A complete run config built from the schema (every key, typed and checked), with the small-run
    settings and dotted overrides applied; a mistyped key fails as it would on the command line."""
    from chameleon_ft.config.schema import ExperimentConfig

    cfg = OmegaConf.structured(ExperimentConfig)
    for k, v in {**SMALL_RUN, "model.path": str(model_path), **over}.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def token_samples(model_path: str | Path, n: int, seed: int = 0, min_len: int = 6, max_len: int = 24) -> list[dict]:
    """Random conversations: text and image ids, labels on the second half (varying target counts)."""
    tokens = ChameleonTokens.from_checkpoint(model_path)
    cfg = small_config()
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(10, vocab, (length,), generator=gen)
        ids[0] = tokens.bos
        labels = ids.clone()
        cut = int(torch.randint(2, length - 1, (1,), generator=gen))
        labels[:cut] = -100
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


class GlobalBatchSampler:
    """Fixed global batches (seeded order per epoch); rank ``r`` of ``w`` takes its contiguous slice.

    Stateful like the data package's sampler (``set_epoch``, ``resume_at``, ``state_dict``), so runs
    with different world sizes see exactly the same global batches.
    """

    def __init__(self, n: int, global_batch: int, *, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        assert global_batch % num_replicas == 0
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self._start = 0, 0

    def _batches(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist()
        per = self.global_batch // self.num_replicas
        out = []
        for s in range(0, self.n - self.global_batch + 1, self.global_batch):
            g = order[s : s + self.global_batch]
            out.append(g[self.rank * per : (self.rank + 1) * per])
        return out

    def __len__(self):
        return len(self._batches())

    def __iter__(self):
        batches = self._batches()
        start, self._start = self._start, 0
        yield from batches[start:]
        self.epoch += 1

    def set_epoch(self, epoch):
        self.epoch = epoch

    def resume_at(self, epoch, done):
        self.epoch, self._start = epoch, done

    def state_dict(self):
        return {"epoch": self.epoch, "seed": self.seed}


def loader_factory(n_train: int = 48, n_val: int = 8, global_batch: int = 8, sampler: str = "global"):
    """A ``loader_factory`` for :func:`chameleon_ft.training.train.train` over random token samples."""

    def factory(cfg, model_path, *, world_size, rank, run_dir=None):
        tokens = ChameleonTokens.from_checkpoint(model_path)
        collate = ConversationCollator(pad_id=tokens.pad, max_length=64)
        train = token_samples(model_path, n_train, seed=1)
        val = token_samples(model_path, n_val, seed=2)
        if sampler == "global":
            bs = GlobalBatchSampler(n_train, global_batch, seed=int(cfg.seed), num_replicas=world_size, rank=rank)
        else:  # the global batch is fixed; devices x accumulation split it
            accumulation = int(cfg.trainer.accumulate_grad_batches)
            per_device = global_batch // (world_size * accumulation)
            bs = LengthGroupedBatchSampler([len(s["input_ids"]) for s in train], per_device, seed=int(cfg.seed),
                                           num_replicas=world_size, rank=rank, group_size=2, accumulation=accumulation)
        vbs = GlobalBatchSampler(n_val, 4, seed=0, num_replicas=world_size, rank=rank)
        vbs._batches = lambda v=vbs: [list(range(s, s + 4))[v.rank * (4 // v.num_replicas):(v.rank + 1) * (4 // v.num_replicas)]
                                      for s in range(0, n_val, 4)]
        return (ResumableDataLoader(train, batch_sampler=bs, collate_fn=collate),
                torch.utils.data.DataLoader(val, batch_sampler=vbs, collate_fn=collate, generator=private_generator(0)))

    return factory
