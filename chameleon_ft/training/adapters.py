"""What trains: PEFT LoRA on the decoder, full fine-tuning, and Anole-style image-token rows.

Image rows: instead of unfreezing the whole ``lm_head`` / ``embed_tokens`` (65,536 x 4,096 each at 7B,
plus fp32 gradients and Adam state), a small trainable ``delta`` of shape ``[n_image_tokens, hidden]``
is added to the frozen matrix at the image-token rows. The export is the rows only
(:func:`image_row_deltas`); :func:`merge_image_row_deltas` folds them into plain weights.
"""

from __future__ import annotations

import re
import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_PRESETS = {"attention": ATTENTION, "all_linear": ATTENTION + MLP}
PEFT_METHODS = ("lora", "none")
# State-dict names of the image-row deltas (relative to the unwrapped causal LM).
DELTA_KEYS = {"lm_head": "lm_head.image_rows_delta", "embed_tokens": "model.embed_tokens.image_rows_delta"}


class AdapterConfigError(ValueError):
    """The ``peft`` config names an unknown method, preset or target module."""


def resolve_target_modules(spec) -> str:
    """A PEFT ``target_modules`` regex that only matches linears inside ``model.layers``.

    ``spec`` is a preset name (``attention``, ``all_linear``) or a list of module names
    (``["q_proj", "down_proj"]``). A plain list would also match same-named modules outside the
    decoder, so it is turned into an anchored regex.
    """
    if isinstance(spec, str):
        if spec not in TARGET_PRESETS:
            raise AdapterConfigError(
                f"peft.target_modules={spec!r}: unknown preset; use one of {sorted(TARGET_PRESETS)} or a list"
            )
        names = TARGET_PRESETS[spec]
    else:
        names = tuple(str(n) for n in spec)
        if not names:
            raise AdapterConfigError("peft.target_modules is an empty list")
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:
            raise AdapterConfigError(f"peft.target_modules: {bad} are not module names")
    alts = "|".join(sorted(set(names)))
    return rf"(?:.*\.)?layers\.\d+\.(?:[^.]+\.)*(?:{alts})"


