"""Merge a LoRA adapter (and image-row deltas) into its base checkpoint, streaming tensor by tensor.

Command (argparse; ``key=value`` or ``--key value``)::

    python -m chameleon_ft.export.merge base=BASE_DIR adapter=ADAPTER_DIR out=OUT_DIR \
        layout=grouped|expanded [dtype=bfloat16|float16|float32] [max_shard_size=5GB]

``layout=grouped`` writes q/k norms as ``[model_parallel_size, head_dim]`` (Lumina-mGPT tooling);
``layout=expanded`` writes ``[num_heads, head_dim]``, loadable by stock transformers.

Only one output shard of tensors is in memory at a time (plus the small adapter): base tensors are read
one by one, ``W + scale * B @ A`` is added in float32 for LoRA-targeted weights, image-row deltas are
added to their rows, and each shard is written as soon as it is complete. A 7B model is never held twice.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from chameleon_ft.export.adapter import AdapterExportError, AdapterFiles, add_image_rows_, read_adapter
from chameleon_ft.model.checkpoint import (
    LAYOUTS,
    finish_checkpoint_dir,
    is_qk_norm,
    layout_rows,
    plan_shards,
    iter_tensors,
    load_config,
    tensor_shapes,
    to_layout,
    weight_files,
    write_shards,
)

_PEFT_PREFIX = "base_model.model."
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class MergeError(ValueError):
    """The adapter does not fit the base checkpoint, or asks for something merging cannot do."""


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule: a pattern key matches a module name ending in it, at a dot boundary.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_updates(adapter: AdapterFiles) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, torch.Tensor]]:
    """``({base weight name: (A, B, scale)}, {base tensor name: replacement})`` of a PEFT LoRA adapter.

    Replacements are ``modules_to_save`` copies. ``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
    with per-module ``rank_pattern`` / ``alpha_pattern`` as PEFT applies them.
    """
    cfg = adapter.config
    if cfg is None:
        return {}, {}
    where = adapter.path / "adapter_config.json"
    for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if cfg.get(flag):
            raise MergeError(f"{where}: {flag}=true is not supported by the merge")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replace = {}
    for key, t in adapter.tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            raise MergeError(f"{adapter.path}: tensor {key!r} does not start with {_PEFT_PREFIX!r}")
        name = key[len(_PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_" in name:
            raise MergeError(f"{adapter.path}: unsupported LoRA tensor {key!r}")
        else:
            replace[name] = t
    updates = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{adapter.path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MergeError(f"{adapter.path}: {module}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not chain")
        r = A.shape[0]
        expected_r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r"))
        if expected_r is not None and int(expected_r) != r:
            raise MergeError(f"{where}: {module} has rank {r} in the weights but {expected_r} in the config")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        updates[module + ".weight"] = (A, B, scale)
    return updates, replace


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise MergeError(f"cannot read shard size {text!r}; use e.g. 5GB or 500MB")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    layout: str = "expanded",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | str = 5 * 2**30,
) -> Path:
    """Write ``base`` + ``adapter`` as a full checkpoint at ``out`` in q/k-norm ``layout``.

    The result has sharded safetensors (+ index when more than one shard), ``config.json`` (with
    ``qk_norm_layout``), the base's tokenizer files and ``tokenizer/`` (VQGAN), and the base's VQ tensors.
    ``dtype`` casts floating weights (default: the base's dtype). Written to ``out.tmp`` then renamed.
    """
    if layout not in LAYOUTS:
        raise MergeError(f"layout={layout!r}: choose one of {LAYOUTS}")
    base, out = Path(base), Path(out)
    max_shard_bytes = _parse_size(max_shard_bytes)
    files = read_adapter(adapter)
    updates, replace = lora_updates(files)
    rows = files.image_rows
    config = load_config(base)
    files_of = weight_files(base)
    shapes = tensor_shapes(base)
    unknown = sorted(set(updates) - set(shapes)) + sorted(set(replace) - set(shapes))
    if unknown:
        raise MergeError(f"{files.path}: adapter targets tensors the base {base} does not have: {unknown[:5]}")
    for name, (A, B, _) in updates.items():
        if tuple(shapes[name]) != (B.shape[0], A.shape[1]):
            raise MergeError(f"{files.path}: LoRA for {name} is {B.shape[0]}x{A.shape[1]}, the base weight is {list(shapes[name])}")
    for name, t in replace.items():
        if tuple(shapes[name]) != tuple(t.shape):
            raise MergeError(f"{files.path}: {name} is {list(t.shape)} in the adapter but {list(shapes[name])} in the base")

    # Plan shards from the headers alone (no tensor data read yet).
    dtypes = {}
    for f in sorted(set(files_of.values())):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                dtypes[k] = h.get_slice(k).get_dtype()
    sizes = {}
    for name in sorted(shapes):
        numel = math.prod(shapes[name])
        if is_qk_norm(name):
            numel = layout_rows(name, config, layout) * shapes[name][-1]
        float_src = dtypes[name] in ("F64", "F32", "F16", "BF16")
        item = dtype.itemsize if dtype is not None and float_src and not name.startswith("model.vqmodel.") else _ITEMSIZE[dtypes[name]]
        sizes[name] = numel * item
    shards = plan_shards(sizes, max_shard_bytes)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    def merged_chunk(names):
        chunk = {}
        for name, t in iter_tensors(base, names):
            if name in replace:
                t = replace[name].to(t.dtype)
            if name in updates:
                A, B, scale = updates[name]
                t = (t.float() + scale * (B.float() @ A.float())).to(t.dtype)
            if rows is not None and name in rows.deltas:
                t = add_image_rows_({name: t.clone()}, rows)[name]
            t = to_layout(name, t, config, layout)
            if dtype is not None and t.is_floating_point() and not name.startswith("model.vqmodel."):
                t = t.to(dtype)
            chunk[name] = t.contiguous()
        return chunk

    write_shards(tmp, shards, merged_chunk)
    return finish_checkpoint_dir(tmp, out, config, layout=layout, source_dir=base, dtype=dtype)


def _kv_to_flags(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        if not a.startswith("-") and "=" in a:
            k, v = a.split("=", 1)
            out += [f"--{k}", v]
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m chameleon_ft.export.merge",
        description="Merge a LoRA adapter (and image-row deltas) into a base Chameleon checkpoint.")
    parser.add_argument("--base", required=True, help="base checkpoint directory (Hugging Face format)")
    parser.add_argument("--adapter", required=True, help="adapter directory written by training (adapter/)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--layout", choices=LAYOUTS, default="expanded",
                        help="q/k-norm layout: grouped (Lumina-mGPT) or expanded (stock transformers)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--max_shard_size", default="5GiB")
    args = parser.parse_args(_kv_to_flags(sys.argv[1:] if argv is None else argv))
    try:
        out = merge_adapter(args.base, args.adapter, args.out, layout=args.layout,
                            dtype=DTYPES.get(args.dtype), max_shard_bytes=args.max_shard_size)
    except (MergeError, AdapterExportError, ValueError) as e:
        print(f"merge failed: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint ({args.layout} q/k norm) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
