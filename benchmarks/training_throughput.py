"""Useful tokens per second: our packed training vs transformers' ``Trainer`` + PEFT with a padding collator.

What a user would otherwise run on the same model and data: ``Trainer`` over the PEFT model (the same
LoRA settings, AdamW, no evaluation or saving), batches of samples padded to their longest by
``DataCollatorForSeq2Seq`` (labels padded with -100), transformers' default sampler. Ours: the
training path of ``python -m chameleon_ft`` -- :class:`ChameleonLitModule` and :func:`build_trainer` --
over packed rows (``pack_by_length`` to ``max_length``, length-grouped batches of rows, the collator's
documents layout) with ``model.attn_implementation=auto``.

Both train one epoch over the same samples: the bundled digits VQA (64-px images) plus a synthetic
long-tailed mix (lognormal lengths, median ~300 tokens, each with an image span in its prompt), on
the tiny checkpoint. The figure is target tokens (labels other than -100, after the shift) per
second of training, ours over the Trainer's; both count the same targets. Each run is a fresh
process; they alternate. Goal >= 1.5.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import figure, median, run_worker

GOAL = ">= 1.5"
MAX_LENGTH = 1024
HF_BATCH = 8  # samples per step for the Trainer
PACKED_ROWS = 2  # packed rows per step for ours (about as many tokens per step as the Trainer's batches)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def synthetic_samples(model_path: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` samples of lognormal length (median 300, sigma 1, clipped to ``MAX_LENGTH``), each
    ``<s>`` + an image span (random codes, the checkpoint's layout) + a question, then an answer (the
    last third) that is the only target."""
    import numpy as np
    import torch

    from chameleon_ft.data.image_layout import image_to_ids
    from chameleon_ft.model.assets import CheckpointAssets

    assets = CheckpointAssets.open(model_path)
    tokens = assets.tokens
    grid = assets.vq_resolution // 16
    image = set(tokens.image_token_ids.tolist()) | {tokens.boi, tokens.eoi, tokens.row_end}
    text = torch.tensor([i for i in range(tokens.vocab_size) if i not in image and i > tokens.eos])
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        codes = torch.randint(tokens.num_codes, (grid, grid), generator=gen)
        span = image_to_ids(codes, tokens, assets.image_layout())
        total = int(np.clip(np.rint(rng.lognormal(np.log(300), 1.0)), len(span) + 8, MAX_LENGTH))
        words = text[torch.randint(len(text), (total - len(span) - 1,), generator=gen)].tolist()
        ids = [tokens.bos, *span, *words]
        answer = len(ids) - len(words) // 3
        labels = [-100] * answer + ids[answer:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def training_samples(model_path: str, digits: int, synthetic: int) -> list[dict]:
    """The digits VQA train samples (first ``digits``) and ``synthetic`` long-tailed ones, shuffled."""
    import random

    from benchmarks.data_throughput import _data_cfg
    from chameleon_ft.data.pipeline import TrainingSamples, tokenized_split

    ds = TrainingSamples(tokenized_split(_data_cfg(digits), model_path, "train", progress=False))
    samples = [ds[i] for i in range(len(ds))] + synthetic_samples(model_path, synthetic)
    random.Random(0).shuffle(samples)
    return [{"input_ids": list(s["input_ids"]), "labels": list(s["labels"])} for s in samples]


def target_tokens(samples: list[dict]) -> int:
    """Targets the loss counts: labels other than -100, except each sample's first position (never a target
    after the shift)."""
    return sum(sum(1 for t in s["labels"][1:] if t != -100) for s in samples)


def _config(model_path: str, max_steps: int):
    from omegaconf import OmegaConf

    from chameleon_ft.config.store import compose

    cfg = compose(["recipe=debug", f"trainer.max_steps={max_steps}", "trainer.val_check_interval=null",
                   "trainer.accelerator=cpu", "trainer.devices=1", "trainer.log_every_n_steps=10",
                   "trainer.enable_progress_bar=true", "checkpoint.every_n_steps=1000000000", "model.attn_implementation=auto",
                   "data.packing=true", f"data.max_length={MAX_LENGTH}", f"data.batch_size={PACKED_ROWS}",
                   "optim.warmup_steps=0", "optim.scheduler=constant"])
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.model.path = model_path
    return cfg


def _run_ours(model_path: str, samples: list[dict], run_dir: str) -> dict:
    import torch
    from lightning.pytorch.callbacks import Callback

    from chameleon_ft.data.collator import ConversationCollator, PackedRows, pack_by_length
    from chameleon_ft.data.sampler import LengthGroupedBatchSampler
    from chameleon_ft.model.attention import takes_documents
    from chameleon_ft.training.dataloading import ResumableDataLoader, training_attn_implementation, trainer_progress
    from chameleon_ft.training.module import ChameleonLitModule
    from chameleon_ft.training.train import build_trainer

    lengths = [len(s["input_ids"]) for s in samples]
    bins = pack_by_length(lengths, MAX_LENGTH)
    rows = PackedRows(samples, bins)
    sampler = LengthGroupedBatchSampler([sum(lengths[i] for i in b) for b in bins], PACKED_ROWS, seed=0)
    cfg = _config(model_path, len(sampler))
    attn = training_attn_implementation(cfg)
    collate = ConversationCollator(pad_id=0, max_length=MAX_LENGTH, flatten=takes_documents(attn))
    loader = ResumableDataLoader(rows, batch_sampler=sampler, collate_fn=collate)

    class Clock(Callback):
        def __init__(self):
            self.targets = 0

        def on_train_start(self, trainer, pl_module):
            self.start = _now()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.targets += int((batch["labels"][:, 1:] != -100).sum())

        def on_train_end(self, trainer, pl_module):
            self.end = _now()

    clock = Clock()
    torch.manual_seed(0)
    module = ChameleonLitModule(cfg, model_path)
    trainer = build_trainer(cfg, Path(run_dir), callbacks=[clock])
    loader.bind_progress(trainer_progress(trainer))
    trainer.fit(module, train_dataloaders=loader)
    return {"start": clock.start, "end": clock.end, "targets": clock.targets, "steps": len(sampler),
            "attn": attn, "rows": len(bins)}


def _run_hf(model_path: str, samples: list[dict], run_dir: str) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from benchmarks.step_overhead import _Rows, _peft_model
    from chameleon_ft.model.assets import CheckpointAssets

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = _now()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = _now()

    cfg = _config(model_path, 1)
    cfg.model.attn_implementation = "sdpa"  # transformers' default, as a user would load the model
    torch.manual_seed(0)
    model = _peft_model(cfg, model_path)
    tokenizer = CheckpointAssets.open(model_path).tokenizer
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    o = cfg.optim
    args = TrainingArguments(
        output_dir=run_dir, per_device_train_batch_size=HF_BATCH, num_train_epochs=1, learning_rate=float(o.lr),
        weight_decay=float(o.weight_decay), adam_beta1=float(o.betas[0]), adam_beta2=float(o.betas[1]),
        max_grad_norm=float(o.grad_clip), optim="adamw_torch", lr_scheduler_type="constant", logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0, use_cpu=True,
        remove_unused_columns=False, seed=0)
    clock = Clock()
    rows = [{"input_ids": s["input_ids"], "attention_mask": [1] * len(s["input_ids"]), "labels": s["labels"]}
            for s in samples]
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(rows), data_collator=collator, callbacks=[clock])
    out = trainer.train()
    targets = 0
    for batch in trainer.get_train_dataloader():
        targets += int((batch["labels"][:, 1:] != -100).sum())
    return {"start": clock.start, "end": clock.end, "targets": targets, "steps": int(out.global_step),
            "attn": model.config._attn_implementation}


