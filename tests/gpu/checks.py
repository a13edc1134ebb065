"""The GPU tier's checks, as functions of the device (and precision).

``tests/gpu/test_*.py`` run each check twice: on ``"cuda"`` (marked ``gpu``: ``pytest -m gpu``, skipped
without a GPU) and on ``"cpu"`` at tiny sizes in the normal suite. The CPU run drives the very same code,
so a change of the package's APIs breaks it on CPU in CI instead of rotting until a GPU is lent.

A check returns a :class:`CheckResult`: plain JSON figures (the measured differences *and* the
tolerances they were held to) plus the properties that failed. The test records the figures first
(``benchmarks/gpu_check.sh`` collects them) and then asserts, so a failing GPU run still reports numbers.

Tolerances, and why (``rel`` = relative to the reference value; ``norm`` = max absolute difference over
the max absolute reference value):

- fp32 on two devices: the same arithmetic in another order (TF32 is switched off for these
  comparisons), so differences are a few fp32 ulps amplified by depth: ``norm <= 1e-4``.
- bf16 against fp32: bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per operation). On CPU,
  bf16-mixed LoRA training of the tiny model tracked the fp32 run over 4 steps within 4e-4 (loss) and
  1.6e-3 (grad norm) relative; the tolerances are ``rel <= 1e-2`` (loss) and ``2e-2`` (grad norm), an
  order of magnitude of room for CUDA's other kernels and accumulation order, still tight enough to
  catch a wrong dtype in the loss or a mis-normalised gradient (those move the figures by whole percents
  or factors).
- Generation: tokens may legitimately differ where two candidates are closer than the logits' numerical
  error, and then everything after differs. So the logits are compared under teacher forcing (the
  reference's tokens fed to both devices) against a tolerance, and free-running tokens must agree up to
  the first position whose reference margin (top score minus the other device's pick) is within twice
  that tolerance.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

REPO_ROOT = Path(__file__).resolve().parents[2]

FP32_NORM_TOL = 1e-4
BF16_LOSS_RTOL = 1e-2
BF16_GRAD_NORM_RTOL = 2e-2
FP32_LOSS_RTOL = 1e-4  # fp32 on either side: reduction order only (two CPU processes agree to 1e-5)
# Logits of the tiny model in bf16 (weights and activations) against fp32: measured 1.1e-2 on CPU.
BF16_LOGITS_NORM_TOL = 3e-2
# Logits of bf16-mixed training (bf16 frozen base, fp32 LoRA, autocast) against the fp32 export on CPU:
# measured 1.1e-2 on CPU, most of it the base weights' rounding to bf16.
BF16_MIXED_LOGITS_NORM_TOL = 3e-2
RESUME_RTOL = {"fp32": 1e-5, "bf16": 1e-3}  # same device, same arithmetic; CUDA backward kernels may use atomics
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    """Figures of one check (JSON values) and the properties that did not hold."""

    name: str
    device: str
    figures: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def expect(self, ok: bool, message: str) -> None:
        """Note ``message`` as a failure unless ``ok``."""
        if not ok:
            self.failures.append(message)

    def as_record(self) -> dict:
        return {"check": self.name, "device": self.device, "figures": self.figures, "failures": self.failures}

    def assert_ok(self) -> None:
        if self.failures:
            raise AssertionError(f"{self.name} on {self.device}: " + "; ".join(self.failures)
                                 + f"\nfigures: {json.dumps(self.figures, default=str)}")


def norm_diff(a: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """``max |a - ref| / max |ref|`` over the entries ``keep`` selects (all by default), in float64."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if keep is not None:
        keep = keep.cpu()
        a, ref = a[keep], ref[keep]
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def rel_diff(a: float, ref: float) -> float:
    return abs(a - ref) / max(abs(ref), 1e-12)


