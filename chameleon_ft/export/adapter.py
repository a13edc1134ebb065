"""Export a trained adapter in PEFT format, plus Anole-style image-row deltas in a file of their own.

The adapter directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as PEFT's
``save_pretrained`` writes them, so stock ``peft.PeftModel.from_pretrained`` loads it on top of stock
transformers ``ChameleonForConditionalGeneration.from_pretrained(base)``. Differences from a plain
``save_pretrained``:

- ``base_model_name_or_path`` records the local base checkpoint;
- ``target_modules`` is the list of plain module names (``["q_proj", "v_proj"]``) that carry LoRA weights,
  not the anchored regex used in training (some serving stacks only accept plain names);
- the weights may come from a full state dict gathered from FSDP ranks by the caller.

Image-row deltas travel in ``image_rows.safetensors`` beside the adapter (format: :func:`save_image_rows`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
IMAGE_ROWS_FILE = "image_rows.safetensors"
IMAGE_ROWS_FORMAT = "chameleon_ft.image_rows/1"
# The two weights an image-row delta may apply to (stock state-dict names).
IMAGE_ROW_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")
# Name of the delta parameter inside the training wrappers, relative to the wrapped module.
_DELTA_PARAM = "image_rows_delta"
_WRAPPERS = re.compile(r"(?:_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod)\.")
_PEFT_PREFIX = "base_model.model."


class AdapterExportError(ValueError):
    """An adapter cannot be exported or read: missing weights, bad config, malformed image-row file."""


# ---------------------------------------------------------------------------------------------
# Image-row deltas
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageRows:
    """Deltas to add to rows ``row_ids`` of whole weights (``lm_head.weight``, ``model.embed_tokens.weight``).

    ``deltas[name]`` is ``[len(row_ids), hidden]``; the merged weight is ``W[row_ids] += delta``.
    """

    row_ids: torch.Tensor
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self.row_ids = torch.as_tensor(self.row_ids, dtype=torch.long).reshape(-1)
        for name, d in self.deltas.items():
            if name not in IMAGE_ROW_WEIGHTS:
                raise AdapterExportError(f"image rows: unknown weight {name!r}; expected one of {IMAGE_ROW_WEIGHTS}")
            if d.dim() != 2 or d.shape[0] != self.row_ids.numel():
                raise AdapterExportError(
                    f"image rows: delta for {name} has shape {list(d.shape)}, expected [{self.row_ids.numel()}, hidden]")
        if len(set(self.row_ids.tolist())) != self.row_ids.numel():
            raise AdapterExportError("image rows: row ids repeat")


def save_image_rows(out_dir: str | Path, row_ids: torch.Tensor, deltas: Mapping[str, torch.Tensor]) -> Path:
    """Write ``<out_dir>/image_rows.safetensors``.

    Format (safetensors, metadata ``{"format": "chameleon_ft.image_rows/1"}``):

    - ``row_ids``: int64 ``[N]``, vocabulary ids of the rows;
    - ``lm_head.weight`` and/or ``model.embed_tokens.weight``: float32 ``[N, hidden]``, the deltas to add to
      those rows of that weight.
    """
    rows = ImageRows(row_ids, {k: v.detach() for k, v in deltas.items()})
    if not rows.deltas:
        raise AdapterExportError("save_image_rows: no deltas given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"row_ids": rows.row_ids.cpu().contiguous()}
    tensors.update({k: v.float().cpu().contiguous() for k, v in rows.deltas.items()})
    path = out_dir / IMAGE_ROWS_FILE
    save_file(tensors, str(path), metadata={"format": IMAGE_ROWS_FORMAT})
    return path


def load_image_rows(path: str | Path) -> ImageRows | None:
    """Read ``image_rows.safetensors`` from an adapter directory (or the file itself); None if absent."""
    path = Path(path)
    if path.is_dir():
        path = path / IMAGE_ROWS_FILE
        if not path.exists():
            return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterExportError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != IMAGE_ROWS_FORMAT and any(k.endswith("." + _DELTA_PARAM) for k in tensors):
        return _from_training_layout(path, tensors)
    if meta.get("format") != IMAGE_ROWS_FORMAT:
        raise AdapterExportError(f"{path}: metadata format is {meta.get('format')!r}, expected {IMAGE_ROWS_FORMAT!r}")
    if "row_ids" not in tensors:
        raise AdapterExportError(f"{path}: has no 'row_ids' tensor")
    row_ids = tensors.pop("row_ids")
    try:
        return ImageRows(row_ids, tensors)
    except AdapterExportError as e:
        raise AdapterExportError(f"{path}: {e}") from e


def _from_training_layout(path: Path, tensors: dict[str, torch.Tensor]) -> ImageRows:
    # The training wrappers' own names: "<module>.image_rows" (ids) and "<module>.image_rows_delta".
    row_ids, deltas = None, {}
    for key, t in tensors.items():
        if not key.endswith("." + _DELTA_PARAM):
            continue
        module = key[: -len(_DELTA_PARAM) - 1]
        ids = tensors.get(module + ".image_rows")
        if ids is None:
            raise AdapterExportError(f"{path}: {key} has no matching {module}.image_rows tensor")
        if row_ids is not None and not torch.equal(ids.long(), row_ids):
            raise AdapterExportError(f"{path}: the image-row deltas use different row ids per weight")
        row_ids = ids.long()
        deltas[module + ".weight"] = t
    try:
        return ImageRows(row_ids, deltas)
    except AdapterExportError as e:
        raise AdapterExportError(f"{path}: {e}") from e


def add_image_rows_(state: dict[str, torch.Tensor], rows: ImageRows) -> dict[str, torch.Tensor]:
    """Add the deltas into ``state[name]`` (stock key names) in place, in the weights' own dtype."""
    for name, delta in rows.deltas.items():
        if name not in state:
            continue
        w = state[name]
        if int(rows.row_ids.max()) >= w.shape[0] or delta.shape[1] != w.shape[1]:
            raise AdapterExportError(
                f"image rows for {name}: rows up to {int(rows.row_ids.max())} x {delta.shape[1]} do not fit "
                f"the weight's shape {list(w.shape)}")
        idx = rows.row_ids.to(w.device)
        w[idx] = (w[idx].float() + delta.to(w.device).float()).to(w.dtype)
    return state


