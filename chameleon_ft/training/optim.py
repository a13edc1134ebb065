"""AdamW with decay/no-decay parameter groups and transformers' warmup + cosine/constant schedules."""

from __future__ import annotations

import torch
from torch import nn

from chameleon_ft.errors import ConfigError

SCHEDULERS = ("cosine", "constant")


def is_no_decay(name: str, param: torch.Tensor, *, no_decay_lora_b: bool = False) -> bool:
    """Norm weights, biases, image-token rows (and LoRA-B if asked) are not weight-decayed.

    Image-token rows are trained as replacement rows (PEFT trainable tokens): decaying them would pull the
    embeddings themselves toward zero, not toward the base.
    """
    lname = name.lower()
    if name.endswith(".bias") or param.ndim < 2 or "norm" in lname or "trainable_tokens_delta" in name:
        return True
    return no_decay_lora_b and ".lora_b." in lname


def param_groups(model: nn.Module, weight_decay: float, *, no_decay_lora_b: bool = False) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``decay`` and ``no_decay`` (weight_decay 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_no_decay(name, p, no_decay_lora_b=no_decay_lora_b):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, optim_cfg, total_steps: int) -> dict:
    """AdamW + transformers' warmup schedule (cosine down to ``min_lr_ratio``, or constant) as Lightning's
    ``configure_optimizers`` dict, the scheduler stepped every optimizer step."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    scheduler = str(optim_cfg.scheduler)
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"optim.scheduler={scheduler!r}: unknown; use one of {SCHEDULERS}")
    warmup = int(optim_cfg.warmup_steps)
    if warmup < 0 or total_steps < 1:
        raise ConfigError(f"optim.warmup_steps={warmup} and total steps {total_steps} must be >= 0 and >= 1")
    groups = param_groups(model, optim_cfg.weight_decay, no_decay_lora_b=bool(optim_cfg.no_decay_lora_b))
    if not groups:
        raise ConfigError("no trainable parameters to optimise")
    betas = tuple(float(b) for b in optim_cfg.betas)
    optimizer = torch.optim.AdamW(groups, lr=float(optim_cfg.lr), betas=betas, eps=float(optim_cfg.eps))
    if scheduler == "constant":
        sched = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    else:
        sched = get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup,
                                                            num_training_steps=total_steps,
                                                            min_lr_rate=float(optim_cfg.min_lr_ratio))
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1, "name": "lr"}}
