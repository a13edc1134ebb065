"""Grouped q/k LayerNorm of the Lumina-mGPT Chameleon and conversions between the two layouts.

Chameleon was trained with tensor parallelism: each of the ``model_parallel_size`` ranks kept its own
q/k LayerNorm affine, shared by the heads on that rank. Lumina-mGPT stores exactly that,
``[model_parallel_size, head_dim]``; the transformers conversion stores one row per head,
``[num_heads, head_dim]`` (rows equal within a group). Statistics are always per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chameleon_ft.errors import CheckpointError


class QKNormLayoutError(CheckpointError):
    """q/k-norm tensors cannot be converted between layouts (shape mismatch or unequal groups)."""


class GroupedQKNorm(nn.Module):
    """LayerNorm over ``head_dim`` with a ``[groups, head_dim]`` affine expanded to all heads.

    Input is ``[..., num_heads, head_dim]``; group ``g`` covers heads ``g*k .. g*k+k-1`` with
    ``k = num_heads // groups`` (``repeat_interleave`` order, matching the tensor-parallel split).
    """

    def __init__(self, num_heads: int, groups: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        if num_heads % groups:
            raise ValueError(f"num_heads={num_heads} is not divisible by groups={groups}")
        self.num_heads, self.groups, self.head_dim, self.eps = num_heads, groups, head_dim, eps
        self.weight = nn.Parameter(torch.ones(groups, head_dim))
        self.bias = nn.Parameter(torch.zeros(groups, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rep = self.num_heads // self.groups
        x = F.layer_norm(x, (self.head_dim,), None, None, eps=self.eps)
        return x * self.weight.repeat_interleave(rep, dim=0) + self.bias.repeat_interleave(rep, dim=0)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, groups={self.groups}, head_dim={self.head_dim}, eps={self.eps}"


def expand_qk_norm(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Grouped ``[groups, head_dim]`` -> expanded ``[num_heads, head_dim]``."""
    groups = t.shape[0]
    if num_heads % groups:
        raise QKNormLayoutError(f"cannot expand {groups} groups to {num_heads} heads")
    return t.repeat_interleave(num_heads // groups, dim=0)


def group_qk_norm(t: torch.Tensor, groups: int, name: str = "q/k norm") -> torch.Tensor:
    """Expanded ``[num_heads, head_dim]`` -> grouped ``[groups, head_dim]``.

    Refuses (naming ``name`` and the largest in-group difference) unless the rows of each group are
    exactly equal: a silent average would change the model.
    """
    heads, head_dim = t.shape
    if heads % groups:
        raise QKNormLayoutError(f"{name}: {heads} heads are not divisible into {groups} groups")
    blocks = t.reshape(groups, heads // groups, head_dim)
    diff = (blocks - blocks[:, :1]).abs().max().item()
    if diff != 0.0:
        raise QKNormLayoutError(
            f"{name}: rows within a group differ (largest difference {diff:.3g}); this checkpoint is not "
            f"a grouped model with model_parallel_size={groups}, so it cannot be converted without loss"
        )
    return blocks[:, 0].clone()