def apply_image_rows(model: nn.Module, rows: ImageRows) -> nn.Module:
    """Add image-row deltas to the ``lm_head`` / ``embed_tokens`` weights of ``model`` in place.

    ``model`` is a causal LM with stock names (ours or transformers'), optionally inside a ``PeftModel``.
    """
    get_base = getattr(model, "get_base_model", None)
    lm = get_base() if callable(get_base) else model
    params = {"lm_head.weight": lm.get_output_embeddings().weight,
              "model.embed_tokens.weight": lm.get_input_embeddings().weight}
    with torch.no_grad():
        add_image_rows_({k: params[k] for k in rows.deltas}, rows)
    return model


# ---------------------------------------------------------------------------------------------
# Adapter
# ---------------------------------------------------------------------------------------------
def _clean(name: str) -> str:
    name = _WRAPPERS.sub("", name)
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def _adapter_tensors(state: Mapping[str, torch.Tensor], adapter_name: str,
                     modules_to_save: list[str]) -> dict[str, torch.Tensor]:
    """PEFT's on-disk keys (``base_model.model.<module>.lora_A.weight``) from a live-model state dict."""
    out = {}
    lora = re.compile(rf"^(.*\.lora_(?:A|B))\.{re.escape(adapter_name)}\.weight$")
    saved = re.compile(rf"^(.*)\.modules_to_save\.{re.escape(adapter_name)}\.(.+)$")
    for key, t in state.items():
        name = _clean(key)
        m = lora.match(name)
        if m:
            out[f"{_PEFT_PREFIX}{m.group(1)}.weight"] = t
            continue
        m = saved.match(name)
        if m and m.group(1).split(".")[-1] in modules_to_save:
            out[f"{_PEFT_PREFIX}{m.group(1)}.{m.group(2)}"] = t
    return out


def _image_row_deltas(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"lm_head.weight": delta, ...}`` from the training wrappers' ``*.image_rows_delta`` parameters."""
    out = {}
    for key, t in state.items():
        name = _clean(key)
        if name.endswith("." + _DELTA_PARAM):
            module = name[: -len(_DELTA_PARAM) - 1]
            weight = module + ".weight"
            if weight not in IMAGE_ROW_WEIGHTS:
                raise AdapterExportError(f"{key}: image-row delta on an unexpected module {module!r}")
            out[weight] = t
    return out


