"""Merge an adapter (LoRA and/or image-token rows) into its base checkpoint, streaming tensor by tensor.

The command: ``python -m chameleon_ft.merge base=BASE_DIR adapter=ADAPTER_DIR out=OUT_DIR layout=grouped|expanded
[dtype=bfloat16|float16|float32] [max_shard_size=5GB]`` (:mod:`chameleon_ft.merge`).

``layout=grouped`` writes q/k norms as ``[model_parallel_size, head_dim]`` (Lumina-mGPT tooling);
``layout=expanded`` writes ``[num_heads, head_dim]``, loadable by stock transformers.

Only one output shard of tensors is in memory at a time (plus the small adapter): base tensors are read
one by one, ``W + scale * B @ A`` is added in float32 for LoRA-targeted weights, image-token rows are
replaced, and each shard is written as soon as it is complete. A 7B model is never held twice. The
adapter's sample settings (``chameleon_ft.json``) are copied into the merged checkpoint.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from chameleon_ft.adapter import SETTINGS_FILE, read_adapter, weight_updates
from chameleon_ft.errors import CheckpointError, ConfigError
from chameleon_ft.model.checkpoint import (
    LAYOUTS,
    begin_checkpoint_dir,
    dtype_size,
    finish_checkpoint_dir,
    is_qk_norm,
    iter_tensors,
    layout_rows,
    load_config,
    plan_shards,
    tensor_dtypes,
    tensor_shapes,
    to_layout,
    write_shards,
)
from chameleon_ft.model.tensors import DTYPES
from chameleon_ft.vq.vqgan import VQ_PREFIX


@dataclass
class MergeConfig:
    """Options of ``python -m chameleon_ft.merge`` (``key=value``)."""

    base: Optional[str] = None  # base checkpoint directory (Hugging Face format)
    adapter: Optional[str] = None  # adapter directory written by training (<run dir>/adapter)
    out: Optional[str] = None  # output directory
    layout: str = "expanded"  # q/k-norm layout: grouped (Lumina-mGPT) | expanded (stock transformers)
    dtype: Optional[str] = None  # cast floating weights: bfloat16 | float16 | float32 (default: keep)
    max_shard_size: str = "5GB"  # shard size limit: bytes, or with a unit (KB, MB, GB)


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, *, layout: str = "expanded",
                  dtype: torch.dtype | None = None, max_shard_bytes: int | str = 5 * 2**30) -> Path:
    """Write ``base`` + ``adapter`` as a full checkpoint at ``out`` in q/k-norm ``layout``.

    The result has sharded safetensors (+ index when more than one shard), ``config.json`` (with
    ``qk_norm_layout``), the base's tokenizer files and ``tokenizer/`` (VQGAN), the base's VQ tensors, and
    the adapter's ``chameleon_ft.json``. ``dtype`` casts floating weights (default: the base's dtype).
    Written to ``out.tmp`` then renamed.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r}: choose one of {LAYOUTS}")
    base, out = Path(base), Path(out)
    files = read_adapter(adapter)
    updates = weight_updates(files)
    config = load_config(base)
    shapes = tensor_shapes(base)
    unknown = sorted(updates.targets - set(shapes))
    if unknown:
        raise CheckpointError(f"{files.path}: adapter targets tensors the base {base} does not have: {unknown[:5]}")
    for name, (A, B, _) in updates.lora.items():
        if tuple(shapes[name]) != (B.shape[0], A.shape[1]):
            raise CheckpointError(f"{files.path}: LoRA for {name} is {B.shape[0]}x{A.shape[1]}, "
                                  f"the base weight is {list(shapes[name])}")
    for name, t in updates.replace.items():
        if tuple(shapes[name]) != tuple(t.shape):
            raise CheckpointError(f"{files.path}: {name} is {list(t.shape)} in the adapter but {list(shapes[name])} in the base")

    # Plan shards from the headers alone (no tensor data read yet).
    dtypes = tensor_dtypes(base)
    sizes = {}
    for name in sorted(shapes):
        numel = math.prod(shapes[name])
        if is_qk_norm(name):
            numel = layout_rows(name, config, layout) * shapes[name][-1]
        cast = dtype is not None and dtypes[name] in ("F64", "F32", "F16", "BF16") and not name.startswith(VQ_PREFIX)
        sizes[name] = numel * (dtype.itemsize if cast else dtype_size(dtypes[name]))
    shards = plan_shards(sizes, max_shard_bytes)

    tmp = begin_checkpoint_dir(out)  # refuses, before any work, an output that is not a checkpoint

    def merged_chunk(names):
        chunk = {}
        for name, t in iter_tensors(base, names):
            t = to_layout(name, updates.apply(name, t), config, layout)
            if dtype is not None and t.is_floating_point() and not name.startswith(VQ_PREFIX):
                t = t.to(dtype)
            chunk[name] = t.contiguous()
        return chunk

    write_shards(tmp, shards, merged_chunk)
    if files.settings is not None:
        shutil.copy2(files.path / SETTINGS_FILE, tmp / SETTINGS_FILE)
    return finish_checkpoint_dir(tmp, out, config, layout=layout, source_dir=base, dtype=dtype)


def merge(cfg: MergeConfig) -> Path:
    """The command: :func:`merge_adapter` with the options of ``cfg``."""
    for key in ("base", "adapter", "out"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"{key}=PATH is required (base=BASE_DIR adapter=ADAPTER_DIR out=OUT_DIR)")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r}: choose one of {sorted(DTYPES)}")
    out = merge_adapter(cfg.base, cfg.adapter, cfg.out, layout=cfg.layout, dtype=DTYPES.get(cfg.dtype),
                        max_shard_bytes=cfg.max_shard_size)
    print(f"merged checkpoint ({cfg.layout} q/k norm) written to {out}")
    return out
