"""Load and save Hugging Face-format Chameleon checkpoints in either q/k-norm layout.

- *expanded*: ``q_norm``/``k_norm`` are ``[num_heads, head_dim]`` (transformers' facebook/chameleon-7b);
- *grouped*: ``[model_parallel_size, head_dim]`` (Alpha-VLLM/Chameleon_7B_mGPT).
The layout is detected from tensor shapes. Loading builds the model on the meta device and assigns
tensors read straight from the safetensors files into their final buffers, so a 7B checkpoint never
exists twice in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import ChameleonConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonRotaryEmbedding

from chameleon_ft.errors import CheckpointError
from chameleon_ft.model.modeling import FT_CONFIG_DEFAULTS, ChameleonFTForCausalLM
from chameleon_ft.model.qk_norm import expand_qk_norm, group_qk_norm
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.vq.vqgan import VQ_PREFIX

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
LAYOUTS = ("grouped", "expanded")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}




# ---------------------------------------------------------------------------------------------
# Reading safetensors without a second copy
# ---------------------------------------------------------------------------------------------
def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise CheckpointError(f"{path}: implausible safetensors header size {n}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def weight_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name to its safetensors file, from the index or a single file."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if single.exists():
        return {name: single for name in _read_header(single)[0]}
    raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}; not a Hugging Face-format checkpoint")


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of all tensors in a checkpoint, from headers only."""
    shapes = {}
    for f in sorted(set(weight_files(path).values())):
        for name, meta in _read_header(f)[0].items():
            shapes[name] = tuple(meta["shape"])
    return shapes


