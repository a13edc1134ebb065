"""Build the model to train: load the base, attach adapters, set dtypes, optionally shard.

Two paths, same result:
- plain (single device / DDP): :func:`chameleon_ft.model.load_model` (meta-init + tensor assignment).
- sharded (FSDP2): the model is built on the meta device, wrapped (PEFT, image rows), sharded with
  ``fully_shard``, then materialised with ``to_empty``; every base tensor is then read from the
  safetensors files one at a time and each rank keeps only its own shard
  (``distribute_tensor(..., src_data_rank=None)`` slices locally, no communication). No rank ever holds
  more than one full tensor beside its shards.
New LoRA weights are initialised from a generator seeded by ``(seed, name)`` on the full shape, and
image-token deltas from their base rows, so both paths and every world size start from identical weights.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from chameleon_ft.adapter import attach_adapters, base_model, base_weight_name, clean_name, reset_token_deltas_
from chameleon_ft.adapter.attach import TOKEN_DELTA, zero_image_lm_head_
from chameleon_ft.errors import CheckpointError
from chameleon_ft.model.attention import check_trainable, resolve_attn_implementation
from chameleon_ft.model.checkpoint import (
    check_stored_dtypes,
    iter_tensors,
    load_config,
    load_model,
    tensor_shapes,
    to_layout,
)
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from chameleon_ft.model.tensors import resolve_dtype
from chameleon_ft.vq.vqgan import VQ_PREFIX

log = logging.getLogger(__name__)


def resolve_base_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Dtype of the frozen base: ``auto`` is bf16 on GPU, fp32 on CPU."""
    return resolve_dtype(dtype, device, what="model.dtype")


def config_overrides(model_cfg) -> dict:
    """The fine-tuning options of ``model_cfg`` that are set on the checkpoint's ``ChameleonConfig``."""
    return dict(
        mask_image_logits=model_cfg.mask_image_logits,
        z_loss_weight=model_cfg.z_loss_weight,
        dropout=model_cfg.dropout,
        loss_chunk_size=model_cfg.loss_chunk_size,
    )


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{clean_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def new_parameter_value(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Initial value (fp32, CPU, full shape) of a parameter that is not in the base checkpoint.

    LoRA A: Kaiming-uniform (a=sqrt(5)), PEFT's default; LoRA B: zeros. (Image-token deltas start from
    their base rows: :func:`chameleon_ft.adapter.reset_token_deltas_`.)
    """
    if ".lora_A." in name:
        gen = torch.Generator().manual_seed(_name_seed(seed, name))
        bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        return (torch.rand(shape, generator=gen, device="cpu") * 2 - 1) * bound
    if ".lora_B." in name or ".lora_embedding_B" in name:
        return torch.zeros(shape, device="cpu")
    raise CheckpointError(f"parameter {name} is neither in the base checkpoint nor a known adapter weight")


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``param``; for a DTensor only this rank's shard is kept."""
    full = full.to(param.dtype)
    if hasattr(param, "device_mesh"):  # DTensor (FSDP2)
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full.to(param.device))