# ---------------------------------------------------------------------------------------------
# Image-token rows
# ---------------------------------------------------------------------------------------------
class ImageRowsLinear(nn.Module):
    """``lm_head`` with a trainable delta on the image-token rows; ``weight`` includes the delta.

    The fused loss reads ``lm_head.weight`` directly, so ``weight`` is a property: frozen base plus
    the scattered delta. Only the delta receives gradients.
    """

    def __init__(self, base: nn.Linear, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("rows", rows.clone().long(), persistent=False)
        self.image_rows_delta = nn.Parameter(
            torch.zeros(len(rows), base.in_features, device=base.weight.device, dtype=torch.float32)
        )

    @property
    def weight(self) -> torch.Tensor:
        w = self.base.weight
        return w.index_add(0, self.rows.to(w.device), self.image_rows_delta.to(w.dtype))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class ImageRowsEmbedding(nn.Module):
    """``embed_tokens`` with a trainable delta added to the embeddings of image-token ids."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("rows", rows.clone().long(), persistent=False)
        lookup = torch.full((base.num_embeddings,), -1, dtype=torch.long)
        lookup[rows.long()] = torch.arange(len(rows))
        self.register_buffer("row_of_id", lookup, persistent=False)
        self.image_rows_delta = nn.Parameter(
            torch.zeros(len(rows), base.embedding_dim, device=base.weight.device, dtype=torch.float32)
        )
        self.padding_idx = base.padding_idx

    @property
    def weight(self) -> torch.Tensor:
        w = self.base.weight
        return w.index_add(0, self.rows.to(w.device), self.image_rows_delta.to(w.dtype))

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def reset_buffers(self) -> None:
        """Refill the index buffers (after ``to_empty`` from the meta device left them garbage)."""
        rows = self.rows
        self.row_of_id.fill_(-1)
        self.row_of_id[rows] = torch.arange(len(rows), device=rows.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        idx = self.row_of_id[ids]
        hit = idx >= 0
        add = self.image_rows_delta[idx.clamp(min=0)].to(out.dtype)
        return out + add * hit.unsqueeze(-1).to(out.dtype)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The ``ChameleonFTForCausalLM`` inside a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def add_image_row_deltas(model: nn.Module, image_ids: torch.Tensor) -> nn.Module:
    """Wrap ``lm_head`` and ``embed_tokens`` so that only their ``image_ids`` rows train (as deltas)."""
    lm = _causal_lm(model)
    rows = torch.as_tensor(image_ids, dtype=torch.long).sort().values
    if not isinstance(lm.lm_head, ImageRowsLinear):
        lm.lm_head = ImageRowsLinear(lm.lm_head, rows.to(lm.lm_head.weight.device))
    emb = lm.model.embed_tokens
    if not isinstance(emb, ImageRowsEmbedding):
        lm.model.embed_tokens = ImageRowsEmbedding(emb, rows.to(emb.weight.device))
    for mod in (lm.lm_head.base, lm.model.embed_tokens.base):
        mod.weight.requires_grad_(False)
    return model


def image_row_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained image-row deltas plus their row ids (``*.rows``), as CPU tensors; {} if not used."""
    lm = _causal_lm(model)
    out = {}
    for mod, key in ((lm.lm_head, DELTA_KEYS["lm_head"]), (lm.model.embed_tokens, DELTA_KEYS["embed_tokens"])):
        if isinstance(mod, (ImageRowsLinear, ImageRowsEmbedding)):
            delta = mod.image_rows_delta
            full = getattr(delta, "full_tensor", None)  # DTensor under FSDP: gather every rank's shard
            out[key] = (full() if callable(full) else delta).detach().float().cpu().contiguous()
            out[key.replace("image_rows_delta", "image_rows")] = mod.rows.detach().cpu().clone()
    return out


def merge_image_row_deltas(state: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain weights: ``lm_head.weight`` / ``model.embed_tokens.weight`` of ``state`` plus the deltas.

    ``state`` uses the stock key names; returns a new dict (inputs are not modified).
    """
    out = dict(state)
    for delta_key, weight_key in ((DELTA_KEYS["lm_head"], "lm_head.weight"),
                                  (DELTA_KEYS["embed_tokens"], "model.embed_tokens.weight")):
        if delta_key not in deltas:
            continue
        rows = deltas[delta_key.replace("image_rows_delta", "image_rows")].long()
        w = out[weight_key]
        if rows.numel() and int(rows.max()) >= w.shape[0]:
            raise AdapterConfigError(f"{delta_key}: row {int(rows.max())} outside {weight_key} of {w.shape[0]} rows")
        merged = w.float().clone()
        merged.index_add_(0, rows, deltas[delta_key].float())
        out[weight_key] = merged.to(w.dtype)
    return out


def merge_image_rows_into_model(model: nn.Module) -> nn.Module:
    """Replace the image-row wrappers by plain modules whose weights include the deltas."""
    lm = _causal_lm(model)
    with torch.no_grad():
        if isinstance(lm.lm_head, ImageRowsLinear):
            base = lm.lm_head.base
            base.weight.copy_(lm.lm_head.weight)
            lm.lm_head = base
        if isinstance(lm.model.embed_tokens, ImageRowsEmbedding):
            base = lm.model.embed_tokens.base
            base.weight.copy_(lm.model.embed_tokens.weight)
            lm.model.embed_tokens = base
    return model


def zero_image_rows_(weight: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Zero ``weight[image_ids]`` in place (Lumina-mGPT's ``lm_head`` init for image generation)."""
    with torch.no_grad():
        weight[torch.as_tensor(image_ids, dtype=torch.long, device=weight.device)] = 0
    return weight


def zero_image_lm_head_(model: nn.Module) -> nn.Module:
    """Zero the image-token rows of ``lm_head`` (``model.zero_image_lm_head``), before any wrapping."""
    lm = _causal_lm(model)
    head = lm.lm_head.base if isinstance(lm.lm_head, ImageRowsLinear) else lm.lm_head
    zero_image_rows_(head.weight, lm.image_token_ids)
    return model


# ---------------------------------------------------------------------------------------------
# The adapter as a whole
# ---------------------------------------------------------------------------------------------
def apply_peft(model: nn.Module, peft_cfg) -> nn.Module:
    """Make the right parameters trainable and return the (possibly PEFT-wrapped) model.

    ``peft_cfg.method``: ``lora`` wraps the decoder's linears with PEFT LoRA (``r``, ``alpha``,
    ``dropout``, ``target_modules``, ``modules_to_save``), everything else frozen; ``none`` is full
    fine-tuning (every parameter trains) unless ``train_image_rows`` alone is asked for, in which case
    only the image-token rows of ``lm_head`` and ``embed_tokens`` train.
    """
    method = str(peft_cfg.method)
    if method not in PEFT_METHODS:
        raise AdapterConfigError(f"peft.method={method!r}: unknown; use one of {PEFT_METHODS}")
    train_rows = bool(getattr(peft_cfg, "train_image_rows", False))
    image_ids = model.image_token_ids
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        mts = list(getattr(peft_cfg, "modules_to_save", None) or []) or None
        lora = LoraConfig(
            r=int(peft_cfg.r),
            lora_alpha=int(peft_cfg.alpha),
            lora_dropout=float(peft_cfg.dropout),
            target_modules=resolve_target_modules(peft_cfg.target_modules),
            modules_to_save=mts,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if train_rows:
            add_image_row_deltas(model, image_ids)
    elif train_rows:
        for p in model.parameters():
            p.requires_grad_(False)
        add_image_row_deltas(model, image_ids)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise AdapterConfigError("the peft config leaves no parameter trainable")
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """Names of trainable parameters, in the state-dict spelling (wrapper prefixes removed)."""
    return [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]


_WRAPPER_PARTS = re.compile(r"(?:_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod)\.")


def clean_name(name: str) -> str:
    """Drop activation-checkpoint / compile wrapper parts, as ``get_model_state_dict`` does."""
    return _WRAPPER_PARTS.sub("", name)


def base_weight_name(name: str) -> str | None:
    """The stock checkpoint key a (wrapped) model parameter is loaded from; None for new parameters.

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` -> ``model.layers.0.self_attn.q_proj.weight``;
    ``lm_head.base.weight`` -> ``lm_head.weight``; LoRA weights and image-row deltas -> None.
    """
    name = clean_name(name)
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    if ".lora_" in name or "image_rows_delta" in name:
        return None
    name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    if name in ("lm_head.base.weight", "model.embed_tokens.base.weight"):
        name = name.replace(".base.", ".")
    return name


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total

