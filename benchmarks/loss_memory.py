"""Peak memory of the fused chunked LM loss vs stock cross-entropy on float32 logits.

Setup (as in a LoRA run): the LM head weight is frozen, the final hidden states require grad. Both
methods run forward and backward on the same seeded inputs, each in a fresh process; the figure is the
peak above what was in use right after the inputs were allocated: resident set size on CPU,
``torch.cuda.max_memory_allocated`` on a GPU (the ``cuda`` figure, only where CUDA is present). The
baseline is what stock transformers does (``ForCausalLMLoss``): project every position,
``logits.float()``, ``F.cross_entropy``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import GiB, figure, median, peak_meter, run_worker

VOCAB, HIDDEN, SEQ = 65_536, 4_096, 4_096
GOAL = "<= 0.25"


def measure(method: str, dtype: str, vocab: int, hidden: int, seq: int, seed: int, chunk_size: int, out: str,
            device: str = "cpu") -> dict:
    """Worker: one forward+backward of ``method`` (``"fused"`` or ``"plain"``) on ``device``; saves loss and
    grad to ``out``."""
    import torch
    import torch.nn.functional as F

    from chameleon_ft.model.loss import IGNORE_INDEX, fused_lm_loss

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=dt).mul_(0.02).to(device)  # frozen head
    h = torch.randn(1, seq, hidden, generator=gen, dtype=dt).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (1, seq), generator=gen).to(device)
    with peak_meter(device) as m:
        if method == "fused":
            sums = fused_lm_loss(h, weight, labels, chunk_size=chunk_size)
            loss = sums.loss_sum / sums.n_tokens
        elif method == "plain":
            logits = F.linear(h, weight)
            shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            loss = F.cross_entropy(logits.float().view(-1, vocab), shift.reshape(-1), ignore_index=IGNORE_INDEX)
        else:
            raise ValueError(f"unknown method {method!r}")
        loss.backward()
    torch.save({"loss": loss.detach().float().cpu(), "grad": h.grad.float().cpu()}, out)
    return {"delta": m.delta, "baseline": m.baseline, "peak": m.peak, "reset": m.reset, "seconds": m.seconds}


def _diffs(fused_file: Path, plain_file: Path) -> dict:
    import torch

    a = torch.load(fused_file, weights_only=True)
    b = torch.load(plain_file, weights_only=True)
    return {
        "loss": float(a["loss"]),
        "loss_abs_diff": float((a["loss"] - b["loss"]).abs()),
        "grad_max_abs_diff": float((a["grad"] - b["grad"]).abs().max()),
        "grad_max_abs": float(b["grad"].abs().max()),
    }


def figures(cases: list[tuple[str, int]], *, vocab: int = VOCAB, hidden: int = HIDDEN, seq: int = SEQ,
            chunk_size: int = 1024, seed: int = 0, device: str = "cpu") -> list[dict]:
    """Measure each ``(dtype, repeats)`` case on ``device``; fused and plain alternate so drift hits both alike."""
    out = []
    with tempfile.TemporaryDirectory(prefix="loss_memory_") as tmp:
        for dtype, repeats in cases:
            fused, plain, ratios, diffs = [], [], [], None
            for r in range(repeats):
                files = {m: Path(tmp) / f"{dtype}_{m}_{r}.pt" for m in ("fused", "plain")}
                run = {m: run_worker("loss_memory", "measure", method=m, dtype=dtype, vocab=vocab, hidden=hidden,
                                     seq=seq, seed=seed, chunk_size=chunk_size, out=str(files[m]), device=device)
                       for m in (("plain", "fused") if r % 2 else ("fused", "plain"))}
                fused.append(run["fused"]["delta"])
                plain.append(run["plain"]["delta"])
                ratios.append(run["fused"]["delta"] / max(run["plain"]["delta"], 1))
                if diffs is None:
                    diffs = _diffs(files["fused"], files["plain"])
                for f in files.values():
                    f.unlink()
            short = {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
            cuda = device.startswith("cuda")
            out.append(figure(
                f"loss_memory {short}" + (" cuda" if cuda else ""),
                median(fused) / GiB,
                median(plain) / GiB,
                ratio=median(ratios),
                goal=GOAL,
                unit="GiB",
                notes=(f"fused chunked CE vs F.cross_entropy(logits.float()); fwd+bwd, frozen head; "
                       f"{'torch.cuda.max_memory_allocated' if cuda else 'peak RSS'}; "
                       f"V={vocab} H={hidden} T={seq} B=1, chunk {chunk_size}; loss diff {diffs['loss_abs_diff']:.1e}, "
                       f"max grad diff {diffs['grad_max_abs_diff']:.1e} (max grad {diffs['grad_max_abs']:.1e}); n={repeats}"),
                samples={"fused_bytes": fused, "plain_bytes": plain, "ratios": ratios},
                check=diffs,
                dtype=dtype,
                meter="cuda_max_memory_allocated" if cuda else "peak_rss",
            ))
    return out


def run(quick: bool) -> list[dict]:
    """bf16 (what a real run uses) and, unless ``quick``, fp32 weights/hidden at V=65,536, H=4,096, T=4,096;
    with CUDA also bf16 on the GPU.

    A pair of fp32 runs takes about a minute on 2 CPU cores, hence 2 repeats and none in quick mode.
    """
    import torch

    out = figures([("bfloat16", 3)] if quick else [("bfloat16", 3), ("float32", 2)])
    if torch.cuda.is_available():
        out += figures([("bfloat16", 1 if quick else 3)], device="cuda")
    return out
