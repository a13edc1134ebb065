"""Peak memory of loading a sharded Chameleon-shaped checkpoint: ``load_model`` vs the naive way.

A checkpoint with the real on-disk layout (sharded safetensors + index, ``config.json`` with a full
65,536-entry ``vocabulary_map``) but fewer/narrower layers than 7B is built once and cached
(``CHAMELEON_FT_BENCH_CACHE``, default: the system temp dir). Each load runs in a fresh process;
the figure is peak RSS above the RSS after imports, divided by the bytes of the weights.

The naive way: a regularly initialised model (built directly in the stored dtype, which is the
kinder variant: building in float32 and casting would be worse) plus ``safetensors.torch.load_file``
of every shard into one dict, then ``load_state_dict``.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import GiB, PeakMeter, cache_dir, figure, median, run_worker

# hidden/intermediate/heads keep 7B's proportions (head_dim 128); 16 layers give ~2 GiB in bf16.
SPEC = {"hidden": 2048, "intermediate": 5504, "layers": 16, "heads": 16, "vocab": 65_536, "num_codes": 8192,
        "groups": 1, "dtype": "bfloat16", "shard_bytes": 2**30}
GOAL = "<= 1.3"
SPEC_FILE = "benchmark_spec.json"


def chameleon_vocab(size: int, num_codes: int) -> dict[str, int]:
    """A vocabulary laid out like 7B's: specials, ``IMGIMG`` codes from id 4, then ``<reservedNNNNN>`` = id - 4."""
    from chameleon_ft.model.tokens import image_token_name

    names = ["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(c) for c in range(num_codes)]
    names += ["<eoss>", "<racm3:break>"]
    reserved = [f"<reserved{i - 4:05d}>" for i in range(len(names), size)]
    reserved = ["<image>" if n == "<reserved08707>" else n for n in reserved]
    # Small test vocabularies do not reach the ids of these; put them first.
    needed = [n for n in ("<reserved08706>", "<image>", "<reserved08799>") if n not in reserved]
    names += needed + reserved[: len(reserved) - len(needed)]
    if len(names) != size:
        raise ValueError(f"vocabulary of {size} cannot hold {num_codes} image codes and the special tokens")
    return {n: i for i, n in enumerate(names)}


def chameleon_config(spec: dict, layers: int | None = None, max_positions: int = 4096):
    """A ``ChameleonConfig`` of a benchmark ``spec`` (hidden, intermediate, layers, heads, optional
    kv_heads and groups, vocab, num_codes) with a 7B-style vocabulary map."""
    from transformers import ChameleonConfig

    vocab = chameleon_vocab(spec["vocab"], spec["num_codes"])
    return ChameleonConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=layers or spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec.get("kv_heads", spec["heads"]), model_parallel_size=spec.get("groups", 1),
        vocabulary_map=vocab, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        max_position_embeddings=max_positions,
    )


def fill_value(name: str, index: int) -> float:
    """The constant every element of tensor ``name`` is set to (checked after loading)."""
    return 1.0 if name.endswith("norm.weight") else 0.001 * (index % 97 + 1)


def build_checkpoint(path: str | Path, spec: dict = SPEC) -> Path:
    """Write the benchmark checkpoint to ``path`` (reused if ``path`` holds one of the same ``spec``).

    Each tensor is a constant expanded to its shape (no memory), so only the shard being written is
    ever materialised.
    """
    import torch

    from chameleon_ft.model.checkpoint import save_state_dict
    from chameleon_ft.model.modeling import ChameleonFTForCausalLM

    path = Path(path)
    marker = path / SPEC_FILE
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    config = chameleon_config(spec)
    config._attn_implementation = "sdpa"
    dt = getattr(torch, spec["dtype"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ChameleonFTForCausalLM(config).state_dict().items()}
    tensors = {name: torch.full((1,), fill_value(name, i), dtype=dt).expand(shape)
               for i, (name, shape) in enumerate(shapes.items())}
    save_state_dict(tensors, config, path, max_shard_bytes=spec["shard_bytes"])
    marker.write_text(json.dumps(spec))
    return path


def load(method: str, path: str, dtype: str) -> dict:
    """Worker: load the checkpoint with ``method`` (``"ours"`` or ``"naive"``); peak RSS above post-import RSS."""
    import torch
    from safetensors.torch import load_file

    from chameleon_ft.model.checkpoint import load_config, load_model, weight_files
    from chameleon_ft.model.modeling import ChameleonFTForCausalLM

    dt = getattr(torch, dtype)
    with PeakMeter() as m:
        if method == "ours":
            model = load_model(path, dtype=dt)
        elif method == "naive":
            config = load_config(path)
            config._attn_implementation = "sdpa"
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dt)
            try:
                model = ChameleonFTForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
            state = {}
            for shard in sorted(set(weight_files(path).values())):
                state.update(load_file(shard))
            model.load_state_dict(state, strict=True)
            del state
        else:
            raise ValueError(f"unknown method {method!r}")
    state = model.state_dict()
    wrong = [n for i, (n, t) in enumerate(state.items())
             if t.dtype != dt or float(t.reshape(-1)[-1]) != float(torch.tensor(fill_value(n, i), dtype=dt))]
    if wrong:
        raise RuntimeError(f"{method}: loaded wrong values or dtype for {wrong[:5]}")
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"delta": m.delta, "baseline": m.baseline, "peak": m.peak, "reset": m.reset, "seconds": m.seconds,
            "weight_bytes": weight_bytes}


def figures(repeats: int, spec: dict = SPEC, path: str | Path | None = None) -> list[dict]:
    """Build (or reuse) the checkpoint, then alternate ours/naive loads ``repeats`` times."""
    path = Path(path) if path else cache_dir() / "checkpoint_h{hidden}_l{layers}_v{vocab}_{dtype}".format(**spec)
    build_checkpoint(path, spec)
    shards = len(list(path.glob("*.safetensors")))
    ours, naive, ratios, weight_bytes = [], [], [], None
    for r in range(repeats):
        run = {m: run_worker("checkpoint_load", "load", method=m, path=str(path), dtype=spec["dtype"])
               for m in (("naive", "ours") if r % 2 else ("ours", "naive"))}
        weight_bytes = run["ours"]["weight_bytes"]
        ours.append(run["ours"]["delta"])
        naive.append(run["naive"]["delta"])
        ratios.append(run["ours"]["delta"] / max(run["naive"]["delta"], 1))
    shape = (f"hidden {spec['hidden']}, {spec['layers']} layers, vocab {spec['vocab']}, {spec['dtype']}, "
             f"{weight_bytes / GiB:.2f} GiB in {shards} shard(s)")
    samples = {"ours_bytes": ours, "naive_bytes": naive, "weight_bytes": weight_bytes}
    return [
        figure("checkpoint_load ours/weights", median(ours) / GiB, weight_bytes / GiB, goal=GOAL, unit="GiB",
               notes=f"load_model peak RSS over weight bytes; {shape}; n={repeats}", samples=samples),
        figure("checkpoint_load naive/weights", median(naive) / GiB, weight_bytes / GiB, unit="GiB",
               notes=f"reference: init model in {spec['dtype']} + load_file every shard + load_state_dict; n={repeats}",
               samples=samples),
        figure("checkpoint_load ours/naive", median(ours) / GiB, median(naive) / GiB, ratio=median(ratios),
               unit="GiB", notes=f"peak RSS, load_model vs naive, median of paired ratios; n={repeats}",
               samples=samples),
    ]


def run(quick: bool) -> list[dict]:
    return figures(1 if quick else 3)
