"""Distribution strategies: single device, DDP, and FSDP2 via Lightning's ``ModelParallelStrategy``.

FSDP2: ``fully_shard`` on every decoder layer, then on the root (embeddings, final norm, ``lm_head``
and the fused loss run inside the root's forward, where its parameters are gathered). On GPU the
compute dtype is bf16 and gradients are reduced in fp32. Checkpoints are sharded directories
(``torch.distributed.checkpoint``) holding only what trains when something is frozen; they load at any
world size, and so do single-file checkpoints of single-device/DDP runs (:mod:`.checkpoint_format`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, Strategy
from torch import nn

from chameleon_ft.errors import CheckpointError, ConfigError
from chameleon_ft.training.checkpoint_format import (
    METADATA,
    is_sharded,
    optimizer_parameter_names,
    optimizer_state_by_name,
)

STRATEGIES = ("auto", "single", "ddp", "fsdp")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a (PEFT-wrapped) Chameleon model."""
    from chameleon_ft.adapter import base_model

    return list(base_model(model).model.layers)


def shard_model(model: nn.Module, mesh, *, mixed_precision: bool) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer, then to the root ``model``.

    ``mixed_precision``: gather parameters in bf16 and reduce gradients in fp32 (GPU). Works on meta
    tensors, so it can run before the weights are materialised.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (data parallel only) whose checkpoints hold only the trained tensors.

    Lightning's own loader asks the checkpoint for the full model state and fails when the frozen base
    was left out; here the module's :meth:`checkpoint_keys` decides what is saved and loaded. Every
    rank writes and reads its own shard (``torch.distributed.checkpoint``).
    """

    def setup_environment(self) -> None:
        # Lightning's "auto" data-parallel size is the number of nodes; ours is every process.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()

    def _keys(self) -> set[str] | None:
        fn = getattr(self.lightning_module, "checkpoint_keys", None)
        return fn() if callable(fn) else None

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        keys = self._keys()
        return state if keys is None else {k: v for k, v in state.items() if k in keys}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded checkpoint (DCP reshards it onto this run's ranks) or a single-file one from a
        single-device/DDP run (each rank keeps its shard of the full tensors)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_file():
            return self._load_full_checkpoint(path, weights_only)
        if not is_sharded(path):
            raise FileNotFoundError(f"{path}: not a complete sharded checkpoint (no {METADATA})")
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        module = self.model
        keys = self._keys()
        state = get_model_state_dict(module)
        if keys is not None:
            absent = keys - set(state)
            if absent:
                raise KeyError(f"{path}: model has no parameters {sorted(absent)[:5]}")
            state = {k: v for k, v in state.items() if k in keys}
        load({"state_dict": state}, checkpoint_id=path)
        set_model_state_dict(module, state, options=StateDictOptions(strict=False))
        for i, opt in enumerate(self.optimizers):
            osd = {f"optimizer_{i}": get_optimizer_state_dict(module, opt)}
            load(osd, checkpoint_id=path)
            set_optimizer_state_dict(module, opt, optim_state_dict=osd[f"optimizer_{i}"])
        return torch.load(path / METADATA, weights_only=True if weights_only is None else weights_only)

    def _load_full_checkpoint(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        checkpoint = torch.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only)
        module, keys = self.model, self._keys()
        state = checkpoint["state_dict"]
        if keys is not None:
            missing = sorted(keys - set(state))
            if missing:
                raise CheckpointError(f"{path}: lacks trained tensors {missing[:5]} "
                                      "(was it made with another peft config?)")
            state = {k: v for k, v in state.items() if k in keys}
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(module, state, options=full)
        saved = checkpoint.get("optimizer_states", [])
        if len(saved) != len(self.optimizers):
            raise CheckpointError(f"{path}: {len(saved)} optimizer states for {len(self.optimizers)} optimizers")
        for opt, osd in zip(self.optimizers, saved):
            by_name = optimizer_state_by_name(osd, optimizer_parameter_names(module, opt))
            set_optimizer_state_dict(module, opt, optim_state_dict=by_name, options=full)
        return checkpoint

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # loaded in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass  # loaded in load_checkpoint


def resolve_accelerator(accelerator: str) -> str:
    """``auto`` -> ``gpu`` when CUDA is available, else ``cpu``."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


def build_strategy(strategy_cfg, accelerator: str) -> Strategy | str:
    """Lightning strategy for ``strategy_cfg.name`` (auto | single | ddp | fsdp).

    ``fsdp`` is :class:`FSDP2Strategy` with ``data_parallel_size`` = the number of processes
    (``auto``: all of them) and tensor parallel size 1; gloo on CPU, nccl on GPU unless
    ``process_group_backend`` says otherwise.
    """
    name = str(strategy_cfg.name)
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name={name!r}: unknown; use one of {STRATEGIES}")
    accelerator = resolve_accelerator(accelerator)
    backend = strategy_cfg.process_group_backend or ("gloo" if accelerator == "cpu" else "nccl")
    if name == "auto":
        return "auto"
    if name == "single":
        dev = torch.device("cuda", 0) if accelerator == "gpu" else torch.device("cpu")
        return SingleDeviceStrategy(device=dev)
    if name == "ddp":
        return DDPStrategy(process_group_backend=backend)
    dp = strategy_cfg.data_parallel_size
    return FSDP2Strategy(
        data_parallel_size="auto" if dp in (None, "auto") else int(dp),
        tensor_parallel_size=1,
        process_group_backend=backend,
        save_distributed_checkpoint=True,
    )