def iter_tensors(path: str | Path, names: Iterable[str] | None = None,
                 dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` read with plain file reads straight into a fresh tensor.

    Unlike a memory map, pages read here are not kept resident, so peak memory is the tensors
    the caller keeps. Floating tensors are cast to ``dtype`` one at a time if given.
    """
    files = weight_files(path)
    wanted = set(files) if names is None else set(names)
    missing = wanted - set(files)
    if missing:
        raise CheckpointError(f"{path}: missing tensors {sorted(missing)[:5]}")
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    for fpath in sorted(by_file):
        header, base = _read_header(fpath)
        with open(fpath, "rb", buffering=0) as f:
            for name in sorted(by_file[fpath], key=lambda n: header[n]["data_offsets"][0]):
                meta = header[name]
                if meta["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{fpath}: tensor {name} has unsupported dtype {meta['dtype']}")
                start, end = meta["data_offsets"]
                t = torch.empty(meta["shape"], dtype=_DTYPES[meta["dtype"]])
                buf = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
                if buf is not None:
                    if buf.nbytes != end - start:
                        raise CheckpointError(f"{fpath}: tensor {name} byte size does not match its shape")
                    f.seek(base + start)
                    view, got = memoryview(buf), 0
                    while got < len(view):
                        n = f.readinto(view[got:])
                        if not n:
                            raise CheckpointError(f"{fpath}: truncated while reading {name}")
                        got += n
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                yield name, t


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
def is_qk_norm(name: str) -> bool:
    return ".self_attn.q_norm." in name or ".self_attn.k_norm." in name


def _heads_for(name: str, config: ChameleonConfig) -> int:
    return config.num_attention_heads if ".q_norm." in name else (config.num_key_value_heads or config.num_attention_heads)


def detect_qk_layout(shapes: dict[str, tuple[int, ...]], config: ChameleonConfig) -> str:
    """``"grouped"`` or ``"expanded"``, from the q/k-norm shapes; raises if they fit neither."""
    groups = config.model_parallel_size or 1
    found = set()
    for name, shape in shapes.items():
        if not is_qk_norm(name):
            continue
        heads = _heads_for(name, config)
        if groups == heads and shape[0] == heads:
            continue  # both layouts coincide for this tensor
        if shape[0] == groups:
            found.add("grouped")
        elif shape[0] == heads:
            found.add("expanded")
        else:
            raise CheckpointError(
                f"{name}: shape {list(shape)} fits neither layout ([{groups}, head_dim] grouped or "
                f"[{heads}, head_dim] expanded)"
            )
    if len(found) > 1:
        raise CheckpointError("checkpoint mixes grouped and expanded q/k-norm tensors")
    return found.pop() if found else "grouped"


def layout_rows(name: str, config: ChameleonConfig, layout: str) -> int:
    """Rows a q/k-norm tensor has in ``layout``."""
    return (config.model_parallel_size or 1) if layout == "grouped" else _heads_for(name, config)


def to_layout(name: str, t: torch.Tensor, config: ChameleonConfig, layout: str) -> torch.Tensor:
    """Convert one tensor to ``layout``; non q/k-norm tensors pass through unchanged."""
    if not is_qk_norm(name):
        return t
    groups, heads = config.model_parallel_size or 1, _heads_for(name, config)
    if layout == "grouped":
        return t if t.shape[0] == groups else group_qk_norm(t, groups, name)
    if layout == "expanded":
        return t if t.shape[0] == heads else expand_qk_norm(t, heads)
    raise CheckpointError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


# ---------------------------------------------------------------------------------------------
# Config and tokenizer
# ---------------------------------------------------------------------------------------------
def load_config(path: str | Path, **overrides) -> ChameleonConfig:
    """Read ``config.json``; fix special-token ids from the vocabulary by name; apply overrides."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: not found; is {path} a Chameleon checkpoint directory?")
    config = ChameleonConfig.from_pretrained(path)
    tokens = ChameleonTokens.from_checkpoint(path)
    # Lumina-mGPT's config.json says bos_token_id=1, but its tokenizer's <s> is 0: trust the names.
    for attr, tid in (("bos_token_id", tokens.bos), ("eos_token_id", tokens.eos), ("pad_token_id", tokens.pad)):
        if getattr(config, attr) != tid:
            log.info("%s: %s=%s disagrees with the vocabulary; using %s", cfg_file, attr, getattr(config, attr), tid)
            setattr(config, attr, tid)
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    return config


def load_tokenizer(path: str | Path):
    """The checkpoint's text tokenizer (``tokenizer.json``), as a fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise CheckpointError(f"{path / 'tokenizer.json'}: not found")
    tokens = ChameleonTokens.from_checkpoint(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    if tok.convert_tokens_to_ids("<s>") != tokens.bos:
        raise CheckpointError(f"{path}: tokenizer.json and config.json vocabulary_map disagree on '<s>'")
    return tok


# ---------------------------------------------------------------------------------------------
# Model load / save
# ---------------------------------------------------------------------------------------------
def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    **overrides,
) -> ChameleonFTForCausalLM:
    """Load a local checkpoint directory (either q/k-norm layout) as :class:`ChameleonFTForCausalLM`.

    ``overrides`` set fine-tuning options on the config (``mask_image_logits``, ``z_loss_weight``,
    ``dropout``, ``loss_chunk_size``). VQ weights (``model.vqmodel.*``) are skipped: see
    :func:`chameleon_ft.vq.load_vqgan`.
    """
    unknown = set(overrides) - set(FT_CONFIG_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown model options {sorted(unknown)}; valid: {sorted(FT_CONFIG_DEFAULTS)}")
    path = Path(path)
    config = load_config(path, **overrides)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = ChameleonFTForCausalLM(config)
    expected = model.state_dict()
    shapes = {k: v for k, v in tensor_shapes(path).items() if not k.startswith(VQ_PREFIX)}
    layout = detect_qk_layout(shapes, config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    state = {}
    for name, t in iter_tensors(path, shapes, dtype=dtype):
        t = to_layout(name, t, config, "grouped")
        if t.shape != expected[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {list(t.shape)}, expected {list(expected[name].shape)}")
        state[name] = t.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers were created on the meta device.
    with torch.device(device):
        model.model.rotary_emb = ChameleonRotaryEmbedding(config=config)
    model.checkpoint_layout = layout
    model.checkpoint_dir = str(path)
    return model.eval()


def plan_shards(sizes: dict[str, int], max_shard_bytes: int | str) -> dict[str, list[str]]:
    """Shard file name -> tensor names, from tensor byte sizes alone (no tensor data is needed), by
    huggingface_hub's splitter: in order, each shard at most ``max_shard_bytes`` (``"5GB"`` accepted), an
    oversized tensor alone; a single shard is ``model.safetensors``."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(sizes, get_storage_size=int, max_shard_size=max_shard_bytes,
                                                 filename_pattern="model{suffix}.safetensors")
    return split.filename_to_tensors


def save_state_dict(
    tensors: dict[str, torch.Tensor],
    config: ChameleonConfig,
    out_dir: str | Path,
    *,
    layout: str = "grouped",
    source_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a Hugging Face-format checkpoint: sharded safetensors + index, config, tokenizer files.

    q/k-norm tensors are converted to ``layout``. From ``source_dir`` (the base checkpoint) the VQ
    tensors ``model.vqmodel.*``, tokenizer files and ``tokenizer/`` (Meta's VQGAN) are copied, so the
    result is as complete as the base. Files are written to a temporary directory and renamed into
    place, so an interrupted save never leaves a half-written checkpoint.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def convert(name, t):
        t = to_layout(name, t.detach(), config, layout)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.contiguous()

    names = list(tensors)
    vq_names = []
    if source_dir is not None:
        vq_names = sorted(n for n in weight_files(source_dir) if n.startswith(VQ_PREFIX))
        src_shapes = tensor_shapes(source_dir)
    sizes = {}
    for n in names:
        t = tensors[n]
        numel = t.numel() if not is_qk_norm(n) else layout_rows(n, config, layout) * t.shape[-1]
        sizes[n] = numel * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
    for n in vq_names:
        sizes[n] = int(torch.Size(src_shapes[n]).numel()) * 4
    vq_set = set(vq_names)

    def make_chunk(shard_names):
        chunk = {n: convert(n, tensors[n]) for n in shard_names if n not in vq_set}
        vq_here = [n for n in shard_names if n in vq_set]
        if vq_here:
            chunk.update(dict(iter_tensors(source_dir, vq_here)))
        return chunk

    write_shards(tmp, plan_shards(sizes, max_shard_bytes), make_chunk)
    return finish_checkpoint_dir(tmp, out_dir, config, layout=layout, source_dir=source_dir)


def write_shards(tmp: Path, shards: dict[str, list[str]], make_chunk) -> None:
    """Write ``shards`` (file name -> tensor names, from :func:`plan_shards`) into ``tmp`` as safetensors
    files, plus the index when there is more than one. ``make_chunk(names)`` returns that shard's
    ``{name: tensor}``, so only one shard is in memory at a time."""
    weight_map, total = {}, 0
    for fname, names in shards.items():
        chunk = make_chunk(names)
        save_file(chunk, str(tmp / fname), metadata={"format": "pt"})
        for n, t in chunk.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        del chunk
    if len(shards) > 1:
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def finish_checkpoint_dir(tmp: Path, out_dir: Path, config: ChameleonConfig, *, layout: str,
                          source_dir: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Complete a checkpoint written to ``tmp`` (weights already there): ``config.json``, the tokenizer
    files and ``tokenizer/`` copied from ``source_dir``; then move it to ``out_dir`` in one rename, so a
    reader never sees a half-written checkpoint."""
    cfg = config.to_dict()
    cfg.pop("_attn_implementation", None)
    cfg.pop("_attn_implementation_autoset", None)
    cfg["architectures"] = ["ChameleonForConditionalGeneration"]
    cfg["qk_norm_layout"] = layout
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if source_dir is not None:
        source_dir = Path(source_dir)
        for fname in TOKENIZER_FILES:
            if (source_dir / fname).exists():
                shutil.copy2(source_dir / fname, tmp / fname)
        if (source_dir / "tokenizer").is_dir():
            shutil.copytree(source_dir / "tokenizer", tmp / "tokenizer")
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def save_model(model: ChameleonFTForCausalLM, out_dir: str | Path, *, layout: str = "grouped",
               source_dir: str | Path | None = None, **kwargs) -> Path:
    """Save ``model`` (a plain, unwrapped model) with :func:`save_state_dict`."""
    source_dir = source_dir or getattr(model, "checkpoint_dir", None)
    return save_state_dict(model.state_dict(), model.config, out_dir, layout=layout, source_dir=source_dir, **kwargs)


def convert_checkpoint(src: str | Path, dst: str | Path, layout: str, **kwargs) -> Path:
    """Rewrite checkpoint ``src`` in q/k-norm ``layout`` at ``dst`` (weights kept in their dtype)."""
    config = load_config(src)
    names = [n for n in weight_files(src) if not n.startswith(VQ_PREFIX)]
    tensors = dict(iter_tensors(src, names))
    return save_state_dict(tensors, config, dst, layout=layout, source_dir=src, **kwargs)
