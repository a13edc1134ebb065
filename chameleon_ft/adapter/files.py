"""Adapter directories: writing one from a trained model, reading one back, and the settings beside it.

The directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as PEFT's
``save_pretrained`` writes them, so stock ``peft.PeftModel.from_pretrained`` loads it on top of stock
transformers ``ChameleonForConditionalGeneration.from_pretrained(base)``. Differences from a plain
``save_pretrained``:

- ``base_model_name_or_path`` records the local base checkpoint;
- LoRA's ``target_modules`` is the list of plain module names (``["q_proj", "v_proj"]``) that carry LoRA
  weights, not the anchored regex used in training (some serving stacks only accept plain names);
- the weights may come from a full state dict gathered from FSDP ranks by the caller;
- ``chameleon_ft.json`` (:class:`SampleSettings`) records how the training samples were built, so that
  evaluation, generation and merges build their prompts the same way.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from chameleon_ft.adapter.attach import TOKEN_DELTA, base_model, clean_name
from chameleon_ft.errors import CheckpointError
from chameleon_ft.model.tensors import first_nonfinite

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SETTINGS_FILE = "chameleon_ft.json"
SETTINGS_FORMAT = "chameleon_ft.settings/1"
PEFT_PREFIX = "base_model.model."
PEFT_TYPES = ("LORA", "TRAINABLE_TOKENS")


# ---------------------------------------------------------------------------------------------
# The settings a model was trained with
# ---------------------------------------------------------------------------------------------
@dataclass
class SampleSettings:
    """How the training samples of an adapter (or a merged model) were built; read back by evaluation,
    generation and merges so that their prompts and image tokens match training."""

    task: str
    prompt_template: str | None  # the template in effect (the task's default when the run set none)
    image_layout: str  # lumina | chameleon (resolved)
    image_size: int
    image_buckets: bool = False
    label_mask: str = "assistant"
    max_length: int = 4096

    def save(self, directory: str | Path) -> Path:
        """Write ``chameleon_ft.json`` into ``directory``."""
        path = Path(directory) / SETTINGS_FILE
        path.write_text(json.dumps({"format": SETTINGS_FORMAT, **asdict(self)}, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> SampleSettings | None:
        """The settings saved in ``directory``, or None when it has none (e.g. a base checkpoint)."""
        path = Path(directory) / SETTINGS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid JSON ({e.msg})") from e
        if not isinstance(data, dict) or data.get("format") != SETTINGS_FORMAT:
            raise CheckpointError(f"{path}: not a {SETTINGS_FORMAT} file")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, tuple, list)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if hasattr(obj, "value") and type(obj).__module__.startswith("peft"):
        return obj.value  # PEFT enums (peft_type, task_type)
    return obj


def export_adapter(model: nn.Module, out_dir: str | Path, base_model_path: str | Path, *,
                   state_dict: Mapping[str, torch.Tensor] | None = None, settings: SampleSettings | None = None,
                   adapter_name: str = "default", dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s PEFT adapter (LoRA and/or image-token rows) to ``out_dir``.

    ``state_dict``: the model's full state dict when the live one is sharded (FSDP2: gather it on every
    rank with ``get_model_state_dict(..., full_state_dict=True)`` and call this on rank 0 only).
    ``dtype`` casts the floating weights (default: keep). ``settings`` are written beside the weights.
    """
    from peft.utils import get_peft_model_state_dict

    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise CheckpointError(f"nothing to export: the model has no PEFT adapter named {adapter_name!r}")
    peft_config = configs[adapter_name]
    state = {clean_name(k): v for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    tensors = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name,
                                        save_embedding_layers=False)
    if not tensors:
        raise CheckpointError(f"no adapter weights for {adapter_name!r} in the state dict ({len(state)} tensors)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    bad = first_nonfinite(tensors)
    if bad is not None:  # a diverged adapter is never written, so no later step can mistake it for a result
        raise CheckpointError(f"refusing to write the adapter to {out_dir}: tensor {bad[0]} has {bad[1]} "
                              "(training diverged)")
    config = _jsonable(peft_config.to_dict())
    config.update(base_model_name_or_path=str(base_model_path), inference_mode=True)
    lora_keys = [k for k in tensors if ".lora_" in k]
    if config.get("peft_type") == "LORA":
        config["target_modules"] = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora_keys})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    if settings is not None:
        settings.save(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
@dataclass
class AdapterFiles:
    """An adapter directory's contents: PEFT config dict, tensors (on-disk keys), and settings."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    settings: SampleSettings | None = None


def read_adapter(path: str | Path) -> AdapterFiles:
    """Read an exported adapter directory; errors name the file and what is wrong. An adapter with a NaN or
    infinite value (a diverged run) is refused, naming the tensor: merges and evaluation read it here."""
    from peft.utils import load_peft_weights

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: adapter directory not found")
    cfg_file, w_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG}; not an adapter directory")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("peft_type") not in PEFT_TYPES:
        raise CheckpointError(f"{cfg_file}: peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                              f"supported: {PEFT_TYPES}")
    if not w_file.exists():
        raise CheckpointError(f"{path}: has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    try:
        tensors = load_peft_weights(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{w_file}: not a readable safetensors file ({e})") from e
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise CheckpointError(f"{w_file}: tensor {bad[0]} has {bad[1]}; the run that wrote it diverged "
                              "(retrain with a lower optim.lr)")
    return AdapterFiles(path, config, tensors, SampleSettings.load(path))


@dataclass
class WeightUpdates:
    """An adapter as changes to named base weights: ``W + scale * B @ A`` (LoRA), whole replacements
    (``modules_to_save``), and replaced rows (trainable tokens)."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    replace: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Base tensor ``name`` with every update that targets it (float32 arithmetic, ``t``'s dtype)."""
        if name in self.replace:
            t = self.replace[name].to(t.dtype)
        if name in self.lora:
            A, B, scale = self.lora[name]
            t = (t.float() + scale * (B.float() @ A.float())).to(t.dtype)
        if name in self.rows:
            idx, values = self.rows[name]
            if int(idx.max()) >= t.shape[0] or values.shape[1] != t.shape[1]:
                raise CheckpointError(f"image rows for {name}: rows up to {int(idx.max())} x {values.shape[1]} do "
                                      f"not fit the weight's shape {list(t.shape)}")
            t = t.clone()
            t[idx] = values.to(t.dtype)
        return t

    @property
    def targets(self) -> set[str]:
        return set(self.lora) | set(self.replace) | set(self.rows)


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule: a pattern key matches a module name ending in it, at a dot boundary.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _token_indices(cfg: dict, module: str) -> list[int] | None:
    if cfg.get("peft_type") == "TRAINABLE_TOKENS":
        return cfg.get("token_indices")
    spec = cfg.get("trainable_token_indices")
    if isinstance(spec, dict):
        return next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    return spec


def weight_updates(adapter: AdapterFiles) -> WeightUpdates:
    """The adapter's tensors as :class:`WeightUpdates` keyed by base weight name.

    LoRA ``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with per-module ``rank_pattern`` /
    ``alpha_pattern`` as PEFT applies them.
    """
    cfg, where = adapter.config, adapter.path / ADAPTER_CONFIG
    for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if cfg.get(flag):
            raise CheckpointError(f"{where}: {flag}=true is not supported by the merge")
    out = WeightUpdates()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{adapter.path}: tensor {key!r} does not start with {PEFT_PREFIX!r}")
        name = key[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_" in name:
            raise CheckpointError(f"{adapter.path}: unsupported LoRA tensor {key!r}")
        elif name.endswith("." + TOKEN_DELTA):
            module = name[: -len(TOKEN_DELTA) - 1].removesuffix(".token_adapter")
            idx = _token_indices(cfg, module)
            if idx is None or len(idx) != t.shape[0]:
                raise CheckpointError(f"{where}: {key} has {t.shape[0]} rows but the config lists "
                                      f"{None if idx is None else len(idx)} token indices for {module}")
            out.rows[module + ".weight"] = (torch.as_tensor(idx, dtype=torch.long), t)
        else:
            out.replace[re.sub(r"\.modules_to_save\.", ".", name)] = t
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{adapter.path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"{adapter.path}: {module}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not chain")
        r = A.shape[0]
        expected_r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r"))
        if expected_r is not None and int(expected_r) != r:
            raise CheckpointError(f"{where}: {module} has rank {r} in the weights but {expected_r} in the config")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out.lora[module + ".weight"] = (A, B, scale)
    return out


# ---------------------------------------------------------------------------------------------
# Loading onto a model (evaluation, generation)
# ---------------------------------------------------------------------------------------------
def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """``model`` with the adapter at ``path`` merged in (stock ``PeftModel.from_pretrained`` then
    ``merge_and_unload``), so decoding runs at base-model speed. Returns the plain model."""
    from peft import PeftModel

    read_adapter(path)  # clear errors for a broken directory before PEFT's own
    with warnings.catch_warnings():
        # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`: nothing a user can act on.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        merged = PeftModel.from_pretrained(base_model(model), str(path)).merge_and_unload()
    merged.adapter_dir = str(path)
    return merged
