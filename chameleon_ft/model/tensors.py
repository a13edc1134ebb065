"""Tensor plumbing shared by training, export and generation: dtype names and DTensor gathering."""

from __future__ import annotations

import torch

from chameleon_ft.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str = "cpu", *, what: str = "dtype") -> torch.dtype:
    """A dtype by name; ``auto`` is bfloat16 on a GPU and float32 elsewhere. ``what`` names the setting in errors."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"{what}={name!r}: use auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first GPU when CUDA is available, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` gathered from every rank when it is an FSDP2 ``DTensor`` (a collective), else ``t`` itself."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def nonfinite_summary(t: torch.Tensor) -> str | None:
    """``"3 NaN, 1 inf of 4096 values"`` when floating ``t`` holds NaN or infinity, else None."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN, {inf} inf of {t.numel()} values"


def first_nonfinite(tensors) -> tuple[str, str] | None:
    """``(name, summary)`` of the first tensor of the mapping ``tensors`` holding NaN or infinity, or None."""
    for name, t in tensors.items():
        bad = nonfinite_summary(t)
        if bad is not None:
            return name, bad
    return None