def _reset_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Recompute non-persistent buffers (rotary frequencies) after ``to_empty``."""
    from transformers.models.chameleon.modeling_chameleon import ChameleonRotaryEmbedding

    lm = base_model(model)
    with torch.device(device):
        fresh = dict(ChameleonRotaryEmbedding(config=config).named_buffers())
    for name, buf in lm.model.rotary_emb.named_buffers():
        buf.copy_(fresh[name])


def init_new_parameters_(model: nn.Module, seed: int) -> None:
    """Initialise every parameter that has no base-checkpoint source (see :func:`new_parameter_value`);
    image-token deltas are set to their (already loaded) base rows."""
    reset_token_deltas_(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if base_weight_name(name) is None and TOKEN_DELTA not in name:
                _copy_into(p, new_parameter_value(name, p.shape, seed))


def set_dtypes_(model: nn.Module, base_dtype: torch.dtype) -> None:
    """Trainable parameters fp32 (so are their grads and Adam state); frozen ones ``base_dtype``."""
    for p in model.parameters():
        if p.is_floating_point():
            want = torch.float32 if p.requires_grad else base_dtype
            if p.dtype != want:
                p.data = p.data.to(want)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (HF's per-layer mechanism).

    The decoder layers are ``GradientCheckpointingLayer``s: transformers recomputes each layer's forward
    during backward, inside the layer, so FSDP2's per-layer hooks gather its parameters for the
    recomputation too. Parameter names are unchanged (no wrapper module).
    """
    model = base_model(model)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.23 has only the old name (deprecated from 5.23 on)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_for_training(model: ChameleonFTForCausalLM, model_cfg, peft_cfg, *, device: torch.device,
                         base_dtype: torch.dtype, seed: int) -> nn.Module:
    """Turn a loaded base model (unsharded) into the model to train: optional zeroed image ``lm_head``
    rows, adapters, fp32 trainable / ``base_dtype`` frozen weights, seeded new weights, activation
    checkpointing. The single-device / DDP half of :func:`build_train_model`."""
    if model_cfg.zero_image_lm_head:
        zero_image_lm_head_(model)
    model = attach_adapters(model, peft_cfg)
    set_dtypes_(model, base_dtype)
    model.to(device)
    init_new_parameters_(model, seed)
    if model_cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def build_train_model(
    model_cfg,
    peft_cfg,
    path: str | Path,
    *,
    device: torch.device,
    base_dtype: torch.dtype,
    seed: int,
    shard_fn: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """The model ready to train: adapters attached, dtypes set, new weights seeded, sharded if asked.

    ``shard_fn`` (FSDP2) selects the meta-device path described in the module docstring. Placement is
    explicit throughout, whatever the ambient default device: Lightning calls ``configure_model`` under
    ``torch.device(root_device)``, which would put CPU-side reads and seeded draws on the GPU.
    """
    with torch.device("cpu"):
        return _build_train_model(model_cfg, peft_cfg, path, device=torch.device(device), base_dtype=base_dtype,
                                  seed=seed, shard_fn=shard_fn)


def _build_train_model(model_cfg, peft_cfg, path, *, device: torch.device, base_dtype: torch.dtype, seed: int,
                       shard_fn) -> nn.Module:
    attn = resolve_attn_implementation(model_cfg.attn_implementation, device.type)
    check_trainable(attn, device.type)
    if shard_fn is None:
        model = load_model(path, dtype=base_dtype, device=device, attn_implementation=attn,
                           **config_overrides(model_cfg))
        return prepare_for_training(model, model_cfg, peft_cfg, device=device, base_dtype=base_dtype, seed=seed)

    path = Path(path)
    config = load_config(path, **config_overrides(model_cfg))
    config._attn_implementation = attn
    with torch.device("meta"):
        model = ChameleonFTForCausalLM(config)
    expected = model.state_dict()
    shapes = {k: v for k, v in tensor_shapes(path).items() if not k.startswith(VQ_PREFIX)}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    check_stored_dtypes(path, expected)
    model.checkpoint_dir = str(path)
    image_ids = model.image_token_ids
    model = attach_adapters(model, peft_cfg)
    set_dtypes_(model, base_dtype)
    if model_cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    model = shard_fn(model)
    model.to_empty(device=device)
    # Which parameters load which checkpoint tensor (PEFT's modules_to_save copies share one).
    targets: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        key = base_weight_name(name)
        if key is not None:
            targets.setdefault(key, []).append(p)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise CheckpointError(f"{path}: model parameters {unknown[:5]} have no tensor in the checkpoint")
    with torch.no_grad():
        for key, full in iter_tensors(path, sorted(targets)):
            full = to_layout(key, full, config, "grouped")
            if model_cfg.zero_image_lm_head and key == "lm_head.weight":
                full[image_ids] = 0
            for p in targets[key]:
                if tuple(p.shape) != tuple(full.shape):
                    raise CheckpointError(f"{path}: {key} has shape {list(full.shape)}, expected {list(p.shape)}")
                _copy_into(p, full)
            del full
        _reset_buffers(model, config, device)
    init_new_parameters_(model, seed)
    return model
