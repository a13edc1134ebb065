"""GPU only: tokens/s and MFU of LoRA fine-tuning on a 7B-shaped Chameleon, and its peak memory.

Each measurement is one fresh worker process running our training code path: the config composed as
``python -m chameleon_ft recipe=text_to_image model=lumina_mgpt_7b trainer=gpu peft.train_image_rows=false``
composes it (LoRA alone, on all linear layers, bf16 frozen base, fp32 adapters, bf16-mixed autocast, fused chunked loss), the
:class:`ChameleonLitModule` and :func:`build_trainer`. Only the weights differ: a random base of the
real 7B layer shapes (hidden 4096, MLP 11008, 32 heads of 128, grouped q/k norm ``[1, 128]``,
vocabulary 65,536) is built on the GPU instead of read from disk, so no 14 GB checkpoint is needed.

Figures (seq 4096, batch 1):

- ``gpu_training mfu ckpt=on|off``: model FLOPs per second (:mod:`benchmarks.flops`, 6N or 8N plus
  attention) over the bf16 matmul peak measured by the same worker on the same GPU. Goal >= 0.5.
- ``gpu_training hfu ckpt=on|off``: the same with the FLOPs the step really executes, counted by
  ``torch.utils.flop_counter`` on one extra step (LoRA skips the frozen weights' gradients).
- ``gpu_training tokens/s ckpt on/off``: what activation checkpointing costs in throughput.
- ``gpu_training peak memory ckpt=on|off``: ``torch.cuda.max_memory_allocated`` over the training steps
  (optimizer state included) for the full 32-layer shape, against a 24 GiB card. Goal <= 1 with
  checkpointing (without it, for comparison).
- ``gpu_training tiny full-FT peak memory``: the same for full fine-tuning (every weight trains, fp32
  weights, gradients and Adam state) of the embedded tiny model's shape at seq 4096, against the 16 bytes
  per parameter those four fp32 copies take.

A run that does not fit on the GPU is retried with half the layers (the per-layer work, and so the
MFU, hardly changes); the figure's notes say how many layers ran. The 7B memory figures are only
reported for the full 32 layers.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.checkpoint_load import chameleon_config
from benchmarks.common import GiB, SkipBenchmark, figure, median, require_cuda, run_worker

MFU_GOAL = ">= 0.5"
MEMORY_GOAL = "<= 1"
MEMORY_BUDGET_GIB = 24
SHAPE_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 65_536,
            "num_codes": 8192, "groups": 1}
SEQ = 4096
PEFT = "lora_all_linear"  # the text_to_image recipe's adapter
CASES = {"warmup": 3, "steps": 10, "rounds": 2}
QUICK_CASES = {"warmup": 2, "steps": 4, "rounds": 1}
MIN_LAYERS = 4
FULL_FT_BYTES_PER_PARAM = 16  # fp32 weight, gradient, Adam m and v


def tiny_shape() -> dict:
    """The shape of the embedded tiny checkpoint (:mod:`chameleon_ft.tiny`), vocabulary size included."""
    import json

    from chameleon_ft.tiny.build import TINY_MODEL, TINY_VQ, build_tokenizer_json

    vocab = json.loads(build_tokenizer_json(TINY_VQ["n_embed"]))["model"]["vocab"]
    return {"hidden": TINY_MODEL["hidden_size"], "intermediate": TINY_MODEL["intermediate_size"],
            "layers": TINY_MODEL["num_hidden_layers"], "heads": TINY_MODEL["num_attention_heads"],
            "kv_heads": TINY_MODEL["num_key_value_heads"], "vocab": max(vocab.values()) + 1,
            "num_codes": TINY_VQ["n_embed"], "groups": TINY_MODEL["model_parallel_size"]}


# ---------------------------------------------------------------------------------------------
# Model and config
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_base_model(config, device, dtype, seed: int = 0):
    """``ChameleonFTForCausalLM`` with the model's own random init, built directly on ``device`` in
    ``dtype`` (no full-precision copy, no host round trip)."""
    import torch

    from chameleon_ft.model.modeling import ChameleonFTForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        return ChameleonFTForCausalLM(config)


def run_config(device: str, act_ckpt: bool, steps: int, peft: str = PEFT, attn: str = "sdpa"):
    """Our run config, composed as the CLI composes it, with logging and checkpoints out of the way."""
    from omegaconf import OmegaConf

    from chameleon_ft.config.store import compose

    overrides = [
        # LoRA alone: the recipe trains image rows for the random tiny base; a pretrained 7B has them.
        "recipe=text_to_image", "model=lumina_mgpt_7b", f"peft={peft}", "peft.train_image_rows=false",
        f"model.activation_checkpointing={str(act_ckpt).lower()}", f"model.attn_implementation={attn}",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=null", "trainer.devices=1",
        "trainer.enable_progress_bar=false", "logger.tensorboard=false", "logger.csv=false",
        "checkpoint.every_n_steps=1000000000",
    ]
    overrides += ["trainer=gpu"] if device == "cuda" else ["trainer.accelerator=cpu"]
    cfg = compose(overrides)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.model.path = "(random weights)"
    return cfg


def _module_class():
    from chameleon_ft.training.model_init import config_overrides, prepare_for_training, resolve_base_dtype
    from chameleon_ft.training.module import ChameleonLitModule

    class RandomBaseModule(ChameleonLitModule):
        """Our LightningModule with a random base built in memory instead of loaded from ``model.path``."""

        def __init__(self, cfg, config):
            super().__init__(cfg, cfg.model.path)
            self.base_config = config

        def configure_model(self) -> None:
            if self.model is not None:
                return
            device = self.trainer.strategy.root_device
            dtype = resolve_base_dtype(self.cfg.model.dtype, device)
            config = self.base_config
            for key, value in config_overrides(self.cfg.model).items():
                if value is not None:
                    setattr(config, key, value)
            config._attn_implementation = self.cfg.model.attn_implementation
            base = random_base_model(config, device, dtype, seed=int(self.cfg.seed))
            self.model = prepare_for_training(base, self.cfg.model, self.cfg.peft, device=device, base_dtype=dtype,
                                              seed=int(self.cfg.seed)).train()

    return RandomBaseModule


# ---------------------------------------------------------------------------------------------
# Measurements (in the worker)
# ---------------------------------------------------------------------------------------------
def matmul_peak(device: str = "cuda", dtype: str = "bfloat16", n: int = 8192, iters: int = 20,
                repeats: int = 5) -> float:
    """Median FLOP/s of ``n x n @ n x n`` matmuls in ``dtype`` on ``device`` (the MFU denominator)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    out = torch.empty(n, n, device=device, dtype=dt)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        torch.mm(a, b, out=out)
    sync()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        sync()
        rates.append(2 * n**3 * iters / (time.perf_counter() - start))
    return median(rates)


