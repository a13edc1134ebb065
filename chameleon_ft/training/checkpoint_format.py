"""One training checkpoint, two formats on disk, loadable under any strategy and world size.

- single file ``step-N.ckpt``: Lightning's own, written by single-device and DDP runs; full tensors,
  optimizer state keyed by parameter index;
- sharded directory ``step-N.ckpt/``: FSDP2's ``torch.distributed.checkpoint`` (DCP) shards (model and
  optimizer state keyed by parameter name) plus Lightning's ``meta.pt`` (loops, schedulers, RNG, ...).

FSDP2 reshards a directory onto any number of ranks itself (DCP), and distributes the full tensors of a
single file (:meth:`chameleon_ft.training.strategy.FSDP2Strategy.load_checkpoint`). Single-device and
DDP runs read a directory as one full checkpoint through :class:`PortableCheckpointIO`. The optimizer's
parameter order is the same in every layout (the same model, the same optimizer construction), so
index and name keys map one to one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from chameleon_ft.errors import CheckpointError

METADATA = "meta.pt"  # Lightning's non-tensor state inside a sharded checkpoint directory
DCP_METADATA = ".metadata"


def is_sharded(path: str | Path) -> bool:
    """A directory written by DCP with Lightning's metadata beside it."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file() and (path / DCP_METADATA).is_file()


def optimizer_state_by_index(state: dict) -> dict:
    """A name-keyed optimizer state dict (DCP's) keyed by parameter index, as ``Optimizer.state_dict()``."""
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    unknown = sorted(set(state["state"]) - set(index))
    if unknown:
        raise CheckpointError(f"optimizer state for parameters in no parameter group: {unknown[:3]}")
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]],
    }


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """An index-keyed optimizer state dict keyed by parameter name; ``names[i]`` names parameter ``i``."""
    order = [i for group in state["param_groups"] for i in group["params"]]
    if len(order) != len(names):
        raise CheckpointError(f"the checkpoint's optimizer has {len(order)} parameters, this run's {len(names)} "
                              "(was it made with another peft config?)")
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }


def optimizer_parameter_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name (in ``module``) of every parameter of ``optimizer``, in the optimizer's order."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def read_sharded_as_full(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint directory as one Lightning checkpoint dict with full tensors (every rank's
    shards joined) and index-keyed optimizer states, for a single-device or DDP run."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    checkpoint = torch.load(path / METADATA, weights_only=True)
    with tempfile.TemporaryDirectory(prefix="chameleon_ft_resume_") as tmp:
        full_path = Path(tmp) / "full.pt"
        dcp_to_torch_save(path, full_path)
        full = torch.load(full_path, weights_only=True)
    checkpoint["state_dict"] = full.pop("state_dict")
    optimizers = sorted((k for k in full if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [optimizer_state_by_index(full[k]) for k in optimizers]
    return checkpoint


class PortableCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that also reads a sharded (FSDP2) checkpoint directory, so a
    single-device or DDP run resumes from it."""

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        if is_sharded(path):
            return read_sharded_as_full(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
