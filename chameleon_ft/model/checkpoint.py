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
import math
import os
import reprlib
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import save_file
from transformers import ChameleonConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonRotaryEmbedding

from chameleon_ft.errors import CheckpointError
from chameleon_ft.model.attention import resolve_attn_implementation
from chameleon_ft.model.json_file import parse_json, read_json
from chameleon_ft.model.modeling import FT_CONFIG_DEFAULTS, ChameleonFTForCausalLM
from chameleon_ft.model.qk_norm import expand_qk_norm, group_qk_norm
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.vq.vqgan import VQ_PREFIX

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
LAYOUTS = ("grouped", "expanded")
# Staging names next to an output directory (see finish_checkpoint_dir).
TMP_SUFFIX, NEW_SUFFIX, OLD_SUFFIX = ".tmp", ".new", ".old"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header

# Header values are untrusted: quote them shortened.
_quote = reprlib.Repr()
_quote.maxstring, _quote.maxother, _quote.maxlist, _quote.maxlong = 120, 120, 8, 40




# ---------------------------------------------------------------------------------------------
# Reading safetensors without a second copy
# ---------------------------------------------------------------------------------------------
class _Entry(NamedTuple):
    """One validated tensor of a safetensors header; ``start``/``end`` are offsets in the data area."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_header(path: Path) -> tuple[dict[str, _Entry], int]:
    """Validated header of a safetensors file and the file offset of its data area.

    Checks everything safetensors itself checks before any tensor is allocated: the header is UTF-8
    JSON of at most 100 MB, every entry has a known dtype, a shape of non-negative ints and
    ``data_offsets`` whose length is ``prod(shape) * itemsize``, and the tensors tile the data area
    exactly (no overlap, gap or trailing bytes). Errors name the file and the tensor.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror})") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        # The length itself is not quoted: in a file that is not safetensors it is the file's first bytes.
        if n > _HEADER_LIMIT:
            raise CheckpointError(f"{path}: not a safetensors file (header length field over the 100 MB limit)")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header length field "
                                  f"exceeds the file's {size} bytes)")
        text = f.read(n)
    header = parse_json(text, f"{path}: safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    entries = {name: _parse_entry(path, name, meta, data_size) for name, meta in header.items()}
    _check_tiling(path, entries, data_size)
    return entries, 8 + n


def _parse_entry(path: Path, name: str, meta, data_size: int) -> _Entry:
    where = f"{path}: tensor {_quote.repr(name)}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: header entry is not a JSON object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: header entry has no {' / '.join(missing)}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {_quote.repr(dtype)} (supported: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {_quote.repr(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {_quote.repr(offsets)} is not a pair of integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise CheckpointError(f"{where}: data_offsets [{start}, {end}] are out of order")
    if end > data_size:
        raise CheckpointError(f"{where}: data_offsets [{start}, {end}] run past the {data_size} bytes of "
                              f"data in the file: truncated or corrupt")
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if nbytes != end - start:
        raise CheckpointError(f"{where}: shape {_quote.repr(shape)} of {dtype} needs {nbytes} bytes, but data_offsets "
                              f"[{start}, {end}] hold {end - start}")
    return _Entry(dtype, tuple(shape), start, end)


def _check_tiling(path: Path, entries: dict[str, _Entry], data_size: int) -> None:
    """The tensors must cover the data area exactly once, as safetensors requires."""
    pos, prev = 0, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start < pos:
            raise CheckpointError(f"{path}: tensors {_quote.repr(prev)} and {_quote.repr(name)} overlap "
                                  f"(bytes {e.start}..{pos})")
        if e.start > pos:
            raise CheckpointError(f"{path}: bytes {pos}..{e.start} of the data, before tensor "
                                  f"{_quote.repr(name)}, belong to no tensor")
        pos, prev = e.end, name
    if pos != data_size:
        raise CheckpointError(f"{path}: the last {data_size - pos} bytes of the file belong to no tensor")


def _shard_name(index: Path, tensor: str, fname) -> str:
    """A ``weight_map`` value must be a bare file name, so the index cannot point outside its directory."""
    if (not isinstance(fname, str) or fname in ("", ".", "..") or "\0" in fname
            or PurePosixPath(fname).name != fname or PureWindowsPath(fname).name != fname):
        raise CheckpointError(f"{index}: tensor {_quote.repr(tensor)} maps to {_quote.repr(fname)}, which is not "
                              f"a file name inside the checkpoint directory (no path separators or '..')")
    return fname


def weight_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name to its safetensors file, from the index or a single file.

    Shard names in the index must be bare file names in ``path``. A shard that is a symlink is
    followed: Hugging Face's cache builds every snapshot from symlinks into its blob store, so where
    a shard really lives is the directory owner's choice, not the index's.
    """
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        data = read_json(index, CheckpointError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map' object mapping tensor names to shard files")
        files = {name: path / _shard_name(index, name, fname) for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which "
                                      f"{'is not a file' if f.exists() else 'does not exist'}")
        return files
    single = path / SINGLE_FILE
    if single.exists():
        return {name: single for name in _read_header(single)[0]}
    raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}; not a Hugging Face-format checkpoint")


def _entries(path: str | Path) -> dict[str, tuple[Path, _Entry]]:
    """Every tensor of a checkpoint with its file and validated header entry."""
    files = weight_files(path)
    headers = {f: _read_header(f)[0] for f in sorted(set(files.values()))}
    out = {}
    for name, f in files.items():
        if name not in headers[f]:
            raise CheckpointError(f"{f}: the index maps tensor {name} to this shard, which does not hold it")
        out[name] = (f, headers[f][name])
    return out


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of all tensors in a checkpoint, from headers only."""
    return {name: e.shape for name, (_, e) in _entries(path).items()}


def tensor_dtypes(path: str | Path) -> dict[str, str]:
    """Stored dtype names (``"BF16"``, ``"F32"``...) of all tensors in a checkpoint, from headers only."""
    return {name: e.dtype for name, (_, e) in _entries(path).items()}


def dtype_size(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return _DTYPES[name].itemsize


def declared_dtype(path: str | Path) -> torch.dtype | None:
    """The weight dtype ``config.json`` declares (``dtype``, or the older ``torch_dtype``), if any."""
    cfg_file = Path(path) / "config.json"
    cfg = read_json(cfg_file, CheckpointError)
    name = (cfg.get("dtype") or cfg.get("torch_dtype")) if isinstance(cfg, dict) else None
    if name in (None, "auto"):
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{cfg_file}: declares an unknown dtype {_quote.repr(name)}")
    return dtype


def check_stored_dtypes(path: str | Path, expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors whose stored dtype cannot be the model's weight, before any is read.

    ``expected`` maps names to tensors of the model (meta tensors do). A floating weight stored as an
    integer or bool dtype is refused (a corrupt header or another model's file). When ``config.json``
    declares a dtype, a floating tensor stored in a *different format of the same size* (F16 where
    bfloat16 is declared, or the reverse) is refused too: the bytes cannot tell the two apart, and read
    as the wrong one they are garbage. A different size (F32 in a bfloat16 checkpoint) is allowed: a
    misread there changes the byte count, which the shape checks catch.
    """
    declared = declared_dtype(path)
    entries = _entries(path)
    for name, ref in expected.items():
        if name not in entries:
            continue
        f, e = entries[name]
        stored = _DTYPES[e.dtype]
        if ref.dtype.is_floating_point != stored.is_floating_point or (
                not stored.is_floating_point and stored != ref.dtype):
            held = _DTYPE_NAMES.get(ref.dtype, ref.dtype)
            raise CheckpointError(f"{f}: tensor {name} is stored as {e.dtype}, but the model holds it as {held}: "
                                  f"a corrupt header, or another model's weights")
        if (declared is not None and stored.is_floating_point and stored != declared
                and stored.itemsize == declared.itemsize):
            raise CheckpointError(
                f"{f}: tensor {name} is stored as {e.dtype}, but {Path(path) / 'config.json'} declares "
                f"{str(declared).removeprefix('torch.')}; read as the wrong one of the two the weights are garbage. "
                f"If they really are {e.dtype}, correct \"dtype\" in config.json"
            )


def iter_tensors(path: str | Path, names: Iterable[str] | None = None,
                 dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` read with plain file reads straight into a fresh tensor.

    Unlike a memory map, pages read here are not kept resident, so peak memory is the tensors
    the caller keeps. Floating tensors are cast to ``dtype`` one at a time if given. Headers are
    validated first (see :func:`_read_header`), so a tensor is only allocated once its byte range
    is known to lie in the file.
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
        entries, base = _read_header(fpath)
        absent = sorted(set(by_file[fpath]) - set(entries))
        if absent:
            raise CheckpointError(f"{fpath}: the index maps tensor {absent[0]} to this shard, which does not hold it")
        with open(fpath, "rb", buffering=0) as f:
            for name in sorted(by_file[fpath], key=lambda n: entries[n].start):
                e = entries[name]
                # CPU explicitly: callers may run under another default device (Lightning's configure_model
                # runs under torch.device(root_device)), and file reads land in host memory.
                t = torch.empty(e.shape, dtype=_DTYPES[e.dtype], device="cpu")
                if e.end > e.start:
                    view, got = memoryview(t.reshape(-1).view(torch.uint8).numpy()), 0
                    f.seek(base + e.start)
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
    if not isinstance(read_json(cfg_file, CheckpointError), dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object")
    tokens = ChameleonTokens.from_checkpoint(path)
    try:
        config = ChameleonConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as e:
        raise CheckpointError(f"{cfg_file}: not a valid Chameleon config ({e})") from e
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
    tok_file = path / "tokenizer.json"
    if not tok_file.exists():
        raise CheckpointError(f"{tok_file}: not found")
    tokens = ChameleonTokens.from_checkpoint(path)
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>")
    except Exception as e:  # the tokenizers library raises a bare Exception for any malformed file
        raise CheckpointError(f"{tok_file}: not a valid tokenizer file ({e})") from e
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
    config._attn_implementation = resolve_attn_implementation(attn_implementation, torch.device(device).type)
    with torch.device("meta"):
        model = ChameleonFTForCausalLM(config)
    expected = model.state_dict()
    shapes = {k: v for k, v in tensor_shapes(path).items() if not k.startswith(VQ_PREFIX)}
    layout = detect_qk_layout(shapes, config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    check_stored_dtypes(path, expected)
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
    result is as complete as the base. Files are written to a staging directory and swapped in by
    :func:`finish_checkpoint_dir`, so an interrupted save never leaves a half-written checkpoint.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    out_dir = Path(out_dir)
    tmp = begin_checkpoint_dir(out_dir)

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


def staging_dirs(out_dir: str | Path) -> tuple[Path, Path, Path]:
    """``(tmp, new, old)`` next to ``out_dir``: the checkpoint being written (possibly incomplete), the
    complete one waiting to take ``out_dir``'s name, and the replaced one being deleted."""
    out_dir = Path(out_dir)
    return tuple(out_dir.with_name(out_dir.name + sfx) for sfx in (TMP_SUFFIX, NEW_SUFFIX, OLD_SUFFIX))


def begin_checkpoint_dir(out_dir: str | Path) -> Path:
    """Recover ``out_dir`` from an interrupted earlier write (:func:`recover_checkpoint_dir`) and return an
    empty staging directory to write the new checkpoint into, then hand to :func:`finish_checkpoint_dir`."""
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    recover_checkpoint_dir(out_dir)
    tmp = staging_dirs(out_dir)[0]
    tmp.mkdir(parents=True)
    return tmp


def recover_checkpoint_dir(out_dir: str | Path) -> None:
    """Settle what an interrupted :func:`finish_checkpoint_dir` left next to ``out_dir``.

    A complete ``.new`` is swapped in (the interrupted write had finished: roll forward), a ``.old``
    is deleted once ``out_dir`` exists, and ``.tmp`` (never complete) is deleted. A ``.old`` without
    ``out_dir`` or ``.new``, which only the swap of earlier versions left, is renamed back.
    """
    tmp, new, old = staging_dirs(out_dir)
    _settle(Path(out_dir), new, old)
    if os.path.lexists(tmp):
        _remove(tmp)


def _settle(out: Path, new: Path, old: Path) -> None:
    if os.path.lexists(new):
        _install(new, out, old)
    elif not os.path.lexists(out) and os.path.lexists(old):
        os.replace(old, out)
        _fsync_dir(out.parent)
    if os.path.lexists(old):
        _remove(old)


def _install(new: Path, out: Path, old: Path) -> None:
    """Give the complete ``new`` the name ``out``; a previous ``out`` is moved to ``old`` and deleted.

    Two renames: at every instant a complete checkpoint is at ``out``, or the previous one at ``old``
    and the new one at ``new``; :func:`recover_checkpoint_dir` finishes the swap from either state.
    """
    if os.path.lexists(out):
        if os.path.lexists(old):
            _remove(old)
        os.replace(out, old)
    os.replace(new, out)
    _fsync_dir(out.parent)
    if os.path.lexists(old):
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _check_replaceable(out: Path) -> None:
    """Only a checkpoint (it has ``config.json``) or an empty directory is replaced: a mistyped output path
    must not delete someone's data."""
    if os.path.lexists(out) and not (out.is_dir() and ((out / "config.json").is_file() or not any(out.iterdir()))):
        raise CheckpointError(f"{out}: exists and is not a checkpoint directory (no config.json); refusing to "
                              f"replace it. Choose another output path or remove it")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk, so a rename after it cannot expose unwritten data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _written_float_dtype(tmp: Path) -> torch.dtype | None:
    """The one floating dtype of the non-VQ tensors written to ``tmp``, or None when they mix several."""
    found = {_DTYPES[e.dtype] for name, (_, e) in _entries(tmp).items()
             if not name.startswith(VQ_PREFIX) and _DTYPES[e.dtype].is_floating_point}
    return found.pop() if len(found) == 1 else None


def finish_checkpoint_dir(tmp: Path, out_dir: Path, config: ChameleonConfig, *, layout: str,
                          source_dir: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Complete a checkpoint written to ``tmp`` (weights already there) and swap it in as ``out_dir``.

    Adds ``config.json`` (declaring the dtype the weights were written in) and the tokenizer files and
    ``tokenizer/`` copied from ``source_dir``. ``dtype``, the dtype the caller cast floating weights
    to, must agree with what was written. Crash-safe replace: ``tmp`` is flushed and renamed to
    ``out_dir.new`` (complete from then on), an existing ``out_dir`` is renamed to ``out_dir.old``,
    ``.new`` to ``out_dir``, and ``.old`` deleted. A kill at any point leaves a complete checkpoint at
    ``out_dir``, or the old one at ``.old`` and the new one at ``.new``; the next write (or
    :func:`recover_checkpoint_dir`) finishes the swap.
    """
    tmp, out_dir = Path(tmp), Path(out_dir)
    _check_replaceable(out_dir)
    written = _written_float_dtype(tmp)
    if dtype is not None and written != dtype:
        raise CheckpointError(f"{tmp}: weights were written as {written}, not the requested {dtype}")
    cfg = config.to_dict()
    cfg.pop("_attn_implementation", None)
    cfg.pop("_attn_implementation_autoset", None)
    cfg.pop("torch_dtype", None)
    cfg["architectures"] = ["ChameleonForConditionalGeneration"]
    cfg["qk_norm_layout"] = layout
    cfg["dtype"] = None if written is None else str(written).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if source_dir is not None:
        source_dir = Path(source_dir)
        for fname in TOKENIZER_FILES:
            if (source_dir / fname).exists():
                shutil.copy2(source_dir / fname, tmp / fname)
        if (source_dir / "tokenizer").is_dir():
            shutil.copytree(source_dir / "tokenizer", tmp / "tokenizer")
    _fsync_tree(tmp)
    _, new, old = staging_dirs(out_dir)
    _settle(out_dir, new, old)  # what an interrupted earlier swap left
    os.replace(tmp, new)
    _install(new, out_dir, old)
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
