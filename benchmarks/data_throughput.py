"""Data path: the pre-tokenized cache vs VQ-encoding on the fly, and packing vs naive padding.

- **Throughput**: collated batches per second from the cache (``TrainingSamples`` +
  ``LengthGroupedBatchSampler`` + ``ConversationCollator`` through a ``DataLoader``) vs encoding the
  canonical records of the same batches on the fly (open the images, VQ-encode them, tokenize:
  ``ConversationEncoder.encode_batch``, then the same collator). Bundled digits VQA, 64-px images, tiny
  checkpoint's VQGAN, CPU. The two alternate in the same process; the figure is the median of the
  per-repeat ratios. Building the cache is a one-off (kept in the benchmark cache dir) and not timed.
- **Packing efficiency**: share of non-pad tokens in the collated batches over one epoch, with packing
  (``pack_by_length`` to ``max_length``, rows batched) vs naive padding (shuffled batches of samples,
  each padded to its longest). On the digits VQA and on a synthetic long-tailed length mix (lognormal,
  clipped to ``max_length`` 2048). Deterministic, so no repeats.
"""

from __future__ import annotations

import os
import time

from benchmarks.common import cache_dir, figure, median

MAX_LENGTH = 2048
BATCH = 8  # samples per batch (naive / throughput); packed rows are batched by PACKED_ROWS
PACKED_ROWS = 2  # packed rows per batch: each batch is padded to its fuller row
PACKING_GOAL = ">= 0.95"


def _checkpoint():
    # Keep the tiny checkpoint and digit PNGs out of the user's cache unless one is configured.
    os.environ.setdefault("CHAMELEON_FT_CACHE", str(cache_dir() / "chameleon_ft"))
    from chameleon_ft.tiny import tiny_checkpoint

    return tiny_checkpoint("grouped")


def _data_cfg(max_samples: int | None):
    from chameleon_ft.data.config import DataConfig

    return DataConfig(format="digits", task="vqa", image_size=64, max_samples=max_samples, max_length=MAX_LENGTH,
                      batch_size=BATCH, cache_dir=str(cache_dir() / "data_throughput"))


def throughput(max_samples: int | None, repeats: int, fly_batches: int) -> list[dict]:
    """Cache vs on-the-fly batches per second (median over ``repeats``, alternating)."""
    import torch
    from torch.utils.data import DataLoader

    from chameleon_ft.data.collator import ConversationCollator
    from chameleon_ft.data.pipeline import TrainingSamples, build_encoder, tokenized_split
    from chameleon_ft.data.reading import read_conversations
    from chameleon_ft.data.sampler import LengthGroupedBatchSampler
    from chameleon_ft.model.tokens import ChameleonTokens

    ckpt = _checkpoint()
    cfg = _data_cfg(max_samples)
    ds = tokenized_split(cfg, ckpt, "train", progress=False)
    records = read_conversations(cfg, "train")
    encoder = build_encoder(cfg, ckpt, device="cpu")
    tokens = ChameleonTokens.from_checkpoint(ckpt)
    collate = ConversationCollator(pad_id=tokens.pad, max_length=MAX_LENGTH)
    samples = TrainingSamples(ds)

    def from_cache(epoch: int) -> tuple[int, float]:
        sampler = LengthGroupedBatchSampler(samples.lengths, BATCH, seed=0)
        sampler.set_epoch(epoch)
        loader = DataLoader(samples, batch_sampler=sampler, collate_fn=collate, num_workers=0)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += int(batch["input_ids"].shape[0] > 0)
        return n, time.perf_counter() - t0

    def on_the_fly(epoch: int) -> tuple[int, float]:
        sampler = LengthGroupedBatchSampler(samples.lengths, BATCH, seed=0)
        sampler.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for idx in sampler:
            outs = encoder.encode_batch([records[i] for i in idx])
            batch = collate([{"input_ids": o["input_ids"], "labels": o["labels"]} for o in outs])
            n += int(batch["input_ids"].shape[0] > 0)
            if n == fly_batches:
                break
        return n, time.perf_counter() - t0

    # Both paths must produce the same batches (the cache is only a faster way to the same tokens).
    sampler = LengthGroupedBatchSampler(samples.lengths, BATCH, seed=0)
    first = next(iter(sampler))
    cached = collate([samples[i] for i in first])
    fresh = collate([{k: o[k] for k in ("input_ids", "labels")}
                     for o in encoder.encode_batch([records[i] for i in first])])
    if not all(torch.equal(cached[k], fresh[k]) for k in cached):
        raise RuntimeError("cached and on-the-fly batches differ")

    cache_rates, fly_rates, ratios = [], [], []
    for r in range(repeats):
        order = (on_the_fly, from_cache) if r % 2 else (from_cache, on_the_fly)
        got = {f.__name__: f(r) for f in order}
        c = got["from_cache"][0] / got["from_cache"][1]
        f = got["on_the_fly"][0] / got["on_the_fly"][1]
        cache_rates.append(c)
        fly_rates.append(f)
        ratios.append(c / f)
    n_cache = len(LengthGroupedBatchSampler(samples.lengths, BATCH, seed=0))
    notes = (f"digits VQA train ({len(ds)} samples, 64 px, tiny VQGAN, CPU, {torch.get_num_threads()} threads), "
             f"batch {BATCH}; cache: full epoch ({n_cache} batches) via DataLoader; on the fly: first "
             f"{fly_batches} batches of the same order; median of paired ratios, n={repeats}")
    return [figure("data_throughput cache/on-the-fly", median(cache_rates), median(fly_rates), ratio=median(ratios),
                   unit="batches/s", notes=notes, samples={"cache": cache_rates, "on_the_fly": fly_rates})]