@contextlib.contextmanager
def tf32(matmul: bool, conv: bool | None = None):
    """TF32 for CUDA matmuls and cuDNN convolutions (``conv``, default: as ``matmul``) inside the block.

    PyTorch's own defaults are matmul off, convolutions on. No effect on CPU.
    """
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = matmul if conv is None else conv
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def autocast(device: str, precision: str):
    """bf16 autocast as Lightning's ``bf16-mixed`` applies it, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tiny_path() -> Path:
    from chameleon_ft.tiny import tiny_checkpoint

    return tiny_checkpoint()


# ---------------------------------------------------------------------------------------------
# Training runs (composed as the CLI composes them)
# ---------------------------------------------------------------------------------------------
def run_overrides(device: str, precision: str, *, steps: int, devices: int = 1, extra=()) -> list[str]:
    """A short digits-VQA LoRA run on the tiny checkpoint, deterministic across devices.

    Dropout is off everywhere: CPU and CUDA draw different random streams from the same seed, and
    data order and LoRA init are seeded independently of the device.
    """
    out = ["recipe=debug", f"trainer.max_steps={steps}", "trainer.val_check_interval=null", f"trainer.devices={devices}",
           "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "logger.tensorboard=false",
           "data.max_samples=32", "data.batch_size=8", "eval.max_samples=2",
           "peft.dropout=0.0", "model.dropout=0.0", "optim.lr=1e-3", "optim.warmup_steps=1"]
    if precision == "fp32":
        acc = "gpu" if device == "cuda" else "cpu"
        out += [f"trainer.accelerator={acc}", "trainer.precision=32-true", "model.dtype=float32"]
    elif precision == "bf16":
        # On CUDA the GPU preset itself: bf16 frozen base from model.dtype=auto, bf16-true -> bf16-mixed.
        out += ["trainer=gpu"] if device == "cuda" else \
            ["trainer.accelerator=cpu", "trainer.precision=bf16-mixed", "model.dtype=bfloat16"]
    else:
        raise ValueError(f"precision {precision!r}: use fp32 or bf16")
    return out + list(extra)


def _dtype_counts(tensors) -> dict[str, int]:
    return dict(Counter(str(t.dtype) for t in tensors if t is not None and t.is_floating_point()))


def _first_decoder_linear(model: torch.nn.Module) -> torch.nn.Module | None:
    for name, mod in model.named_modules():
        if ".layers." in f".{name}" and isinstance(mod, torch.nn.Linear):
            return mod
    return None


class DtypeProbe(Callback):
    """The dtypes the first optimizer step really used, read inside the LightningModule.

    ``report``: parameter dtypes (frozen / trainable), gradient dtypes before the step, optimizer-state
    dtypes after it (at the end of the batch that stepped; ``step`` counters left out), and the output
    dtype of a decoder linear layer in the forward pass (the compute dtype). With ``out_dir`` every rank also writes ``dtypes_rank<r>.json``.
    ``module`` is the LightningModule (for use after ``train`` returns).
    """

    def __init__(self, out_dir: str | Path | None = None):
        self.out_dir = Path(out_dir) if out_dir else None
        self.report: dict | None = None
        self.module = None
        self._grads: dict | None = None
        self._compute: str | None = None
        self._hook = None

    def on_train_start(self, trainer, pl_module):
        self.module = pl_module
        linear = _first_decoder_linear(pl_module.model)
        if linear is not None:
            self._hook = linear.register_forward_hook(self._seen)

    def _seen(self, module, args, output):
        if self._compute is None:
            self._compute = str(output.dtype)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._grads is None:
            self._grads = _dtype_counts(p.grad for p in pl_module.parameters() if p.requires_grad)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.report is not None or self._grads is None:  # done, or still accumulating before the first step
            return
        if self._hook is not None:
            self._hook.remove()
        params = list(pl_module.parameters())
        opt = trainer.optimizers[0]
        states = [v for s in opt.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)]
        self.report = {
            "frozen": _dtype_counts(p for p in params if not p.requires_grad),
            "trainable": _dtype_counts(p for p in params if p.requires_grad),
            "grads": self._grads or {},
            "optimizer_state": _dtype_counts(states),
            "trainable_tensors": sum(1 for p in params if p.requires_grad),
            "compute": self._compute,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
        }
        if self.out_dir is not None:
            (self.out_dir / f"dtypes_rank{trainer.global_rank}.json").write_text(json.dumps(self.report))


@dataclass
class TrainRun:
    """A finished run: logged per-step figures, final metrics, dtype report and the LightningModule."""

    run_dir: Path
    device: str
    precision: str
    steps: dict[int, dict[str, float]]
    metrics: dict
    dtypes: dict | None
    module: object = None


def logged_steps(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """``{step: {"loss", "grad_norm"}}`` from the run's CSV log (``csv/metrics*.csv``; later files win)."""
    run_dir = Path(run_dir)
    parts = sorted((run_dir / "csv").glob("metrics.part*.csv"), key=lambda p: int(p.name[12:-4]))
    out: dict[int, dict[str, float]] = {}
    for path in [*parts, run_dir / "csv" / "metrics.csv"]:
        if not path.is_file():
            continue
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = {"loss": float(row["train/loss"]),
                                             "grad_norm": float(row["train/grad_norm"])}
    return out


def train_run(run_dir: str | Path, device: str, precision: str, *, steps: int, extra=()) -> TrainRun:
    """``chameleon_ft.training.train.train`` in this process on a config from :func:`run_overrides`."""
    from chameleon_ft.config.store import compose
    from chameleon_ft.training.train import train

    run_dir = Path(run_dir)
    probe = DtypeProbe()
    cfg = compose(run_overrides(device, precision, steps=steps, extra=extra))
    metrics = train(cfg, run_dir, callbacks=[probe])
    return TrainRun(run_dir, device, precision, logged_steps(run_dir), metrics, probe.report, probe.module)