def measure(*, act_ckpt: bool, layers: int, seq: int = SEQ, batch: int = 1, warmup: int = 3, steps: int = 10,
            device: str = "cuda", shape: dict | None = None, peft: str = PEFT, attn: str = "sdpa",
            peak_n: int = 8192) -> dict:
    """Worker: train ``warmup + steps`` LoRA steps; step times, FLOPs, memory and the matmul peak.

    Returns ``{"oom": True, ...}`` instead of raising when the model does not fit on the GPU.
    """
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from benchmarks.flops import count_flops, training_flops_per_token
    from chameleon_ft.training.train import build_trainer

    shape = shape or SHAPE_7B
    cuda = device == "cuda"
    peak = matmul_peak(device, "bfloat16" if cuda else "float32", n=peak_n)
    config = chameleon_config(shape, layers, max_positions=max(seq, 4096))
    total = warmup + steps
    cfg = run_config(device, act_ckpt, total, peft=peft, attn=attn)
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids.clone()}
            for ids in torch.randint(0, shape["vocab"], (batch * total, seq), generator=gen)]

    class StepClock(Callback):
        def __init__(self):
            self.ends: list[float] = []
            self.weight_bytes = 0

        def on_train_start(self, trainer, pl_module):
            self.weight_bytes = sum(p.numel() * p.element_size() for p in pl_module.parameters())
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    clock = StepClock()
    module = _module_class()(cfg, config)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_training_") as run_dir:
            trainer = build_trainer(cfg, Path(run_dir), callbacks=[clock])
            trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=batch, shuffle=False))
    except torch.OutOfMemoryError as e:
        return {"oom": True, "layers": layers, "error": str(e).splitlines()[0]}
    if len(clock.ends) != total:
        raise RuntimeError(f"{len(clock.ends)} optimizer steps recorded, expected {total}")
    memory = {}
    if cuda:
        memory = {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}

    # One more forward + backward, untimed, to count what the step executes.
    model = module.model
    batch_in = {k: torch.stack([r[k] for r in rows[:batch]]).to(module.device) for k in ("input_ids", "labels")}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model(**batch_in).loss_sums.loss_sum
        loss.backward()

    executed, _ = count_flops(step)
    intervals = [b - a for a, b in zip(clock.ends[warmup - 1:], clock.ends[warmup:])]
    tokens = batch * seq
    return {
        "oom": False, "layers": layers, "act_ckpt": act_ckpt, "seq": seq, "batch": batch,
        "intervals": intervals, "tokens_per_step": tokens, "peak_flops": peak,
        "model_flops_per_step": training_flops_per_token(config, seq, recompute=act_ckpt) * tokens,
        "executed_flops_per_step": executed,
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in module.parameters()),
        "weight_bytes": clock.weight_bytes, **memory,
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