def _image_row_ids(model, base_model_path) -> torch.Tensor:
    """Row ids of the image-row wrappers: the sorted image-token ids (from the model, else the base vocab)."""
    if model is not None:
        for mod in model.modules():
            rows = getattr(mod, "rows", None)
            if isinstance(rows, torch.Tensor) and hasattr(mod, _DELTA_PARAM):
                return rows.detach().cpu().long()
    from chameleon_ft.model.tokens import ChameleonTokens

    return ChameleonTokens.from_checkpoint(base_model_path).image_token_ids


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # a DTensor from an FSDP2 model: gather every rank's shard
    return (full() if callable(full) else t).detach().cpu().contiguous()


def export_adapter(
    model_or_state,
    out_dir: str | Path,
    base_model_path: str | Path,
    *,
    peft_config=None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a PEFT adapter (and ``image_rows.safetensors`` if image rows were trained) to ``out_dir``.

    ``model_or_state`` is either a ``PeftModel`` (its ``peft_config`` and, unless ``state_dict`` is given,
    its ``state_dict()`` are used) or a state dict of a PEFT-wrapped model, in which case ``peft_config``
    (the ``LoraConfig``) is required. Under FSDP pass the full state dict gathered on every rank, e.g.
    ``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))``, and
    call this on rank 0 only. A model with image-row wrappers but no LoRA (``peft.method=none``) exports
    just the image rows. ``dtype`` casts the LoRA weights (default: keep).
    """
    out_dir = Path(out_dir)
    if isinstance(model_or_state, Mapping):
        model, state = None, model_or_state
    else:
        model = model_or_state
        state = state_dict if state_dict is not None else model.state_dict()
        if peft_config is None:
            configs = getattr(model, "peft_config", None) or {}
            peft_config = configs.get(adapter_name)
            if configs and peft_config is None:
                raise AdapterExportError(f"model has no adapter named {adapter_name!r}; it has {sorted(configs)}")
    deltas = _image_row_deltas(state)
    if peft_config is None and not deltas:
        raise AdapterExportError("nothing to export: no PEFT config and no image-row deltas in the model")

    out_dir.mkdir(parents=True, exist_ok=True)
    if peft_config is not None:
        mts = list(peft_config.modules_to_save or [])
        tensors = _adapter_tensors(state, adapter_name, mts)
        lora_keys = [k for k in tensors if ".lora_" in k]
        if not lora_keys:
            raise AdapterExportError(
                f"no LoRA weights for adapter {adapter_name!r} in the state dict ({len(state)} tensors); "
                "is the model PEFT-wrapped?")
        targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora_keys})
        tensors = {k: _full(v) for k, v in tensors.items()}
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        config = peft_config.to_dict()
        config.update(
            base_model_name_or_path=str(base_model_path),
            target_modules=targets,
            modules_to_save=mts or None,
            inference_mode=True,
        )
        save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (out_dir / ADAPTER_CONFIG).write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True))
    if deltas:
        row_ids = _image_row_ids(model, base_model_path)
        save_image_rows(out_dir, row_ids, {k: _full(v) for k, v in deltas.items()})
    return out_dir


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, tuple, list)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if hasattr(obj, "value") and type(obj).__module__.startswith("peft"):
        return obj.value  # PEFT enums (peft_type, task_type)
    return obj


# ---------------------------------------------------------------------------------------------
# Reading an adapter directory (for merge and generation)
# ---------------------------------------------------------------------------------------------
@dataclass
class AdapterFiles:
    """An adapter directory's contents: PEFT config dict, LoRA/saved tensors (on-disk keys), image rows."""

    path: Path
    config: dict | None
    tensors: dict[str, torch.Tensor]
    image_rows: ImageRows | None


def read_adapter(path: str | Path) -> AdapterFiles:
    """Read an exported adapter directory (PEFT files and/or ``image_rows.safetensors``)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterExportError(f"{path}: adapter directory not found")
    cfg_file, w_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    config, tensors = None, {}
    if cfg_file.exists():
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise AdapterExportError(f"{cfg_file}: invalid JSON ({e})") from e
        if config.get("peft_type") != "LORA":
            raise AdapterExportError(f"{cfg_file}: peft_type {config.get('peft_type')!r}; only LORA is supported")
        if not w_file.exists():
            raise AdapterExportError(f"{path}: has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
        try:
            with safe_open(str(w_file), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise AdapterExportError(f"{w_file}: not a readable safetensors file ({e})") from e
    rows = load_image_rows(path)
    if config is None and rows is None:
        raise AdapterExportError(f"{path}: neither {ADAPTER_CONFIG} nor {IMAGE_ROWS_FILE}; not an adapter directory")
    return AdapterFiles(path, config, tensors, rows)
