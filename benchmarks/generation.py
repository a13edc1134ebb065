"""Image generation speed: transformers' ``generate`` vs our static-cache sampler, plain and with SJD.

One model, prompt, image size, guidance scale (3), image top-k (2000) and temperature (1), three ways:

- ``hf``: ``model.generate`` on the ``[cond; uncond]`` batch with a classifier-free-guidance logits
  processor (our :func:`~chameleon_ft.generation.logits.image_generation_processors`: guidance, grid,
  top-k, lockstep sampling) -- what a user writes with transformers (``generate_images(sampler="hf")``);
- ``plain``: the static KV cache, one forward per token, logits of the image codes only;
- ``sjd``: speculative Jacobi decoding on the same cache, window 16 (Lumina-mGPT 2.0's).

All three draw from the same distribution (tests/generation/test_image_sampler.py). The model is a random
wider-than-tiny Chameleon (hidden 1024, 4 layers, 7B's vocabulary of 65,536 with 8,192 image codes; the
same as step_overhead's), fp32 on CPU with one thread per core pair, bf16 on a GPU. Each round runs the
three back to back, in a rotating order, with the round's seed; a figure is the median over rounds of the
per-round ratio. Image tokens/s counts every token after the prompt's open image (codes, row ends,
end-image); forward passes are model calls per image (the prefill included). On CPU the rows use the
process's CPU time (a shared machine disturbs it least) and a wall-clock row is given too; on a GPU,
wall time, and the static-cache samplers once more with ``compile=True`` (CUDA graphs).

On CPU the speed-up of ``plain`` comes from two places: the LM head multiplies only the 8,192 image-code
rows (the grid gives every other id ``-inf``) -- at hidden 1024 the full head is more than half of the
weights read per token, at 7B 4% -- and the static cache (no per-step ``torch.cat`` of the cache, no
processor passes over 65,536 logits). A CPU is memory-bound here, so a window of 16 tokens costs SJD
more per forward than one token costs plain sampling; on a GPU it costs about the same.

Random weights make SJD's acceptance rate unlike a trained model's: the next-token distribution is flat
(top-k 2,000 of 8,192 codes nearly uniform), so a draft passes about as often as two flat distributions
overlap, while a trained model's peaked, context-dependent distributions behave differently (Lumina-mGPT
2.0 reports 694 s -> 324 s per image with SJD). Forced tokens (row ends, end-image) always pass, so small
images compress more. The forward-pass figure is a property of the model as much as of the sampler.
"""

from __future__ import annotations

import time

from benchmarks.common import cache_dir, figure, median
from benchmarks.step_overhead import WIDE_SPEC, build_wide_checkpoint, default_threads, model_path_for

SPEED_GOAL = ">= 2"
PASSES_GOAL = ">= 1.5"
CFG_SCALE, IMAGE_TOP_K, WINDOW = 3.0, 2000, 16
PROMPT_TOKENS = 32
# Image side in pixels and rounds, per device and mode.
CASES = {("cpu", False): (256, 3), ("cpu", True): (128, 2), ("cuda", False): (512, 3), ("cuda", True): (256, 2)}


def _model(device: str, spec: dict):
    import torch

    from chameleon_ft.model.checkpoint import load_model
    from chameleon_ft.model.tokens import ChameleonTokens

    if spec == WIDE_SPEC:
        path = model_path_for("wide")  # the checkpoint step_overhead builds
    else:
        path = build_wide_checkpoint(cache_dir() / "generation_h{hidden}_l{layers}_v{vocab}".format(**spec), spec)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load_model(path, dtype=dtype, device=device).eval(), ChameleonTokens.from_checkpoint(path)


def _prompt(tokens) -> list[int]:
    """A chat-template prompt of text tokens (ids above every special and image id)."""
    first = max(tokens.vocab.values()) - PROMPT_TOKENS
    return [tokens.bos, *range(first, first + PROMPT_TOKENS), tokens.eot]


def _timed(fn, device: str) -> tuple[object, float, float]:
    """``(result, wall seconds, CPU seconds)`` of ``fn()``, synchronised on a GPU."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - w0, time.process_time() - c0


def measure(size: int, rounds: int, device: str, compiled: bool = False, spec: dict = WIDE_SPEC) -> dict:
    """Per-round wall/CPU seconds, tokens and forward passes of each method at ``size`` px."""
    import torch

    from chameleon_ft.generation.generate import generate_images

    torch.set_num_threads(default_threads())
    model, tokens = _model(device, spec)
    prompt = _prompt(tokens)
    methods = {"hf": {"sampler": "hf"}, "plain": {"sampler": "plain"}, "sjd": {"sampler": "sjd"}}
    if compiled:
        methods.update({"plain_compiled": {"sampler": "plain", "compile": True},
                        "sjd_compiled": {"sampler": "sjd", "compile": True}})

    def draw(kw: dict, seed: int, side: int = size) -> dict:
        return generate_images(model, tokens, [prompt], width=side, height=side, cfg_scale=CFG_SCALE,
                               image_top_k=IMAGE_TOP_K, seed=seed, sjd_window=WINDOW, **kw)[0]

    # Warm-up: allocations and lazy initialisation (a small image), compilation (on a GPU: the measured shapes).
    for kw in methods.values():
        draw(kw, seed=10_000, side=size if device == "cuda" else 64)
    names = list(methods)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            out, wall, cpu = _timed(lambda kw=methods[n]: draw(kw, seed=r), device)
            samples[n].append({"wall": wall, "cpu": cpu, "tokens": len(out["token_ids"]),
                               "passes": out["forward_passes"]})
    return samples


def _tokens_per_s(s: dict, clock: str) -> float:
    return s["tokens"] / s[clock]


def figures(samples: dict, size: int, device: str, hidden: int = WIDE_SPEC["hidden"]) -> list[dict]:
    """The reported figures from :func:`measure`'s samples."""
    rounds = len(samples["hf"])
    clocks = [("cpu", "CPU time"), ("wall", "wall")] if device == "cpu" else [("wall", "wall")]
    n_tokens = samples["hf"][0]["tokens"]
    where = f"{size}x{size} px ({n_tokens} tokens), hidden {hidden}, {device}, median of {rounds} rounds"
    figs = []
    for ours in [n for n in samples if n != "hf"]:
        for clock, label in clocks:
            ratios = [_tokens_per_s(o, clock) / _tokens_per_s(b, clock) for o, b in zip(samples[ours], samples["hf"])]
            goal = SPEED_GOAL if ours == "plain" and clock == clocks[0][0] else None
            figs.append(figure(f"generation {ours} / HF generate, image tokens/s ({label})",
                               median(_tokens_per_s(s, clock) for s in samples[ours]),
                               median(_tokens_per_s(s, clock) for s in samples["hf"]), ratio=median(ratios),
                               goal=goal, unit="tokens/s", notes=where, samples={"ratios": ratios}))
    passes = {n: [s["passes"] for s in samples[n]] for n in samples}
    ratios = [p / s for p, s in zip(passes["plain"], passes["sjd"])]
    figs.append(figure("generation forward passes per image, plain / SJD", median(passes["sjd"]),
                       median(passes["plain"]), ratio=median(ratios), goal=PASSES_GOAL, unit="forwards",
                       notes=f"{where}; window {WINDOW}; HF generate: {median(passes['hf']):.0f}; random weights",
                       samples={"passes": passes}))
    return figs


def run(quick: bool) -> list[dict]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, rounds = CASES[(device, quick)]
    samples = measure(size, rounds, device, compiled=device == "cuda")
    return figures(samples, size, device)