def measure(mode: str, model_path: str, digits: int, synthetic: int, threads: int) -> dict:
    """Worker: one epoch with ``mode`` (ours | hf_trainer); target tokens and training time."""
    os.environ.setdefault("TTY_COMPATIBLE", "1")
    import torch

    torch.set_num_threads(threads)
    samples = training_samples(model_path, digits, synthetic)
    with tempfile.TemporaryDirectory(prefix=f"training_throughput_{mode}_") as run_dir:
        out = (_run_ours if mode == "ours" else _run_hf)(model_path, samples, run_dir)
    out["expected_targets"] = target_tokens(samples)
    out["wall"] = out["end"][0] - out["start"][0]
    out["cpu"] = out["end"][1] - out["start"][1]
    out["tokens"] = sum(len(s["input_ids"]) for s in samples)
    return out


def run(quick: bool, rounds: int | None = None) -> list[dict]:
    """Ours vs the Trainer, alternating, on the tiny checkpoint."""
    from benchmarks.data_throughput import _checkpoint
    from benchmarks.step_overhead import default_threads

    model_path = str(_checkpoint())
    digits, synthetic = (64, 64) if quick else (256, 192)
    rounds = rounds or (1 if quick else 3)
    threads = default_threads()
    per_round = []
    for r in range(rounds):
        order = ("ours", "hf_trainer") if r % 2 == 0 else ("hf_trainer", "ours")
        res = {m: run_worker("training_throughput", "measure", timeout=3600, mode=m, model_path=model_path,
                             digits=digits, synthetic=synthetic, threads=threads) for m in order}
        for m, got in res.items():
            if got["targets"] != got["expected_targets"]:
                raise RuntimeError(f"training_throughput: {m} trained {got['targets']} targets, the data holds "
                                   f"{got['expected_targets']}")
        per_round.append(res)
    first = per_round[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    desc = (f"tiny checkpoint, {digits} digits VQA + {synthetic} long-tailed synthetic samples with images "
            f"({first['ours']['tokens']:,} tokens, {first['ours']['expected_targets']:,} targets), one epoch; ours: "
            f"{first['ours']['rows']} packed rows of <= {MAX_LENGTH}, {PACKED_ROWS} rows/step, attention "
            f"{first['ours']['attn']}, {first['ours']['steps']} steps; Trainer: batches of {HF_BATCH} padded by "
            f"DataCollatorForSeq2Seq, attention {first['hf_trainer']['attn']}, {first['hf_trainer']['steps']} steps; "
            f"{threads} thread(s), {rounds} round(s), 1-min load {load:.1f}")
    out = []
    for key, what in (("wall", "wall"), ("cpu", "cpu")):
        rate = {m: [res[m]["expected_targets"] / res[m][key] for res in per_round] for m in ("ours", "hf_trainer")}
        ratios = [a / b for a, b in zip(rate["ours"], rate["hf_trainer"])]
        out.append(figure(f"training_throughput ours/hf_trainer {what}", median(rate["ours"]), median(rate["hf_trainer"]),
                          ratio=median(ratios), goal=GOAL, unit="target tokens/s",
                          notes=f"{'wall-clock' if what == 'wall' else 'process CPU'} time; {desc}",
                          round_ratios=ratios, samples=rate))
    return out
