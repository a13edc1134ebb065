"""Packed LoRA training at seq 4,096: the dense ``[B, 1, T, T]`` mask vs packed documents without one.

One packed row of 4,096 tokens per step, cut into documents of long-tailed lengths (lognormal, median
~300 tokens), on the wide model of :mod:`benchmarks.step_overhead` (hidden 1024, head_dim 128, 4
layers, vocabulary 65,536). Each mode trains the same rows in a fresh process with the real training
model (:func:`chameleon_ft.training.model_init.build_train_model`: LoRA on attention, fp32 trainable
weights; on a GPU a bf16 frozen base under bf16 autocast) and AdamW:

- ``dense``: ``sdpa`` with the block-diagonal boolean mask of the collator's rows layout;
- ``sdpa_documents``: the documents layout, one causal SDPA call per document (CPU and GPU);
- on a GPU also ``flash_attention_2`` (when flash-attn is installed) and ``flex_attention``.

The figure is tokens per second (median step time after warm-up) of each document mode over dense;
every mode must reach the same step-0 loss. Goal on a GPU: >= 1.5x; the CPU figure has no goal.
"""

from __future__ import annotations

import os
import time

from benchmarks.common import figure, median, peak_meter, run_worker

SEQ = 4096
GPU_GOAL = ">= 1.5"
LOSS_RTOL = 1e-3  # the dense and documents paths agree to ~1e-6 in fp32; bf16 autocast is looser


