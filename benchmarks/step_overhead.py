"""Time per optimizer step of our Lightning LoRA training vs a hand-written PyTorch + PEFT loop.

Three ways to train the same LoRA model on the same batches, each in a fresh process, alternating:

- ``ours``: the code path of ``python -m chameleon_ft`` -- the config composed by Hydra,
  :class:`ChameleonLitModule` and :func:`build_trainer` (TensorBoard + CSV logging, Rich progress bar,
  the periodic checkpoint callback with a period longer than the run);
- ``hand``: ``load_model`` + ``peft.get_peft_model`` (same LoRA settings) + ``torch.optim.AdamW``, and
  per step ``zero_grad``, ``model(**batch).loss``, ``backward``, ``clip_grad_norm_``, ``step``;
- ``hf_trainer``: transformers' ``Trainer`` on the same PEFT model, optimizer settings and samples
  (``per_device_train_batch_size``, sequential sampling, no eval, no saving, ``report_to="none"``,
  tqdm on, logging as often as ours).

A step's time is the interval between the ends of consecutive optimizer steps, so data loading,
logging and progress-bar updates count wherever they happen. Warm-up steps are skipped. All three
use the same ``torch.set_num_threads``; the three results of a round must agree on trainable parameter
count, tokens per step and step-0 loss. The figure is the median over rounds of the ratio of median
step times measured in the same round, once for wall-clock time and once for the process's CPU time
(``time.process_time``): on a shared machine the wall clock also measures the neighbours, while the
CPU time of a single-threaded run does not.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import cache_dir, figure, median, run_worker

GOAL = "<= 1.02"
MODES = ("ours", "hand", "hf_trainer")
# A wider model that still trains on a CPU: hidden 1024 (head_dim 128 like 7B), 7B's vocabulary size.
WIDE_SPEC = {"hidden": 1024, "intermediate": 2816, "layers": 4, "heads": 8, "vocab": 65_536, "num_codes": 8192,
             "seed": 0}
# (name, batch, sequence length, warm-up steps, measured steps, rounds) per model; quick variants below.
CASES = {
    "tiny": {"batch": 8, "seq": 128, "warmup": 5, "steps": 20, "rounds": 5},
    "wide": {"batch": 1, "seq": 128, "warmup": 2, "steps": 8, "rounds": 3},
}
QUICK_CASES = {
    "tiny": {"batch": 8, "seq": 128, "warmup": 3, "steps": 10, "rounds": 2},
    "wide": {"batch": 1, "seq": 128, "warmup": 2, "steps": 4, "rounds": 1},
}
LOG_EVERY = 10  # optimizer steps between metric logs, in all three
LOSS_RTOL = 1e-4


class StepOverheadError(RuntimeError):
    """The three loops did not do the same work (parameter counts, tokens or step-0 loss differ)."""


def _now() -> tuple[float, float]:
    """(wall clock, CPU time of this process): the CPU time is what a busy machine disturbs least."""
    return time.perf_counter(), time.process_time()


def default_threads() -> int:
    """The intra-op thread count used for every mode: half the cores (at most 4), so that a busy
    machine does not stall torch's thread barriers (on 2 cores, one thread)."""
    return max(1, min((os.cpu_count() or 1) // 2, 4))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def build_wide_checkpoint(path: str | Path, spec: dict = WIDE_SPEC) -> Path:
    """A random fp32 Chameleon checkpoint of ``spec`` (7B-style vocabulary map), cached at ``path``."""
    import torch

    from benchmarks.checkpoint_load import chameleon_config
    from chameleon_ft.model.checkpoint import save_state_dict
    from chameleon_ft.model.modeling import ChameleonFTForCausalLM

    path = Path(path)
    marker = path / "benchmark_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    config = chameleon_config(spec)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ChameleonFTForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(int(spec["seed"]))
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
        elif name.endswith("norm.bias"):
            tensors[name] = torch.zeros(shape)
        else:
            tensors[name] = torch.randn(shape, generator=gen).mul_(0.02)
    save_state_dict(tensors, config, path, max_shard_bytes=2**30)
    marker.write_text(json.dumps(spec))
    return path


def model_path_for(case: str) -> str:
    if case == "tiny":
        from chameleon_ft.tiny import tiny_checkpoint

        return str(tiny_checkpoint())
    if case == "wide":
        return str(build_wide_checkpoint(cache_dir() / "step_overhead_h{hidden}_l{layers}_v{vocab}".format(**WIDE_SPEC)))
    raise ValueError(f"unknown case {case!r}")


def make_samples(model_path: str, n: int, seq: int, seed: int = 0) -> list[dict]:
    """``n`` random text-token rows of length ``seq`` (labels = inputs, all attended).

    Image-token ids are left out: with ``mask_image_logits`` (the default) their logits are -inf.
    """
    import torch
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    from chameleon_ft.model.checkpoint import load_config
    from chameleon_ft.model.modeling import ChameleonFTModel  # noqa: F401 (transformers import order)

    config = load_config(model_path)
    image = set(ChameleonImageVocabularyMapping(config.vocabulary_map).image_tokens)
    allowed = torch.tensor([i for i in range(config.vocab_size) if i not in image])
    gen = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (n, seq), generator=gen)]
    return [{"input_ids": row.clone(), "attention_mask": torch.ones(seq, dtype=torch.long), "labels": row.clone()}
            for row in ids]