def worker_run(run_dir: str | Path, device: str, precision: str, *, steps: int, devices: int = 1, extra=(),
               timeout: float = 150, copy_checkpoint: Path | None = None) -> TrainRun:
    """The same run in fresh process(es) (``tests/gpu/train_worker.py``), as multi-process strategies need.

    ``copy_checkpoint`` is copied into the new run's ``checkpoints/`` first (for ``resume=auto``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if copy_checkpoint is not None:
        target = run_dir / "checkpoints" / copy_checkpoint.name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if copy_checkpoint.is_dir() else shutil.copy2)(copy_checkpoint, target)
    overrides = run_overrides(device, precision, steps=steps, devices=devices, extra=extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # set only by the launcher for the other ranks
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.train_worker", str(run_dir), json.dumps(overrides)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"training worker for {run_dir} exited with {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    reports = sorted(run_dir.glob("dtypes_rank*.json"))
    dtypes = json.loads(reports[0].read_text()) if reports else None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return TrainRun(run_dir, device, precision, logged_steps(run_dir), metrics, dtypes)


def rank_dtype_reports(run: TrainRun) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run.run_dir.glob("dtypes_rank*.json"))]


# ---------------------------------------------------------------------------------------------
# Checks on training runs
# ---------------------------------------------------------------------------------------------
def compare_trajectories(result: CheckResult, run: TrainRun, ref: TrainRun, *, loss_rtol: float,
                         grad_rtol: float, prefix: str = "", steps=None) -> None:
    """Per-step loss and grad norm of ``run`` against ``ref`` (same data order)."""
    steps = sorted(set(run.steps) & set(ref.steps)) if steps is None else list(steps)
    result.expect(bool(steps) and all(s in run.steps and s in ref.steps for s in steps),
                  f"{prefix}logged steps {sorted(run.steps)} vs reference {sorted(ref.steps)}")
    steps = [s for s in steps if s in run.steps and s in ref.steps]
    loss = [rel_diff(run.steps[s]["loss"], ref.steps[s]["loss"]) for s in steps]
    grad = [rel_diff(run.steps[s]["grad_norm"], ref.steps[s]["grad_norm"]) for s in steps]
    result.figures.update({
        f"{prefix}steps": steps,
        f"{prefix}losses": [run.steps[s]["loss"] for s in steps],
        f"{prefix}reference_losses": [ref.steps[s]["loss"] for s in steps],
        f"{prefix}loss_max_rel_diff": max(loss, default=None), f"{prefix}loss_rtol": loss_rtol,
        f"{prefix}grad_norm_max_rel_diff": max(grad, default=None), f"{prefix}grad_norm_rtol": grad_rtol,
    })
    result.expect(all(d <= loss_rtol for d in loss), f"{prefix}loss differs by up to {max(loss, default=0):.2e} (rel) > {loss_rtol}")
    result.expect(all(d <= grad_rtol for d in grad),
                  f"{prefix}grad norm differs by up to {max(grad, default=0):.2e} (rel) > {grad_rtol}")


def check_losses_track_reference(run: TrainRun, ref: TrainRun) -> CheckResult:
    """``run`` (any device/precision) follows the fp32 CPU reference run of the same data order."""
    result = CheckResult(f"losses_track_fp32_cpu_{run.precision}", run.device)
    bf16 = run.precision == "bf16"
    compare_trajectories(result, run, ref, loss_rtol=BF16_LOSS_RTOL if bf16 else FP32_LOSS_RTOL,
                         grad_rtol=BF16_GRAD_NORM_RTOL if bf16 else FP32_LOSS_RTOL)
    return result


def check_dtypes(report: dict | None, precision: str, device: str, name: str = "dtypes") -> CheckResult:
    """Frozen base in the run's base dtype, trainable weights, their grads and Adam state in fp32,
    decoder matmuls computed in bf16 under bf16-mixed."""
    result = CheckResult(name, device, figures={"report": report})
    if report is None:
        result.expect(False, "no dtype report (no optimizer step ran?)")
        return result
    base = str(DTYPES[precision])
    fp32 = str(torch.float32)
    n = report["trainable_tensors"]
    result.expect(set(report["frozen"]) <= {base}, f"frozen parameters are {report['frozen']}, expected {base}")
    result.expect(report["trainable"] == {fp32: n}, f"trainable parameters are {report['trainable']}, expected fp32")
    result.expect(report["grads"] == {fp32: n}, f"gradients are {report['grads']}, expected {n} fp32")
    result.expect(report["optimizer_state"] == {fp32: 2 * n},
                  f"optimizer state is {report['optimizer_state']}, expected {2 * n} fp32 tensors (Adam m, v)")
    result.expect(report["compute"] == base, f"decoder linear computed in {report['compute']}, expected {base}")
    return result


def _random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def load_for_generation(base, adapter=None, *, dtype: torch.dtype, device):
    """The base checkpoint on ``device`` in ``dtype``, with ``adapter`` merged in (as evaluation loads it)."""
    from chameleon_ft.adapter import load_adapter
    from chameleon_ft.model.assets import CheckpointAssets

    model = CheckpointAssets.open(base).load_model(dtype=dtype, device=device)
    return (load_adapter(model, adapter) if adapter is not None else model).eval()


def user_turn_ids(tokens, tok, text: str) -> list[int]:
    """One user turn in the Lumina-mGPT chat template: <s> text <reserved08706>."""
    return [tokens.bos, *tok.encode(text, add_special_tokens=False), tokens.eot]


def check_adapter_roundtrip(run: TrainRun, *, batch: int = 2, seq: int = 48) -> CheckResult:
    """The adapter ``run`` exported loads on CPU and gives the logits of the trained model on its device.

    Three logits of the same random batch: the exported adapter loaded on CPU in fp32 (the reference),
    the same files loaded on the run's device in fp32 (``FP32_NORM_TOL``), and the trained model itself
    as it left training (bf16 base under autocast for bf16 runs: ``BF16_MIXED_LOGITS_NORM_TOL``).
    Image-token logits are masked (the dtype's minimum) in all three and left out.
    """
    from omegaconf import OmegaConf

    device, result = run.device, CheckResult(f"adapter_roundtrip_{run.precision}", run.device)
    cfg = OmegaConf.load(run.run_dir / "config.yaml")
    base, adapter = str(cfg.model.path), run.run_dir / "adapter"
    with tf32(False), torch.no_grad():
        cpu = load_for_generation(base, adapter, dtype=torch.float32, device="cpu")
        ids = _random_ids(cpu.config.vocab_size, batch, seq)
        ref = cpu(input_ids=ids).logits.float()
        del cpu
        dev = load_for_generation(base, adapter, dtype=torch.float32, device=device)
        loaded = dev(input_ids=ids.to(device)).logits.float().cpu()
        del dev
        trained_model = run.module.model.to(device).eval()
        with autocast(device, run.precision):
            trained = trained_model(input_ids=ids.to(device)).logits.float().cpu()
    keep = ref > torch.finfo(torch.float32).min / 2
    tol = BF16_MIXED_LOGITS_NORM_TOL if run.precision == "bf16" else FP32_NORM_TOL
    result.figures = {
        "loaded_vs_cpu_norm_diff": norm_diff(loaded, ref, keep), "loaded_tol": FP32_NORM_TOL,
        "trained_vs_cpu_norm_diff": norm_diff(trained, ref, keep), "trained_tol": tol,
        "trained_argmax_agreement": (trained.argmax(-1) == ref.argmax(-1)).double().mean().item(),
        "logits_max_abs": ref[keep].abs().max().item(),
    }
    result.expect(result.figures["loaded_vs_cpu_norm_diff"] <= FP32_NORM_TOL,
                  f"adapter on {device} (fp32) vs CPU: {result.figures['loaded_vs_cpu_norm_diff']:.2e} > {FP32_NORM_TOL}")
    result.expect(result.figures["trained_vs_cpu_norm_diff"] <= tol,
                  f"trained model vs its export on CPU: {result.figures['trained_vs_cpu_norm_diff']:.2e} > {tol}")
    return result


def check_fsdp_resume_export(first: TrainRun, resumed: TrainRun, ref: TrainRun, resume_step: int) -> CheckResult:
    """FSDP run ``first`` tracks the single-process fp32 CPU reference; ``resumed`` (its checkpoint at
    ``resume_step``, ``resume=auto``) repeats its later steps; the export of both is complete and equal."""
    from safetensors.torch import load_file

    result = CheckResult(f"fsdp_resume_export_{first.precision}", first.device)
    bf16 = first.precision == "bf16"
    compare_trajectories(result, first, ref, loss_rtol=BF16_LOSS_RTOL if bf16 else FP32_LOSS_RTOL,
                         grad_rtol=BF16_GRAD_NORM_RTOL if bf16 else FP32_LOSS_RTOL)
    later = [s for s in sorted(first.steps) if s >= resume_step]
    result.expect(sorted(resumed.steps) == later, f"resumed run logged steps {sorted(resumed.steps)}, expected {later}")
    rtol = RESUME_RTOL[first.precision]
    compare_trajectories(result, resumed, first, loss_rtol=rtol, grad_rtol=rtol, prefix="resume_", steps=later)
    a = load_file(first.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "adapter" / "adapter_model.safetensors")
    result.expect(a.keys() == b.keys() and len(a) > 0, "the two exports hold different tensors")
    lora_b = [k for k in a if ".lora_B." in k]
    result.expect(bool(lora_b) and all(a[k].abs().sum() > 0 for k in lora_b), "some exported LoRA B is all zeros")
    diff = max((norm_diff(b[k], a[k]) for k in a if k in b), default=float("inf"))
    result.figures.update({"export_tensors": len(a), "resume_export_norm_diff": diff,
                           "export_dtypes": sorted({str(t.dtype) for t in a.values()})})
    # Adam turns reduction-order noise on near-zero gradients into up to lr-sized steps on single
    # elements (lr 1e-3 here, LoRA weights ~0.05): allow 2% of the largest weight.
    result.expect(diff <= (2e-2 if bf16 else 1e-4), f"resumed export differs from the first by {diff:.2e} (norm)")
    result.expect(result.figures["export_dtypes"] == [str(torch.float32)], f"export dtypes {result.figures['export_dtypes']}")
    return result


def check_multi_process(multi: TrainRun, single: TrainRun, processes: int) -> CheckResult:
    """``processes`` FSDP ranks against one rank accumulating ``processes`` micro-batches per step (the same
    global batches), by logged loss and grad norm; every rank holds its share of the parameters."""
    result = CheckResult(f"fsdp_multi_process_{multi.precision}", multi.device, figures={"processes": processes})
    rtol = 5e-3 if multi.precision == "bf16" else FP32_LOSS_RTOL
    compare_trajectories(result, multi, single, loss_rtol=rtol, grad_rtol=rtol)
    reports = rank_dtype_reports(multi)
    result.figures["ranks_reporting"] = len(reports)
    result.expect(len(reports) == processes, f"{len(reports)} ranks wrote a dtype report, expected {processes}")
    for rank, report in enumerate(reports):
        for failure in check_dtypes(report, multi.precision, multi.device).failures:
            result.failures.append(f"rank {rank}: {failure}")
    return result


# ---------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------
def check_activation_checkpointing(device: str, precision: str, *, batch: int = 2, seq: int = 64) -> CheckResult:
    """One forward + backward of the training model with activation checkpointing on and off, dropout on
    (residual and LoRA, 0.1) from the same seed: the same loss (the forward is the same computation) and
    gradients (the recomputed forward must redraw the same dropout masks; CUDA backward kernels may reduce
    in another order, which can flip a bf16 rounding: ``norm <= 1e-2`` in bf16, ``1e-5`` in fp32), and the
    decoder layers' insides really ran twice with it on. Peak memory of each on CUDA."""
    from chameleon_ft.config.store import compose
    from chameleon_ft.training.model_init import build_train_model

    result = CheckResult(f"activation_checkpointing_{precision}", device)
    path = tiny_path()
    base_dtype = DTYPES[precision]
    cuda = torch.device(device).type == "cuda"
    runs = {}
    for on in (False, True):
        cfg = compose(["recipe=debug", f"model.activation_checkpointing={str(on).lower()}", "model.dropout=0.1",
                       "peft.dropout=0.1", "model.mask_image_logits=false"])
        model = build_train_model(cfg.model, cfg.peft, path, device=torch.device(device), base_dtype=base_dtype,
                                  seed=0).train()
        calls = []
        # A module inside the layer: the layer's own hooks stay outside the checkpoint and run once.
        attention = model.get_base_model().model.layers[0].self_attn
        hook = attention.register_forward_pre_hook(lambda *a: calls.append(1))
        ids = _random_ids(model.config.vocab_size, batch, seq).to(device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        torch.manual_seed(1)  # the same dropout masks in both runs (CPU and CUDA generators)
        with autocast(device, precision):
            sums = model(input_ids=ids, labels=ids).loss_sums
        loss = sums.loss_sum / sums.n_tokens
        loss.backward()
        hook.remove()
        runs[on] = {
            "loss": loss.item(), "calls": len(calls),
            "grads": {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "peak": (torch.cuda.max_memory_allocated() - start) if cuda else None,
        }
        del model
    off, on = runs[False], runs[True]
    grad = max(norm_diff(on["grads"][k], off["grads"][k]) for k in off["grads"])
    grad_tol = 1e-2 if precision == "bf16" else 1e-5
    result.figures = {"loss_off": off["loss"], "loss_on": on["loss"], "loss_rel_diff": rel_diff(on["loss"], off["loss"]),
                      "loss_rtol": 1e-6, "grad_norm_diff": grad, "grad_tol": grad_tol,
                      "layer0_attention_forwards_off": off["calls"], "layer0_attention_forwards_on": on["calls"],
                      "peak_bytes_off": off["peak"], "peak_bytes_on": on["peak"]}
    result.expect(result.figures["loss_rel_diff"] <= 1e-6, f"loss {on['loss']} with checkpointing vs {off['loss']} without")
    result.expect(grad <= grad_tol, f"gradients differ by {grad:.2e} (norm) > {grad_tol}")
    result.expect(off["calls"] == 1 and on["calls"] == 2,
                  f"layer 0's attention ran {off['calls']} (off) and {on['calls']} (on) times; expected 1 and 2 "
                  "(recomputation)")
    return result


# ---------------------------------------------------------------------------------------------
# VQ tokenizer
# ---------------------------------------------------------------------------------------------
def _code_margins(vqgan64, images: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative squared-distance gap ``|d(z, e_a) - d(z, e_b)| / |z|^2`` per position, latents in fp64."""
    with torch.no_grad():
        z = vqgan64.quant_conv(vqgan64.encoder(images.double()))  # [B, D, h, w]
    z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    e = vqgan64.quantize.embedding.weight.double()
    da = ((z - e[a.reshape(-1)]) ** 2).sum(1)
    db = ((z - e[b.reshape(-1)]) ** 2).sum(1)
    return (da - db).abs() / (z ** 2).sum(1).clamp_min(1e-30)


def check_vq_codes(device: str, *, n_images: int | None = None, batch_size: int = 64) -> CheckResult:
    """VQ codes of the bundled digit images on ``device`` equal CPU's, except at genuine near ties.

    With TF32 off (fp32 convolutions) every code must match unless its two candidate codewords are within
    ``1e-4`` of each other relative to ``|z|^2`` (fp64 latents decide): fp32 rounding cannot move a latent
    further. With PyTorch's defaults (TF32 convolutions: 10-bit mantissa, ~1e-3 relative error; fp32
    matmuls), which pre-tokenization runs with, mismatches are reported and must be within ``1e-2``.
    """
    from chameleon_ft.data.formats.digits import load_scans, render_digit
    from chameleon_ft.vq import ImageTokenizer, load_vqgan, pil_to_tensor

    result = CheckResult("vq_codes", device)
    path = tiny_path()
    scans, _ = load_scans()
    scans = scans[:n_images] if n_images else scans
    size = load_vqgan(path).config.resolution
    images = torch.stack([pil_to_tensor(render_digit(s, size)) for s in scans])
    ref = torch.stack(ImageTokenizer(load_vqgan(path), batch_size=batch_size).encode(list(images)))
    vq64 = load_vqgan(path, dtype=torch.float64)
    modes = {"fp32": (False, 1e-4)}
    if torch.device(device).type == "cuda":
        modes["tf32_default"] = (True, 1e-2)
    result.figures = {"images": len(images), "codes": ref.numel()}
    for mode, (conv_tf32, tol) in modes.items():
        with tf32(False, conv=conv_tf32):
            codes = torch.stack(ImageTokenizer(load_vqgan(path, device=device), batch_size=batch_size).encode(list(images)))
        bad = (codes != ref).reshape(len(images), -1).any(1)
        margin = 0.0
        if bad.any():
            margin = _code_margins(vq64, images[bad], codes[bad], ref[bad]).max().item()
        agreement = (codes == ref).double().mean().item()
        result.figures.update({f"{mode}_agreement": agreement, f"{mode}_mismatches": int((codes != ref).sum()),
                               f"{mode}_max_mismatch_margin": margin, f"{mode}_margin_tol": tol})
        result.expect(margin <= tol, f"{mode}: a code differs from CPU's where the codewords are {margin:.2e} apart (> {tol})")
    return result


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
TEXT_PROMPTS = ("What digit is this?", "Is this digit even?", "Describe the image.",
                "Write a caption for this image.")
IMAGE_PROMPTS = ("Draw the digit 7", "Draw the digit 3")
CFG_SCALE = 3.0


def first_divergences(ref_rows, dev_rows, scores, stop_ids=()) -> tuple[list[int | None], float]:
    """First differing position of each row, and the largest reference margin there.

    The margin is the reference's top score minus its score of the token the other device chose; where
    the other device stopped early, its best stop token (``stop_ids``) stands for its choice.
    ``scores[i]``: [len(ref_rows[i]) + 1, V] reference scores under teacher forcing.
    """
    positions, worst = [], 0.0
    for r, d, s in zip(ref_rows, dev_rows, scores):
        p = next((k for k in range(min(len(r), len(d))) if r[k] != d[k]), None)
        if p is None and len(r) != len(d):
            p = min(len(r), len(d))
        positions.append(p)
        if p is None:
            continue
        row = s[p].double()
        if p < len(d):
            other = row[d[p]]
        else:  # the other device stopped here (a row without stop tokens cannot be explained)
            other = row[list(stop_ids)].max() if stop_ids else torch.tensor(-math.inf)
        worst = max(worst, (row.max() - other).item())
    return positions, worst


def _text_scores(model, rows: list[list[int]], device) -> list[torch.Tensor]:
    """Logits predicting each token of each row after its prompt (teacher forcing), fp32 on CPU."""
    out = []
    with torch.no_grad():
        for prompt, gen in rows:
            ids = torch.tensor([prompt + gen], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float().cpu()
            out.append(logits)
    return out


def _cfg_scores(model, pairs, gens, image_ids, device) -> list[torch.Tensor]:
    """Guided log-probabilities ``g * (cond - uncond) + uncond`` predicting each generated image token."""
    from chameleon_ft.model.modeling import image_logits_unmasked

    out = []
    with torch.no_grad(), image_logits_unmasked(model):
        for (cond, uncond), gen in zip(pairs, gens):
            branch = []
            for prompt in (cond, uncond):
                ids = torch.tensor([prompt + gen], device=device)
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float().cpu()
                branch.append(torch.log_softmax(logits, dim=-1))
            mixed = CFG_SCALE * (branch[0] - branch[1]) + branch[1]
            out.append(mixed[:, image_ids])
    return out


def check_generation(device: str, dtype: str, *, max_new_tokens: int = 12, image_size: int = 64) -> CheckResult:
    """Greedy text and guided (CFG) image generation on ``device`` in ``dtype`` against fp32 on CPU.

    Teacher-forced scores must agree within the dtype's tolerance; free-running tokens must agree up to
    the first near tie (module docstring). Seeded *sampled* image generation is compared with CPU but
    not required to match: CUDA's generator (Philox) and CPU's (Mersenne Twister) draw different streams
    from the same seed, and ``torch.multinomial`` differs per device. It must be reproducible on the
    device and give a complete grid of image codes.
    """
    from chameleon_ft.generation.generate import generate_images, generate_text, image_prefix
    from chameleon_ft.model.checkpoint import load_tokenizer
    from chameleon_ft.model.tokens import ChameleonTokens
    from chameleon_ft.tasks import get_task

    result = CheckResult(f"generation_{dtype}", device)
    path = tiny_path()
    tokens, tok = ChameleonTokens.from_checkpoint(path), load_tokenizer(path)
    tol = BF16_LOGITS_NORM_TOL if dtype == "bf16" else FP32_NORM_TOL
    with tf32(False):
        ref_model = load_for_generation(path, dtype=torch.float32, device="cpu")
        dev_model = load_for_generation(path, dtype=DTYPES[dtype], device=device)
        # Text: greedy.
        prompts = [user_turn_ids(tokens, tok, t) for t in TEXT_PROMPTS]
        ref_text = [r["token_ids"] for r in generate_text(ref_model, tokens, tok, prompts, max_new_tokens=max_new_tokens)]
        dev_text = [r["token_ids"] for r in generate_text(dev_model, tokens, tok, prompts, max_new_tokens=max_new_tokens)]
        rows = list(zip(prompts, ref_text))
        ref_scores, dev_scores = _text_scores(ref_model, rows, "cpu"), _text_scores(dev_model, rows, device)
        keep = [s > torch.finfo(torch.float32).min / 2 for s in ref_scores]
        text_diff = max(norm_diff(d, r, k) for d, r, k in zip(dev_scores, ref_scores, keep))
        scale = max(r[k].abs().max().item() for r, k in zip(ref_scores, keep))
        positions, margin = first_divergences(ref_text, dev_text, ref_scores,
                                              stop_ids=(tokens.eot, tokens.eos, tokens.pad))
        agree = sum(min(len(a), len(b)) if p is None else p for a, b, p in zip(ref_text, dev_text, positions))
        result.figures.update({
            "text_tokens": sum(len(t) for t in ref_text), "text_equal_rows": sum(p is None for p in positions),
            "text_rows": len(prompts), "text_agreeing_prefix_tokens": agree,
            "text_teacher_forced_norm_diff": text_diff, "text_tol": tol,
            "text_divergence_margin": margin, "text_margin_tol": 2 * tol * scale,
        })
        result.expect(text_diff <= tol, f"text logits differ by {text_diff:.2e} (norm) > {tol}")
        result.expect(margin <= 2 * tol * scale,
                      f"greedy text diverges from CPU where the CPU margin is {margin:.3g} > {2 * tol * scale:.3g}")
        result.expect(all(len(t) > 0 for t in ref_text), "the reference generated an empty answer; nothing was compared")

        # Images: greedy CFG, then seeded sampling.
        template = get_task("text_to_image").prompt_template
        reqs = [user_turn_ids(tokens, tok, template.format(prompt=p, width=image_size, height=image_size))
                for p in IMAGE_PROMPTS]
        kw = dict(width=image_size, height=image_size, cfg_scale=CFG_SCALE, image_top_k=64)
        ref_img = [r["token_ids"] for r in generate_images(ref_model, tokens, reqs, sample=False, **kw)]
        dev_img = [r["token_ids"] for r in generate_images(dev_model, tokens, reqs, sample=False, **kw)]
        prefix = image_prefix(tokens, image_size, image_size, "lumina")
        pairs = [(r + prefix, list(prefix)) for r in reqs]
        image_ids = tokens.image_token_ids
        gens = [g[:-1] for g in ref_img]  # the last token (end of image) predicts nothing
        ref_cfg = _cfg_scores(ref_model, pairs, gens, image_ids, "cpu")
        dev_cfg = _cfg_scores(dev_model, pairs, gens, image_ids, device)
        cfg_diff = max(norm_diff(d, r) for d, r in zip(dev_cfg, ref_cfg))
        cfg_scale = max(r.abs().max().item() for r in ref_cfg)
        # Compare only image-code positions, in code-id space.
        code_of = {int(i): k for k, i in enumerate(image_ids.tolist())}
        ref_codes = [[code_of[t] for t in g if t in code_of] for g in ref_img]
        dev_codes = [[code_of[t] for t in g if t in code_of] for g in dev_img]
        code_pos = [[k for k, t in enumerate(g) if t in code_of] for g in ref_img]
        code_scores = [s[pos] for s, pos in zip(ref_cfg, code_pos)]
        img_positions, img_margin = first_divergences(ref_codes, dev_codes, code_scores)
        result.figures.update({
            "image_codes": sum(len(c) for c in ref_codes), "image_equal_rows": sum(p is None for p in img_positions),
            "image_rows": len(reqs), "image_teacher_forced_norm_diff": cfg_diff, "image_tol": tol,
            "image_divergence_margin": img_margin, "image_margin_tol": 2 * tol * cfg_scale,
        })
        result.expect(cfg_diff <= tol, f"guided image scores differ by {cfg_diff:.2e} (norm) > {tol}")
        result.expect(img_margin <= 2 * tol * cfg_scale,
                      f"greedy CFG image diverges from CPU where the CPU margin is {img_margin:.3g}")

        sampled = [[r["token_ids"] for r in generate_images(m, tokens, reqs, seed=s, **kw)]
                   for m, s in ((dev_model, 5), (dev_model, 5), (ref_model, 5))]
        grid = (image_size // 16) ** 2
        result.figures.update({"sampled_reproducible": sampled[0] == sampled[1],
                               "sampled_equal_to_cpu": sampled[0] == sampled[2]})
        result.expect(sampled[0] == sampled[1], "seeded CFG sampling is not reproducible on the device")
        result.expect(all(sum(t in code_of for t in g) == grid for g in sampled[0]),
                      f"a sampled image does not hold {grid} image codes")
        if torch.device(device).type == "cpu" and dtype == "fp32":
            result.expect(sampled[0] == sampled[2], "same device, same seed, different tokens")
    return result


# ---------------------------------------------------------------------------------------------
# Fused loss
# ---------------------------------------------------------------------------------------------
def check_fused_loss(device: str, *, vocab: int, hidden: int, seq: int, dtype: str = "bf16", chunk: int = 1024,
                     z_loss_weight: float = 1e-4, seed: int = 0) -> CheckResult:
    """``fused_lm_loss`` on ``device`` in ``dtype`` against plain fp32 cross-entropy (+ z-loss) of the same
    values, loss and gradients of hidden states and head weight.

    Tolerances (bf16): the fused path rounds each logit to bf16 before the fp32 softmax (2^-9 relative;
    per-token errors average out in the mean: ``rel <= 1e-3`` on the loss) and its gradients pass through
    bf16 once (``norm <= 2e-2``). fp32: ``rel <= 1e-5``, ``norm <= 1e-4``.
    """
    import torch.nn.functional as F

    from chameleon_ft.model.loss import IGNORE_INDEX, fused_lm_loss

    result = CheckResult(f"fused_loss_{dtype}", device)
    dt = DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where they are used (65k x 4k on CUDA)
    weight = (torch.randn(vocab, hidden, generator=gen, device=device) * 0.02).to(dt)
    h = torch.randn(1, seq, hidden, generator=gen, device=device).to(dt)
    labels = torch.randint(0, vocab, (1, seq), generator=gen, device=device)
    labels[0, : seq // 8] = IGNORE_INDEX  # a prompt without targets
    with tf32(False):
        h1, w1 = (t.clone().requires_grad_() for t in (h, weight))
        sums = fused_lm_loss(h1, w1, labels, z_loss_weight=z_loss_weight, chunk_size=chunk)
        n = int(sums.n_tokens)
        (sums.loss_sum / n).backward()
        h2, w2 = (t.to(torch.float32, copy=True).requires_grad_() for t in (h, weight))
        logits = (h2[:, :-1] @ w2.t()).reshape(-1, vocab)
        y = labels[:, 1:].reshape(-1)
        keep = y != IGNORE_INDEX
        ce = F.cross_entropy(logits[keep], y[keep], reduction="sum")
        z = torch.logsumexp(logits[keep], dim=-1).square().sum()
        ref = (ce + z_loss_weight * z) / n
        ref.backward()
    loss_tol, grad_tol = (1e-3, 2e-2) if dtype == "bf16" else (1e-5, 1e-4)
    result.figures = {
        "vocab": vocab, "hidden": hidden, "seq": seq, "dtype": dtype, "targets": n,
        "loss": (sums.loss_sum / n).item(), "reference_loss": ref.item(),
        "loss_rel_diff": rel_diff((sums.loss_sum / n).item(), ref.item()), "loss_rtol": loss_tol,
        "grad_hidden_norm_diff": norm_diff(h1.grad, h2.grad), "grad_weight_norm_diff": norm_diff(w1.grad, w2.grad),
        "grad_tol": grad_tol, "grad_dtypes": [str(h1.grad.dtype), str(w1.grad.dtype)],
    }
    result.expect(n == int(keep.sum()), f"{n} targets counted, {int(keep.sum())} expected")
    result.expect(result.figures["loss_rel_diff"] <= loss_tol, f"loss rel diff {result.figures['loss_rel_diff']:.2e} > {loss_tol}")
    for k in ("grad_hidden_norm_diff", "grad_weight_norm_diff"):
        result.expect(result.figures[k] <= grad_tol, f"{k} {result.figures[k]:.2e} > {grad_tol}")
    result.expect(h1.grad.dtype == dt and w1.grad.dtype == dt, f"gradient dtypes {result.figures['grad_dtypes']}")
    return result


def check_loss_memory(device: str, *, vocab: int, hidden: int, seq: int, chunk: int = 1024, goal: float = 0.25) -> CheckResult:
    """Peak memory of the fused loss over stock ``F.cross_entropy(logits.float())`` (forward + backward,
    bf16, frozen head), each in a fresh process: ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS on
    CPU (:mod:`benchmarks.loss_memory`). The two losses must agree as in :func:`check_fused_loss`."""
    from benchmarks import loss_memory
    from benchmarks.common import GiB

    fig = loss_memory.figures([("bfloat16", 1)], vocab=vocab, hidden=hidden, seq=seq, chunk_size=chunk, device=device)[0]
    result = CheckResult("loss_memory", device)
    result.figures = {"vocab": vocab, "hidden": hidden, "seq": seq, "chunk": chunk, "fused_gib": fig["ours"],
                      "plain_gib": fig["baseline"], "ratio": fig["ratio"], "goal": goal, "meter": fig["meter"],
                      "loss_abs_diff": fig["check"]["loss_abs_diff"]}
    result.expect(fig["ratio"] <= goal, f"fused/plain peak memory {fig['ratio']:.3f} > {goal}")
    result.expect(fig["baseline"] * GiB > 0, "no memory measured for the plain loss")
    result.expect(fig["check"]["loss_abs_diff"] <= 1e-3 * max(fig["check"]["loss"], 1.0), "the two losses disagree")
    return result
