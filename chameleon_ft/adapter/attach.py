"""Attaching adapters to a loaded (or meta-device) model, and the names of what they wrap."""

from __future__ import annotations

import re

import torch
from torch import nn

from chameleon_ft.errors import ConfigError
from chameleon_ft.model.tensors import full_tensor

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_PRESETS = {"attention": ATTENTION, "all_linear": ATTENTION + MLP}
PEFT_METHODS = ("lora", "none")
# The two matrices whose image-token rows train with peft.train_image_rows (module names PEFT targets).
IMAGE_ROW_MODULES = ("embed_tokens", "lm_head")
TOKEN_DELTA = "trainable_tokens_delta"
_WRAPPER_PARTS = re.compile(r"(?:_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod)\.")


def resolve_target_modules(spec) -> str:
    """A PEFT ``target_modules`` regex that only matches linears inside ``model.layers``.

    ``spec`` is a preset name (``attention``, ``all_linear``) or a list of module names
    (``["q_proj", "down_proj"]``). A plain list would also match same-named modules outside the
    decoder, so it is turned into an anchored regex.
    """
    if isinstance(spec, str):
        if spec not in TARGET_PRESETS:
            raise ConfigError(f"peft.target_modules={spec!r}: unknown preset; use one of {sorted(TARGET_PRESETS)} or a list")
        names = TARGET_PRESETS[spec]
    else:
        names = tuple(str(n) for n in spec)
        if not names:
            raise ConfigError("peft.target_modules is an empty list")
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:
            raise ConfigError(f"peft.target_modules: {bad} are not module names")
    alts = "|".join(sorted(set(names)))
    return rf"(?:.*\.)?layers\.\d+\.(?:[^.]+\.)*(?:{alts})"


def base_model(model: nn.Module) -> nn.Module:
    """The ``ChameleonFTForCausalLM`` inside a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def clean_name(name: str) -> str:
    """Drop activation-checkpoint / compile wrapper parts, as ``get_model_state_dict`` does."""
    return _WRAPPER_PARTS.sub("", name)


def base_weight_name(name: str) -> str | None:
    """The stock checkpoint key a (wrapped) model parameter is loaded from; None for adapter parameters.

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` -> ``model.layers.0.self_attn.q_proj.weight``;
    ``base_model.model.lm_head.token_adapter.base_layer.weight`` -> ``lm_head.weight``; LoRA weights and
    token deltas -> None.
    """
    name = clean_name(name)
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    if ".lora_" in name or TOKEN_DELTA in name:
        return None
    name = name.replace(".token_adapter.", ".").replace(".base_layer.", ".").replace(".original_module.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def attach_adapters(model: nn.Module, peft_cfg) -> nn.Module:
    """Make the right parameters trainable and return the (possibly PEFT-wrapped) model.

    ``peft_cfg.method``: ``lora`` wraps the decoder's linears with PEFT LoRA (``r``, ``alpha``, ``dropout``,
    ``target_modules``, ``modules_to_save``), everything else frozen; ``none`` is full fine-tuning (every
    parameter trains) unless ``train_image_rows`` alone is asked for. ``train_image_rows`` trains the
    image-token rows of ``lm_head`` and ``embed_tokens`` with PEFT trainable tokens.
    """
    from peft import LoraConfig, TrainableTokensConfig

    method = str(peft_cfg.method)
    if method not in PEFT_METHODS:
        raise ConfigError(f"peft.method={method!r}: unknown; use one of {PEFT_METHODS}")
    train_rows = bool(getattr(peft_cfg, "train_image_rows", False))
    image_ids = model.image_token_ids.tolist()
    if method == "lora":
        lora = LoraConfig(
            r=int(peft_cfg.r),
            lora_alpha=int(peft_cfg.alpha),
            lora_dropout=float(peft_cfg.dropout),
            target_modules=resolve_target_modules(peft_cfg.target_modules),
            modules_to_save=list(getattr(peft_cfg, "modules_to_save", None) or []) or None,
            trainable_token_indices={m: image_ids for m in IMAGE_ROW_MODULES} if train_rows else None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = _wrap(model, lora)
    elif train_rows:
        model = _wrap(model, TrainableTokensConfig(target_modules=list(IMAGE_ROW_MODULES), token_indices=image_ids))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the peft config leaves no parameter trainable")
    return model


def _wrap(model: nn.Module, config) -> nn.Module:
    """``peft.get_peft_model`` without the deprecation warning PEFT 0.21 triggers itself (it reads
    transformers' deprecated ``is_gradient_checkpointing``), so a default run's console stays quiet."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def token_delta_layers(model: nn.Module) -> list[nn.Module]:
    """PEFT trainable-token layers of ``model`` (they hold ``trainable_tokens_delta``)."""
    return [m for m in model.modules() if hasattr(m, TOKEN_DELTA) and hasattr(m, "base_layer")]


def _fill(t: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``t``; for a DTensor (FSDP2) only this rank's shard is kept."""
    if hasattr(t, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(value.to(t.device), t.device_mesh, t.placements, src_data_rank=None)
        t.to_local().copy_(shard.to_local())
    else:
        t.copy_(value.to(t.device, t.dtype))


def reset_token_deltas_(model: nn.Module) -> None:
    """Set every trainable-token delta (and PEFT's copy of the original rows) to the base rows, PEFT's own
    initial value.

    Needed after the base weights were loaded into a meta-initialised model, where PEFT could not read
    them. Collective under FSDP2 (each base weight is gathered once).
    """
    with torch.no_grad():
        for layer in token_delta_layers(model):
            weight = full_tensor(layer.base_layer.weight)
            for name, delta in layer.trainable_tokens_delta.items():
                rows = weight[torch.as_tensor(layer.token_indices[name], device=weight.device)]
                _fill(delta, rows)
                original = getattr(layer, "trainable_tokens_original", {})
                if name in original:
                    _fill(original[name], rows)


def zero_image_lm_head_(model: nn.Module) -> nn.Module:
    """Zero the image-token rows of ``lm_head`` (Lumina-mGPT's init for image generation), before wrapping."""
    lm = base_model(model)
    with torch.no_grad():
        lm.lm_head.weight[lm.image_token_ids.to(lm.lm_head.weight.device)] = 0
    return model
