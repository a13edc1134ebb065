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


def make_cfg(model_path: str, **over) -> "OmegaConf":
    """A complete run config (the groups the training engine reads), with dotted overrides."""
    base = {
        "task": "chat", "seed": 0, "resume": "none", "monitor": "val/loss", "monitor_mode": "min",
        "model": {"name": "small", "path": str(model_path), "tiny_layout": "grouped", "dtype": "auto",
                  "mask_image_logits": False, "z_loss_weight": 1e-4, "dropout": 0.0, "loss_chunk_size": 16,
                  "attn_implementation": "sdpa", "activation_checkpointing": False, "zero_image_lm_head": False},
        "data": {"batch_size": 4, "eval_batch_size": 4, "max_length": 64},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "attention",
                 "modules_to_save": [], "train_image_rows": False},
        "optim": {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "no_decay_lora_b": False,
                  "scheduler": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "grad_clip": 1.0},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": None, "max_steps": 6,
                    "max_epochs": None, "accumulate_grad_batches": 1, "val_check_interval": None,
                    "check_val_every_n_epoch": None, "limit_val_batches": None, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0, "deterministic": False},
        "strategy": {"name": "auto", "data_parallel_size": "auto", "process_group_backend": None},
        "checkpoint": {"every_n_steps": 100, "keep_last": 2, "export_adapter_each": False},
        "logger": {"tensorboard": False, "csv": True, "wandb": False, "wandb_project": "x"},
    }
    cfg = OmegaConf.create(base)
    for k, v in over.items():
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
        else:
            bs = LengthGroupedBatchSampler([len(s["input_ids"]) for s in train], global_batch // world_size,
                                           seed=int(cfg.seed), num_replicas=world_size, rank=rank, group_size=2)
        vbs = GlobalBatchSampler(n_val, 4, seed=0, num_replicas=world_size, rank=rank)
        vbs._batches = lambda v=vbs: [list(range(s, s + 4))[v.rank * (4 // v.num_replicas):(v.rank + 1) * (4 // v.num_replicas)]
                                      for s in range(0, n_val, 4)]
        return (ResumableDataLoader(train, batch_sampler=bs, collate_fn=collate),
                torch.utils.data.DataLoader(val, batch_sampler=vbs, collate_fn=collate, generator=private_generator(0)))

    return factory