# ---------------------------------------------------------------------------------------------
# Figures (in the harness)
# ---------------------------------------------------------------------------------------------
def fit_layers(act_ckpt: bool, params: dict, measure_fn=None) -> dict:
    """Measure with the full 32 layers, halving the layer count while the GPU runs out of memory."""
    measure_fn = measure_fn or (lambda **kw: run_worker("gpu_training", "measure", timeout=900, **kw))
    layers = SHAPE_7B["layers"]
    while True:
        res = measure_fn(act_ckpt=act_ckpt, layers=layers, warmup=params["warmup"], steps=params["steps"])
        if not res["oom"]:
            return res
        if layers // 2 < MIN_LAYERS:
            raise RuntimeError(f"LoRA on a 7B-shaped model does not fit with {layers} layers: {res['error']}")
        layers //= 2


def figures_from(results: dict[bool, list[dict]]) -> list[dict]:
    """The table rows from the workers' results, ``{act_ckpt: [result per round]}``."""
    out = []
    rates = {}
    for act_ckpt, runs in results.items():
        tag = "on" if act_ckpt else "off"
        step_s = median([statistics.median(r["intervals"]) for r in runs])
        first = runs[0]
        peak = median([r["peak_flops"] for r in runs])
        model_rate = first["model_flops_per_step"] / step_s
        executed_rate = first["executed_flops_per_step"] / step_s
        rates[act_ckpt] = first["tokens_per_step"] / step_s
        where = (f"{first['device_name']}, {first['layers']} of {SHAPE_7B['layers']} layers, seq {first['seq']}, "
                 f"batch {first['batch']}, {first['trainable']:,} LoRA params, activation checkpointing {tag}, "
                 f"median of {len(first['intervals'])} steps x {len(runs)} round(s)")
        out.append(figure(f"gpu_training mfu ckpt={tag}", model_rate / 1e12, peak / 1e12, goal=MFU_GOAL, unit="TFLOP/s",
                          notes=f"model FLOPs ({'8N' if act_ckpt else '6N'} + attention) vs measured bf16 matmul "
                                f"peak; {where}; {rates[act_ckpt]:,.0f} tokens/s",
                          samples=[r["intervals"] for r in runs], tokens_per_s=rates[act_ckpt]))
        out.append(figure(f"gpu_training hfu ckpt={tag}", executed_rate / 1e12, peak / 1e12, unit="TFLOP/s",
                          notes=f"executed FLOPs (torch.utils.flop_counter; LoRA skips frozen weight grads) vs "
                                f"the same peak; {where}"))
        if first["layers"] == SHAPE_7B["layers"] and "peak_allocated" in first:
            peak_gib = max(r["peak_allocated"] for r in runs) / GiB
            out.append(figure(f"gpu_training peak memory ckpt={tag}", peak_gib, MEMORY_BUDGET_GIB,
                              goal=MEMORY_GOAL if act_ckpt else None, unit="GiB",
                              notes=f"max_memory_allocated over the training steps (weights "
                                    f"{first['weight_bytes'] / GiB:.1f} GiB, Adam state included; reserved "
                                    f"{max(r['peak_reserved'] for r in runs) / GiB:.1f} GiB) vs a 24 GiB card; "
                                    f"{where}"))
    if True in rates and False in rates:
        out.append(figure("gpu_training tokens/s ckpt on/off", rates[True], rates[False], unit="tokens/s",
                          notes="throughput with activation checkpointing over without (same worker settings)"))
    return out


def full_ft_figure(res: dict) -> list[dict]:
    """The tiny full fine-tuning row from its worker result (none without CUDA memory statistics)."""
    if "peak_allocated" not in res:
        return []
    need = FULL_FT_BYTES_PER_PARAM * res["parameters"]
    return [figure("gpu_training tiny full-FT peak memory", res["peak_allocated"] / GiB, need / GiB, unit="GiB",
                   notes=f"max_memory_allocated, full fine-tuning (peft=none, {res['trainable']:,} of "
                         f"{res['parameters']:,} parameters train) of the tiny model's shape, seq {res['seq']}, "
                         f"batch {res['batch']}, no checkpointing, vs {FULL_FT_BYTES_PER_PARAM} bytes per "
                         f"parameter (fp32 weight, gradient, Adam m and v); {res['device_name']}")]


def measure_full_ft(params: dict, measure_fn=None) -> dict:
    """Worker result of full fine-tuning of the tiny model's shape (seq 4096, no checkpointing)."""
    measure_fn = measure_fn or (lambda **kw: run_worker("gpu_training", "measure", timeout=900, **kw))
    shape = tiny_shape()
    return measure_fn(act_ckpt=False, layers=shape["layers"], warmup=params["warmup"], steps=params["steps"],
                      shape=shape, peft="none")


def run(quick: bool) -> list[dict]:
    """Activation checkpointing on and off, alternating, ``rounds`` times each; then full fine-tuning
    of the tiny model."""
    require_cuda()
    import torch

    if not torch.cuda.is_bf16_supported():
        raise SkipBenchmark("the GPU has no bf16 support")
    params = QUICK_CASES if quick else CASES
    results: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(params["rounds"]):
        for act_ckpt in ((True, False) if r % 2 == 0 else (False, True)):
            results[act_ckpt].append(fit_layers(act_ckpt, params))
    return figures_from(results) + full_ft_figure(measure_full_ft(params))