class _Rows:
    """A map-style dataset over a list of sample dicts (for the DataLoaders and HF ``Trainer``)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def run_config(model_path: str, max_steps: int):
    """Our run config for this benchmark, composed exactly as the CLI composes it."""
    from omegaconf import OmegaConf

    from chameleon_ft.config.store import compose

    cfg = compose([
        "recipe=debug", f"trainer.max_steps={max_steps}", "trainer.val_check_interval=null",
        f"trainer.log_every_n_steps={LOG_EVERY}", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.enable_progress_bar=true", "logger.tensorboard=true", "logger.csv=true",
        "checkpoint.every_n_steps=1000000000",
    ])
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.model.path = model_path
    return cfg


# ---------------------------------------------------------------------------------------------
# The three loops (each runs in its own worker process)
# ---------------------------------------------------------------------------------------------
def _run_ours(cfg, model_path, rows, batch, run_dir) -> dict:
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from chameleon_ft.training.module import ChameleonLitModule
    from chameleon_ft.training.train import build_trainer

    class StepTimer(Callback):
        def __init__(self):
            self.ends: list[float] = []
            self.loss0 = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(_now())
            if self.loss0 is None:
                # The progress-bar loss: logged every step (train/* only on the loggers' steps).
                self.loss0 = float(trainer.callback_metrics["loss"])

    timer = StepTimer()
    torch.manual_seed(int(cfg.seed))
    module = ChameleonLitModule(cfg, model_path)
    trainer = build_trainer(cfg, Path(run_dir), callbacks=[timer])
    loader = DataLoader(_Rows(rows), batch_size=batch, shuffle=False, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"ends": timer.ends, "loss0": timer.loss0, "trainable": trainable}


def _peft_model(cfg, model_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from chameleon_ft.adapter import TARGET_PRESETS
    from chameleon_ft.model.checkpoint import load_model

    m = cfg.model
    model = load_model(model_path, dtype=torch.float32, attn_implementation=m.attn_implementation,
                       mask_image_logits=m.mask_image_logits, z_loss_weight=m.z_loss_weight, dropout=m.dropout,
                       loss_chunk_size=m.loss_chunk_size)
    p = cfg.peft
    lora = LoraConfig(r=int(p.r), lora_alpha=int(p.alpha), lora_dropout=float(p.dropout),
                      target_modules=list(TARGET_PRESETS[str(p.target_modules)]), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model


def _run_hand(cfg, model_path, rows, batch, run_dir) -> dict:
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(int(cfg.seed))
    model = _peft_model(cfg, model_path)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=float(o.lr), betas=tuple(float(b) for b in o.betas), eps=float(o.eps),
                            weight_decay=float(o.weight_decay))
    loader = DataLoader(_Rows(rows), batch_size=batch, shuffle=False, num_workers=0)
    ends, loss0 = [], None
    for b in loader:
        opt.zero_grad(set_to_none=True)
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(o.grad_clip))
        opt.step()
        if loss0 is None:
            loss0 = float(loss)
        ends.append(_now())
    return {"ends": ends, "loss0": loss0, "trainable": sum(p.numel() for p in params)}


def _run_hf_trainer(cfg, model_path, rows, batch, run_dir) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.loss0 = None

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(_now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.loss0 is None and logs and "loss" in logs:
                self.loss0 = float(logs["loss"])

    torch.manual_seed(int(cfg.seed))
    model = _peft_model(cfg, model_path)
    o = cfg.optim
    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=batch, max_steps=int(cfg.trainer.max_steps),
        learning_rate=float(o.lr), weight_decay=float(o.weight_decay), adam_beta1=float(o.betas[0]),
        adam_beta2=float(o.betas[1]), adam_epsilon=float(o.eps), max_grad_norm=float(o.grad_clip),
        optim="adamw_torch", lr_scheduler_type="constant", logging_steps=LOG_EVERY, logging_first_step=True,
        save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
        disable_tqdm=False, use_cpu=True, remove_unused_columns=False, train_sampling_strategy="sequential",
        seed=int(cfg.seed),
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(rows), callbacks=[timer])
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"ends": timer.ends, "loss0": timer.loss0, "trainable": trainable}


RUNNERS = {"ours": _run_ours, "hand": _run_hand, "hf_trainer": _run_hf_trainer}


def measure(mode: str, model_path: str, batch: int, seq: int, warmup: int, steps: int, threads: int,
            seed: int = 0) -> dict:
    """Worker: train ``warmup + steps`` optimizer steps with ``mode``; the step intervals after warm-up."""
    # Render the Rich bar as in a terminal (the worker's output is a pipe).
    os.environ.setdefault("TTY_COMPATIBLE", "1")
    os.environ.setdefault("TTY_INTERACTIVE", "1")
    import torch

    torch.set_num_threads(threads)
    total = warmup + steps
    cfg = run_config(model_path, total)
    rows = make_samples(model_path, batch * total, seq, seed)
    with tempfile.TemporaryDirectory(prefix=f"step_overhead_{mode}_") as run_dir:
        out = RUNNERS[mode](cfg, model_path, rows, batch, run_dir)
    # The Rich bar leaves the cursor mid-line; the harness reads the result from a line of its own.
    sys.stdout.write("\n")
    sys.stdout.flush()
    ends = out.pop("ends")
    if len(ends) != total:
        raise StepOverheadError(f"{mode}: {len(ends)} optimizer steps recorded, expected {total}")
    if torch.get_num_threads() != threads:
        raise StepOverheadError(f"{mode}: thread count changed to {torch.get_num_threads()} during the run")
    # Intervals between consecutive step ends, from the end of the last warm-up step on.
    intervals = [b[0] - a[0] for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    cpu = [b[1] - a[1] for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    return {**out, "intervals": intervals, "cpu_intervals": cpu, "tokens_per_step": batch * seq, "threads": threads}


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def check_same_work(results: dict[str, dict]) -> None:
    """Raise :class:`StepOverheadError` unless every mode trained as many LoRA parameters on as many
    tokens per step, with the same step-0 loss."""
    ref = results["hand"]
    for mode, r in results.items():
        if r["trainable"] != ref["trainable"] or r["tokens_per_step"] != ref["tokens_per_step"]:
            raise StepOverheadError(
                f"{mode}: {r['trainable']} trainable parameters / {r['tokens_per_step']} tokens per step, "
                f"hand loop: {ref['trainable']} / {ref['tokens_per_step']}")
        if r["loss0"] is None or abs(r["loss0"] - ref["loss0"]) > LOSS_RTOL * abs(ref["loss0"]):
            raise StepOverheadError(f"{mode}: step-0 loss {r['loss0']} differs from the hand loop's {ref['loss0']}")


def figures(case: str, params: dict, *, threads: int | None = None, model_path: str | None = None,
            label: str | None = None) -> list[dict]:
    """Alternate the three modes for ``params['rounds']`` rounds; ours/hand and hf_trainer/hand figures."""
    threads = threads or default_threads()
    model_path = model_path or model_path_for(case)
    label = label or case
    per_round: list[dict[str, dict]] = []
    for r in range(params["rounds"]):
        order = MODES[r % 3:] + MODES[:r % 3]  # rotate who goes first
        res = {m: run_worker("step_overhead", "measure", mode=m, model_path=model_path, batch=params["batch"],
                             seq=params["seq"], warmup=params["warmup"], steps=params["steps"], threads=threads)
               for m in order}
        check_same_work(res)
        per_round.append(res)

    def pooled(mode, key):
        return [t for res in per_round for t in res[mode][key]]

    def round_ratios(mode, key, stat=statistics.median):
        return [stat(res[mode][key]) / stat(res["hand"][key]) for res in per_round]

    first = per_round[0]
    shape = (f"{label}: batch {params['batch']}x{params['seq']} tokens, {first['hand']['trainable']:,} LoRA params, "
             f"{threads} thread(s), {params['warmup']} warm-up + {params['steps']} steps x {params['rounds']} rounds, "
             f"step-0 loss {first['hand']['loss0']:.4f} in all three")
    out = []
    for mode, goal in (("ours", GOAL), ("hf_trainer", None)):
        who = "ours (Lightning, Rich bar, TB+CSV)" if mode == "ours" else "HF Trainer (tqdm on)"
        for key, what in (("intervals", "wall"), ("cpu_intervals", "cpu")):
            mean_ratio = median(round_ratios(mode, key, statistics.fmean))
            min_ratio = median(round_ratios(mode, key, min))
            out.append(figure(
                f"step_overhead {label} {mode}/hand {what}",
                median(pooled(mode, key)) * 1e3,
                median(pooled("hand", key)) * 1e3,
                ratio=median(round_ratios(mode, key)),
                goal=goal,
                unit="ms/step",
                notes=(f"{who} vs hand loop, median {'wall-clock' if what == 'wall' else 'process CPU'} time per "
                       f"step; ratio of means {mean_ratio:.3f}, of minima {min_ratio:.3f}; {shape}"),
                samples={m: [res[m][key] for res in per_round] for m in MODES},
                round_ratios=round_ratios(mode, key),
                mean_ratio=mean_ratio,
                min_ratio=min_ratio,
                loss0={m: first[m]["loss0"] for m in MODES},
                threads=threads,
            ))
    return out


def run(quick: bool) -> list[dict]:
    """Tiny checkpoint (batch 8x128) and a wide one (hidden 1024, 4 layers, vocab 65,536, batch 1x128)."""
    cases = QUICK_CASES if quick else CASES
    out = []
    for case, params in cases.items():
        out.extend(figures(case, params))
    return out
