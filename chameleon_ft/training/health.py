"""Training health: a diverged step stops the run (or is skipped), a frozen run is reported, and nothing
non-finite is ever saved.

Every optimizer step, :class:`StepHealth` looks at the step's loss and gradient norm (over every rank's
tokens, so all ranks decide alike):

- a NaN or infinite loss or gradient norm stops the run with a :class:`~chameleon_ft.errors.RunError`
  naming the step, the loss, the last checkpoint written and what to change; with
  ``trainer.skip_nonfinite_steps=N`` up to N such steps are skipped instead (their gradients are dropped,
  so AdamW leaves the weights and its moments as they were), counted in ``train/skipped_steps``;
- a gradient norm of exactly 0 for ``trainer.zero_grad_warn_steps`` steps in a row (every trainable
  gradient is zero: the adapter no longer learns, typically a saturated model after too high a learning
  rate) is warned about once.

:func:`check_finite_weights` is the last line of defence before a checkpoint or the final export is
written: a trainable tensor with a NaN or infinity refuses the write.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from lightning.pytorch.utilities import rank_zero_only

from chameleon_ft.errors import ConfigError, RunError
from chameleon_ft.model.tensors import nonfinite_summary

log = logging.getLogger(__name__)
warn_on_rank_zero = rank_zero_only(log.warning)  # every rank judges alike; one of them says so


class StepHealth:
    """Per-step divergence and frozen-gradient bookkeeping of one run.

    ``describe_run()`` returns the run facts the error message needs: ``{"lr", "precision",
    "last_checkpoint"}``. The counters travel in checkpoints (:meth:`state_dict`), so the skip budget
    holds across a resume.
    """

    def __init__(self, skip_budget: int, zero_grad_warn_steps: int, describe_run: Callable[[], dict]):
        if int(skip_budget) < 0:
            raise ConfigError(f"trainer.skip_nonfinite_steps={skip_budget} must be >= 0")
        self.skip_budget = int(skip_budget)
        self.zero_grad_warn_steps = int(zero_grad_warn_steps)
        self.describe_run = describe_run
        self.skipped = 0
        self.zero_streak = 0
        self.warned_frozen = False

    def check(self, step: int, loss: float, grad_norm: float, *, grad_norm_checked: bool = True) -> bool:
        """Judge optimizer step ``step`` (as logged): True when its gradients must be dropped (a skipped step);
        raises :class:`RunError` when it diverged beyond the skip budget. ``grad_norm_checked=False`` when a
        gradient scaler owns non-finite gradients (fp16: it skips those steps itself)."""
        bad_grad = grad_norm_checked and not math.isfinite(grad_norm)
        if not math.isfinite(loss) or bad_grad:
            return self._nonfinite(step, loss, grad_norm)
        self._track_zero_grad(step, grad_norm)
        return False

    def _nonfinite(self, step: int, loss: float, grad_norm: float) -> bool:
        if self.skipped < self.skip_budget:
            self.skipped += 1
            warn_on_rank_zero("step %d: train/loss=%s, train/grad_norm=%s: skipped (%d of trainer.skip_nonfinite_steps"
                              "=%d)", step, _fmt(loss), _fmt(grad_norm), self.skipped, self.skip_budget)
            return True
        run = self.describe_run()
        skipped = (f" after skipping {self.skipped} such step(s) (trainer.skip_nonfinite_steps={self.skip_budget})"
                   if self.skip_budget else "")
        raise RunError(
            f"training diverged at step {step}{skipped}: train/loss={_fmt(loss)}, train/grad_norm={_fmt(grad_norm)}; "
            f"nothing was exported. Last good checkpoint: {run.get('last_checkpoint') or 'none'}. "
            f"Lower optim.lr (now {run.get('lr')}), check trainer.precision (now {run.get('precision')}), "
            f"or set trainer.skip_nonfinite_steps=N to skip up to N bad steps")

    def _track_zero_grad(self, step: int, grad_norm: float) -> None:
        self.zero_streak = self.zero_streak + 1 if grad_norm == 0.0 else 0
        k = self.zero_grad_warn_steps
        if k > 0 and self.zero_streak >= k and not self.warned_frozen:
            self.warned_frozen = True
            run = self.describe_run()
            warn_on_rank_zero(
                "TRAINING IS FROZEN: every trainable gradient has been exactly 0 for %d optimizer steps in a row "
                "(steps %d-%d); the weights no longer change. The model has probably saturated: lower optim.lr "
                "(now %s) and check the labels (data.label_mask) of the samples", self.zero_streak,
                step - self.zero_streak + 1, step, run.get("lr"))

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "zero_streak": self.zero_streak, "warned_frozen": self.warned_frozen}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.zero_streak = int(state.get("zero_streak", 0))
        self.warned_frozen = bool(state.get("warned_frozen", False))


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def first_nonfinite_parameter(module: torch.nn.Module) -> tuple[str, str] | None:
    """``(name, summary)`` of the first trainable parameter holding NaN or infinity in this rank's
    part of it (an FSDP2 shard is checked locally), else None."""
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        bad = nonfinite_summary(local.detach())
        if bad is not None:
            return name, bad
    return None


def check_finite_weights(trainer, module: torch.nn.Module, what: str) -> None:
    """Raise :class:`RunError` on every rank when any rank's trainable weights hold NaN or infinity, before
    ``what`` (e.g. ``checkpoint step-00000004.ckpt``) is written. Collective: call on every rank."""
    bad = first_nonfinite_parameter(module)
    if trainer.strategy.reduce_boolean_decision(bad is None, all=True):
        return
    detail = f"trainable tensor {bad[0]} has {bad[1]}" if bad else "another rank's trainable weights are not finite"
    raise RunError(f"refusing to write {what}: {detail} (training diverged at step {trainer.global_step}); "
                   f"lower optim.lr or check trainer.precision")