def document_lengths(total: int, seed: int) -> list[int]:
    """Lengths of documents filling exactly ``total`` tokens: lognormal (median 300, sigma 1), >= 16."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: list[int] = []
    while sum(out) < total:
        n = int(np.clip(np.rint(rng.lognormal(np.log(300), 1.0)), 16, total))
        out.append(min(n, total - sum(out)))
    return out


def packed_rows(model_path: str, steps: int, seq: int = SEQ, seed: int = 0) -> list[list[dict]]:
    """``steps`` packed rows of ``seq`` text tokens (labels on the second half of every document)."""
    import torch
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    from chameleon_ft.model.checkpoint import load_config

    config = load_config(model_path)
    image = set(ChameleonImageVocabularyMapping(config.vocabulary_map).image_tokens)
    allowed = torch.tensor([i for i in range(config.vocab_size) if i not in image])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(steps):
        row = []
        for n in document_lengths(seq, seed * 1000 + step):
            ids = allowed[torch.randint(len(allowed), (n,), generator=gen)]
            labels = ids.clone()
            labels[: n // 2] = -100
            row.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
        rows.append(row)
    return rows


def measure(mode: str, model_path: str, device: str, steps: int, warmup: int, threads: int, seq: int = SEQ) -> dict:
    """Worker: ``warmup + steps`` optimizer steps of packed LoRA training with ``mode`` on rows of ``seq``
    tokens; step times (wall and process CPU), step-0 loss, peak memory."""
    import torch
    from omegaconf import OmegaConf

    from chameleon_ft.config.schema import ModelConfig, PeftConfig
    from chameleon_ft.data.collator import ConversationCollator
    from chameleon_ft.model.attention import takes_documents
    from chameleon_ft.training.model_init import build_train_model, resolve_base_dtype

    torch.set_num_threads(threads)
    dev = torch.device(device)
    attn = "sdpa" if mode == "dense" else mode
    model_cfg = OmegaConf.structured(ModelConfig(attn_implementation=attn, mask_image_logits=True))
    peft_cfg = OmegaConf.structured(PeftConfig(dropout=0.0))
    model = build_train_model(model_cfg, peft_cfg, model_path, device=dev, base_dtype=resolve_base_dtype("auto", dev),
                              seed=0).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    collate = ConversationCollator(pad_id=0, max_length=seq, flatten=takes_documents(attn))
    batches = [collate([row]) for row in packed_rows(model_path, warmup + steps, seq)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    times, cpu, loss0 = [], [], None
    with peak_meter(device) as meter:
        for batch in batches:
            batch = {k: v.to(dev) for k, v in batch.items() if k != "sample_index"}
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = model(**batch)
            (out.loss_sums.loss_sum / out.loss_sums.n_tokens).backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            loss0 = float(out.loss) if loss0 is None else loss0
    mask = batches[0].get("attention_mask")
    return {"times": times[warmup:], "cpu_times": cpu[warmup:], "loss0": loss0, "tokens": seq, "peak_bytes": meter.delta,
            "mask_bytes": int(mask.nbytes) if mask is not None else 0, "threads": threads,
            "documents_per_row": [int(b["sample_index"].max()) + 1 for b in batches]}


def _modes(device: str) -> list[str]:
    if device == "cpu":
        return ["dense", "sdpa_documents"]
    from chameleon_ft.model.attention import flash_attn_available

    return ["dense", "sdpa_documents", "flex_attention"] + (["flash_attention_2"] if flash_attn_available() else [])


def figures(device: str, steps: int, warmup: int, rounds: int, threads: int | None = None) -> list[dict]:
    """Alternate the modes for ``rounds`` rounds on ``device``; one figure per document mode."""
    from benchmarks.step_overhead import default_threads, model_path_for

    threads = threads or default_threads()
    model_path = model_path_for("wide")
    modes = _modes(device)
    per_round = []
    for r in range(rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        res = {m: run_worker("packed_attention", "measure", timeout=3600, mode=m, model_path=model_path, device=device,
                             steps=steps, warmup=warmup, threads=threads) for m in order}
        ref = res["dense"]["loss0"]
        for m, got in res.items():
            if abs(got["loss0"] - ref) > LOSS_RTOL * abs(ref):
                raise RuntimeError(f"packed_attention: {m} step-0 loss {got['loss0']} differs from dense {ref}")
        per_round.append(res)
    first = per_round[0]
    docs = first["dense"]["documents_per_row"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    shape = (f"wide model (hidden 1024, 4 layers, vocab 65,536), LoRA r16 on attention, 1 packed row x {SEQ} tokens "
             f"of {min(docs)}-{max(docs)} documents, {device}, {threads} thread(s), {warmup} warm-up + {steps} steps x "
             f"{rounds} rounds; dense mask {first['dense']['mask_bytes'] / 2**20:.0f} MiB/row; 1-min load {load:.1f}")
    # On a GPU the wall clock (synchronised); on a shared CPU also the process's CPU time, which the
    # neighbours disturb least (one intra-op thread).
    clocks = [("times", "wall")] + ([("cpu_times", "cpu")] if device == "cpu" else [])
    out = []
    for m in modes[1:]:
        for key, what in clocks:
            ratios = [median(res["dense"][key]) / median(res[m][key]) for res in per_round]
            ours = median([SEQ / median(res[m][key]) for res in per_round])
            dense = median([SEQ / median(res["dense"][key]) for res in per_round])
            out.append(figure(
                f"packed_attention {device} {m}/dense {what}", ours, dense, ratio=median(ratios),
                goal=GPU_GOAL if device == "cuda" else None, unit="tokens/s",
                notes=(f"packed training tokens/s ({'wall-clock' if what == 'wall' else 'process CPU'} time), {m} vs "
                       f"the dense [B,1,T,T] mask (sdpa); peak memory {first[m]['peak_bytes'] / 2**30:.2f} vs "
                       f"{first['dense']['peak_bytes'] / 2**30:.2f} GiB; {shape}"),
                samples={k: [res[k][key] for res in per_round] for k in modes}, round_ratios=ratios,
                loss0={k: first[k]["loss0"] for k in modes}))
    return out


def run(quick: bool) -> list[dict]:
    """CPU: dense vs sdpa_documents; with CUDA, every document implementation on the GPU as well."""
    import torch

    out = figures("cpu", steps=1 if quick else 2, warmup=1, rounds=1 if quick else 2)
    if torch.cuda.is_available():
        out += figures("cuda", steps=5 if quick else 10, warmup=3, rounds=1 if quick else 3)
    return out
