"""AdamW with decay/no-decay parameter groups and a warmup + cosine/constant schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

SCHEDULERS = ("cosine", "constant")


class OptimConfigError(ValueError):
    """The ``optim`` config is inconsistent (unknown scheduler, negative steps, ...)."""


def is_no_decay(name: str, param: torch.Tensor, *, no_decay_lora_b: bool = False) -> bool:
    """Norm weights, biases (and LoRA-B if asked) are not weight-decayed."""
    lname = name.lower()
    if name.endswith(".bias") or param.ndim < 2 or "norm" in lname:
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


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, scheduler: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps; then either
    constant 1, or cosine from 1 down to ``min_lr_ratio`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim_cfg, total_steps: int) -> dict:
    """AdamW + LambdaLR as Lightning's ``configure_optimizers`` dict (scheduler stepped every step)."""
    scheduler = str(optim_cfg.scheduler)
    if scheduler not in SCHEDULERS:
        raise OptimConfigError(f"optim.scheduler={scheduler!r}: unknown; use one of {SCHEDULERS}")
    warmup = int(optim_cfg.warmup_steps)
    if warmup < 0 or total_steps < 1:
        raise OptimConfigError(f"optim.warmup_steps={warmup} and total steps {total_steps} must be >= 0 and >= 1")
    groups = param_groups(model, optim_cfg.weight_decay, no_decay_lora_b=bool(optim_cfg.no_decay_lora_b))
    if not groups:
        raise OptimConfigError("no trainable parameters to optimise")
    betas = tuple(float(b) for b in optim_cfg.betas)
    optimizer = torch.optim.AdamW(groups, lr=float(optim_cfg.lr), betas=betas, eps=float(optim_cfg.eps))
    min_ratio = float(optim_cfg.min_lr_ratio)

    def fn(step: int) -> float:
        return lr_lambda(step, warmup_steps=warmup, total_steps=total_steps, scheduler=scheduler, min_lr_ratio=min_ratio)

    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": LambdaLR(optimizer, fn), "interval": "step", "frequency": 1, "name": "lr"},
    }