def _efficiency(batches, collate) -> tuple[int, int]:
    """(non-pad tokens, token slots) over ``batches`` (lists of samples or of packed rows)."""
    real = slots = 0
    for items in batches:
        out = collate(items)
        real += int((out["sample_index"] >= 0).sum())
        slots += out["input_ids"].numel()
    return real, slots


def packing_figures(name: str, lengths: list[int], seed: int = 0) -> list[dict]:
    """Packed vs naive non-pad share for samples of ``lengths`` (dummy ids)."""
    import torch

    from chameleon_ft.data.collator import ConversationCollator, PackedRows, pack_by_length

    samples = [{"input_ids": [5] * n, "labels": [5] * n} for n in lengths]
    collate = ConversationCollator(pad_id=0, max_length=MAX_LENGTH)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    naive = _efficiency(([samples[i] for i in order[s : s + BATCH]] for s in range(0, len(order), BATCH)), collate)
    bins = pack_by_length(lengths, MAX_LENGTH)
    rows = PackedRows(samples, bins)
    row_order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    packed = _efficiency(([rows[k] for k in row_order[s : s + PACKED_ROWS]]
                          for s in range(0, len(row_order), PACKED_ROWS)), collate)
    assert packed[0] == naive[0] == sum(lengths)
    desc = (f"{len(lengths)} samples, lengths {min(lengths)}..{max(lengths)} (median {int(median(lengths))}), "
            f"max_length {MAX_LENGTH}")
    return [
        figure(f"data_throughput packing {name}", packed[0], packed[1], goal=PACKING_GOAL, unit="tokens",
               notes=f"non-pad share, pack_by_length into {len(bins)} rows, {PACKED_ROWS} rows/batch "
                     f"({packed[0] / (len(bins) * MAX_LENGTH):.3f} if every row were padded to {MAX_LENGTH}); {desc}"),
        figure(f"data_throughput naive {name}", naive[0], naive[1], unit="tokens",
               notes=f"non-pad share, shuffled batches of {BATCH} padded to the longest (multiple of 8); {desc}"),
    ]


def synthetic_lengths(n: int, seed: int = 0) -> list[int]:
    """Long-tailed lengths: lognormal (median ~300 tokens, sigma 1), clipped to [16, MAX_LENGTH]."""
    import numpy as np

    x = np.random.default_rng(seed).lognormal(mean=np.log(300), sigma=1.0, size=n)
    return np.clip(np.rint(x), 16, MAX_LENGTH).astype(int).tolist()


def run(quick: bool) -> list[dict]:
    max_samples = 256 if quick else None  # None: the whole digits VQA train split
    figs = throughput(max_samples, repeats=2 if quick else 3, fly_batches=6 if quick else 16)
    from chameleon_ft.data.pipeline import TrainingSamples, tokenized_split

    ds = tokenized_split(_data_cfg(max_samples), _checkpoint(), "train", progress=False)
    figs += packing_figures("digits_vqa", TrainingSamples(ds).lengths)
    figs += packing_figures("lognormal", synthetic_lengths(1000 if quick else 4000))
    return figs
