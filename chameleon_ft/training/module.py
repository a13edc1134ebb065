"""The LightningModule: loss normalised over the global optimizer-step window, metrics, checkpoint contents.

Loss normalisation. The model returns sums over this micro-batch's target tokens. ``training_step``
returns ``loss_sum * world_size * accumulate_grad_batches``; Lightning divides it by
``accumulate_grad_batches`` and DDP/FSDP average gradients over ranks, so after the last micro-batch
each gradient is the plain sum of ``d loss_sum`` over every token of the step on every rank. In
``on_before_optimizer_step`` the token count of the whole window (all micro-batches, all-reduced over
ranks) is known, and the gradients are divided by it before clipping. The result is the gradient of
the token-mean loss of the global batch, independent of data-parallel size and accumulation (also for
a shorter last window of an epoch).

Health. The step's loss and gradient norm then go through :class:`~chameleon_ft.training.health.StepHealth`:
a non-finite step stops the run (or, within ``trainer.skip_nonfinite_steps``, has its gradients dropped),
and a run whose gradients stay exactly zero is warned about.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from chameleon_ft.adapter import base_model, clean_name
from chameleon_ft.errors import ConfigError
from chameleon_ft.model.modeling import ft_option
from chameleon_ft.model.tensors import full_tensor
from chameleon_ft.training.checkpointing import list_checkpoints
from chameleon_ft.training.health import StepHealth
from chameleon_ft.training.model_init import build_train_model, resolve_base_dtype
from chameleon_ft.training.optim import build_optimizer
from chameleon_ft.training.resume import RUN_RECORD_KEY, run_record

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")
Evaluator = Callable[["ChameleonLitModule"], dict]


def _scalar(t) -> float:
    return float(full_tensor(t).detach().float().cpu())


class ChameleonLitModule(L.LightningModule):
    """Fine-tunes a Chameleon checkpoint; the model is built in :meth:`configure_model`.

    ``cfg`` needs the ``model``, ``peft``, ``optim`` groups and ``seed``. ``evaluators`` are callables
    ``fn(module) -> {metric: value}`` run at the end of every validation (VQA accuracy, ...); their
    metrics are logged as returned (name them ``val/...``).
    """

    def __init__(self, cfg: DictConfig, model_path: str | Path, evaluators: list[Evaluator] | None = None):
        super().__init__()
        self.cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else cfg
        self.model_path = str(model_path)
        self.model: torch.nn.Module | None = None
        self.evaluators: list[Evaluator] = list(evaluators or [])
        self.last_val_metrics: dict[str, float] = {}
        # Sums over the current optimizer-step window: loss_sum, ce_sum, z_sum, target tokens, input tokens.
        self._window = torch.zeros(5, dtype=torch.float64)
        self._val = torch.zeros(3, dtype=torch.float64)  # ce_sum, z_sum, target tokens
        self._step_time: float | None = None
        # Frozen base weights are not in LoRA checkpoints; checkpoint_keys() says what must be there.
        self.strict_loading = False
        self.health = StepHealth(OmegaConf.select(self.cfg, "trainer.skip_nonfinite_steps", default=0),
                                 OmegaConf.select(self.cfg, "trainer.zero_grad_warn_steps", default=3),
                                 self._run_facts)

    # ----------------------------------------------------------------------------------------
    # Model
    # ----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from chameleon_ft.training.strategy import FSDP2Strategy, shard_model

        strategy = self.trainer.strategy
        device = strategy.root_device
        shard_fn = None
        if isinstance(strategy, FSDP2Strategy):
            mesh = strategy.device_mesh["data_parallel"]
            shard_fn = partial(shard_model, mesh=mesh, mixed_precision=device.type == "cuda")

        model = build_train_model(
            self.cfg.model, self.cfg.peft, self.model_path, device=device,
            base_dtype=resolve_base_dtype(self.cfg.model.dtype, device), seed=int(self.cfg.seed), shard_fn=shard_fn,
        )
        # load_model returns eval mode; Lightning switches modes only around validation.
        self.model = model.train(self.training)

    @property
    def causal_lm(self):
        """The unwrapped ``ChameleonFTForCausalLM``."""
        return base_model(self.model)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        # Walking every module each step costs ~0.5 ms on the tiny model; the set is fixed once built.
        cached = getattr(self, "_trainable", None)
        if cached is None:
            cached = self._trainable = [p for p in self.parameters() if p.requires_grad]
        return cached

    def checkpoint_keys(self) -> set[str] | None:
        """State-dict keys a checkpoint must hold: the trainable ones, or None (= all) if all train."""
        params = list(self.named_parameters())
        if all(p.requires_grad for _, p in params):
            return None
        return {clean_name(n) for n, p in params if p.requires_grad}

    def forward(self, **batch):
        return self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        out = self(**batch)
        s = out.loss_sums
        dev = self._window.device
        mask = batch.get("attention_mask")
        # Real (non-padding) input tokens; a 4D packing mask means rows are full.
        tokens_in = mask.sum() if mask is not None and mask.dim() == 2 else torch.tensor(batch["input_ids"].numel())
        self._window += torch.stack([
            s.loss_sum.detach().double().to(dev), s.ce_sum.double().to(dev), s.z_sum.double().to(dev),
            s.n_tokens.double().to(dev), tokens_in.double().to(dev),
        ])
        scale = self.trainer.world_size * self.trainer.accumulate_grad_batches
        return s.loss_sum * scale

    def on_before_optimizer_step(self, optimizer) -> None:
        window = self._sum_over_ranks(self._window)
        self._window = torch.zeros_like(self._window)
        loss_sum, ce_sum, z_sum, n, tokens_in = window.tolist()
        n_div = max(n, 1.0)
        params = self.trainable_parameters()
        with torch.no_grad():
            torch._foreach_div_([p.grad for p in params if p.grad is not None], n_div)
        clip = float(self.cfg.optim.grad_clip)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=clip if clip > 0 else float("inf"))
        now = time.perf_counter()
        metrics = {
            "train/loss": loss_sum / n_div,
            "train/ce": ce_sum / n_div,
            "train/z_loss": z_sum / n_div,
            "train/grad_norm": _scalar(norm),
            "train/lr": float(optimizer.param_groups[0]["lr"]),
            "train/target_tokens": n,
        }
        # Under fp16 the gradient scaler skips steps with non-finite gradients itself.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if self.health.check(self.global_step, metrics["train/loss"], metrics["train/grad_norm"],
                             grad_norm_checked=scaler is None):
            for p in params:  # AdamW leaves a parameter without a gradient (and its moments) untouched
                p.grad = None
        if self.health.skip_budget:
            metrics["train/skipped_steps"] = float(self.health.skipped)
        if self._step_time is not None:
            metrics["train/tokens_per_s"] = tokens_in / max(now - self._step_time, 1e-9)
        self._step_time = now
        # Only on the steps the loggers write (log_every_n_steps): each self.log costs Lightning ~0.2 ms of
        # Python (it moves and deep-copies its result record), 1-2 % of a small model's step.
        if self.trainer._logger_connector.should_update_logs:
            self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, sync_dist=False)
        self.log("loss", metrics["train/loss"], on_step=True, on_epoch=False, prog_bar=True, logger=False)

    def _run_facts(self) -> dict:
        """Learning rate, precision and last checkpoint, for the messages of :attr:`health`."""
        ckpt = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        found = list_checkpoints(ckpt) if ckpt else []
        return {"lr": self.cfg.optim.lr, "precision": self.trainer.precision,
                "last_checkpoint": str(found[-1]) if found else None}

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every rank (the strategy's own reduce); gloo reduces CPU tensors, nccl CUDA ones."""
        device = torch.device("cpu")
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return self.trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu()

    def configure_optimizers(self):
        # Not trainer.estimated_stepping_batches: it sets the loaders up early, and Lightning then drops the
        # loader state a resume restores (Lightning issue #20550). train() counts epoch-based runs itself.
        max_steps = self.trainer.max_steps
        total = max(int(max_steps), 1) if max_steps is not None and max_steps >= 0 \
            else int(getattr(self, "total_steps", 0) or 0)
        if total < 1:
            raise ConfigError("set trainer.max_steps (or trainer.max_epochs with a sized train loader)")
        built = build_optimizer(self.model, self.cfg.optim, total_steps=total)
        # What this config sets (the scheduler keeps the base lr in initial_lr); a resume restores the
        # checkpoint's values instead, see apply_configured_optim.
        self._configured_groups = [{"lr": g["initial_lr"], **{k: g[k] for k in ("weight_decay", "betas", "eps")}}
                                   for g in built["optimizer"].param_groups]
        return built

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:
            self.apply_configured_optim()

    def apply_configured_optim(self) -> None:
        """After a resume: the optimizer hyperparameters and learning rate of this run's config instead of the
        checkpoint's (a resume may change ``optim.*`` deliberately with ``resume_allow``). The schedule's
        position is kept; with an unchanged config this reproduces the restored values exactly."""
        (optimizer,) = self.trainer.optimizers
        sched = self.trainer.lr_scheduler_configs[0].scheduler
        sched.base_lrs = [c["lr"] for c in self._configured_groups]
        for group, configured, fn in zip(optimizer.param_groups, self._configured_groups, sched.lr_lambdas):
            group.update(configured, initial_lr=configured["lr"], lr=configured["lr"] * fn(sched.last_epoch))
        sched._last_lr = [g["lr"] for g in optimizer.param_groups]

    # ----------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(3, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        s = self(**batch).loss_sums
        self._val += torch.stack([s.ce_sum.double().cpu(), s.z_sum.double().cpu(), s.n_tokens.double().cpu()])

    def on_validation_epoch_end(self) -> None:
        ce_sum, z_sum, n = self._sum_over_ranks(self._val).tolist()
        n_div = max(n, 1.0)
        zw = float(ft_option(self.causal_lm.config, "z_loss_weight"))
        metrics = {
            "val/loss": (ce_sum + zw * z_sum) / n_div,
            "val/z_loss": z_sum / n_div,
            "val/ppl": math.exp(min(ce_sum / n_div, 50.0)),
        }
        for fn in self.evaluators:
            metrics.update({k: float(v) for k, v in fn(self).items()})
        self.log_dict(metrics, sync_dist=False)
        self.last_val_metrics = dict(metrics)
        self.reshard()

    def reshard(self) -> None:
        """Free gathered FSDP2 parameters (forward-only passes leave the root and last layer gathered)."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    # ----------------------------------------------------------------------------------------
    # Checkpoint contents
    # ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[RUN_RECORD_KEY] = run_record(self.cfg, self.trainer.world_size)
        checkpoint["step_health"] = self.health.state_dict()
        keys = self.checkpoint_keys()
        if keys is not None and "state_dict" in checkpoint:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, rng)
            checkpoint["rng_states"] = every
        else:
            checkpoint["rng_states"] = [rng]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        keys = self.checkpoint_keys()
        if keys is not None and "state_dict" in checkpoint:
            missing = sorted(keys - set(checkpoint["state_dict"]))
            if missing:
                raise KeyError(f"checkpoint lacks trained tensors {missing[:5]} (was it made with another peft config?)")
        self.health.load_state_dict(checkpoint.get("step_health", {}))
        states = checkpoint.get("rng_states")
        if states:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            rng = states[rank] if rank < len(states) else states[0]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
