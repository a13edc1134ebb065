"""What a run tells its user: a run card at the start, a progress bar over the whole run, a summary at the end.

- :class:`RunReport` prints the card (recipe, task, model and layout, data and counts, trainable parameters,
  global batch, steps, run directory) when training starts, keeps every validation's metrics, and prints a
  summary table at the end: each final metric with its best value and step (best by the metric's own
  direction, the monitored one by ``monitor_mode``), wall time, tokens/s, and where the outputs went.
- :class:`RunProgressBar` counts optimizer steps of the whole run (``global step / max steps`` with an ETA)
  instead of batches of the current epoch, so a resumed run starts where it stopped.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

# Metrics where lower is better; every other val/ metric is better when higher.
_LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "z_loss")


def better(metric: str, monitor: str, monitor_mode: str) -> str:
    """``max`` or ``min``: the direction in which ``metric`` improves."""
    if metric == monitor:
        return monitor_mode
    return "min" if metric.rsplit("/", 1)[-1].endswith(_LOWER_IS_BETTER) else "max"


class RunReport(L.Callback):
    """The run card and the end-of-run summary (rank 0 prints)."""

    def __init__(self, card: dict[str, object], monitor: str, monitor_mode: str):
        self.card, self.monitor, self.monitor_mode = dict(card), monitor, monitor_mode
        self.history: list[tuple[int, dict[str, float]]] = []
        self.started = time.monotonic()
        self.tokens_per_s: list[float] = []

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        card = {**self.card, "trainable parameters": f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"}
        width = max(len(k) for k in card)
        print("\n".join(["", "chameleon-ft run", *(f"  {k:<{width}}  {v}" for k, v in card.items()), ""]), flush=True)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        value = trainer.callback_metrics.get("train/tokens_per_s")
        # Train metrics are logged every log_every_n_steps only: count each logged value once.
        if value is not None and (not self.tokens_per_s or float(value) != self.tokens_per_s[-1]):
            self.tokens_per_s.append(float(value))

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """One validation's metrics at ``step`` (a later record of the same step replaces it)."""
        self.history = [(s, m) for s, m in self.history if s != int(step)]
        self.history.append((int(step), {k: float(v) for k, v in metrics.items()}))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and getattr(pl_module, "last_val_metrics", None):
            self.record(trainer.global_step, pl_module.last_val_metrics)

    def summary(self, final: dict[str, float], outputs: dict[str, str]) -> str:
        """The end-of-run table: final value, best value and its step, per metric; then time and outputs."""
        rows = [("metric", "final", "best", "at step")]
        for name in sorted(final):
            seen = [(step, m[name]) for step, m in self.history if name in m and math.isfinite(m[name])]
            if not seen:
                rows.append((name, f"{final[name]:.4g}", "", ""))
                continue
            pick = max if better(name, self.monitor, self.monitor_mode) == "max" else min
            step, value = pick(seen, key=lambda sv: sv[1])
            mark = " *" if name == self.monitor else ""
            rows.append((name + mark, f"{final[name]:.4g}", f"{value:.4g}", str(step)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["", "chameleon-ft summary (* = monitored)"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        minutes = (time.monotonic() - self.started) / 60
        speed = f", {sum(self.tokens_per_s) / len(self.tokens_per_s):,.0f} tokens/s" if self.tokens_per_s else ""
        lines.append(f"  wall time {minutes:.1f} min{speed}")
        lines += [f"  {kind} written to {path}" for kind, path in outputs.items()]
        return "\n".join(lines)


class RunProgressBar(RichProgressBar):
    """A progress bar over the whole run's optimizer steps, with an ETA; survives resumes and epochs."""

    def __init__(self, total_steps: int):
        super().__init__()
        self.total_steps = int(total_steps)

    @property
    def total_train_batches(self) -> int:
        return self.total_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return "Training".ljust(len(self.validation_description))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.train_progress_bar_id is None or self.progress is None:
            super().on_train_epoch_start(trainer, pl_module)  # created once, never reset per epoch
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def describe_data(data_cfg) -> str:
    """The data source in one line (format, and the file or the bundled set)."""
    where = data_cfg.path or "bundled"
    return f"{data_cfg.format} ({where})" if where != "bundled" else f"{data_cfg.format} (bundled)"


def run_card(cfg, assets, run_dir: Path, *, train_samples: int, val_samples: int, world_size: int,
             total_steps: int, resumed_from: str | None) -> dict[str, object]:
    """What a run is about to do, for :class:`RunReport`."""
    from hydra.core.hydra_config import HydraConfig

    try:
        recipe = HydraConfig.get().runtime.choices.get("recipe", "-")
    except ValueError:  # train() called outside the command line
        recipe = "-"
    t = cfg.trainer
    global_batch = int(cfg.data.batch_size) * int(world_size) * int(t.accumulate_grad_batches)
    card = {
        "recipe": recipe,
        "task": cfg.task,
        "model": f"{assets.path} ({assets.qk_layout} q/k norm, {assets.image_layout(cfg.data.image_layout)} image layout)",
        "data": describe_data(cfg.data),
        "samples": f"{train_samples:,} train, {val_samples:,} val",
        "adapter": cfg.peft.method + (" + image rows" if cfg.peft.train_image_rows else ""),
        "global batch": f"{global_batch} ({cfg.data.batch_size} x {world_size} process(es) x "
                        f"{t.accumulate_grad_batches} accumulation)",
        "steps": f"{total_steps:,}",
        "monitor": f"{cfg.monitor} ({cfg.monitor_mode})",
        "run directory": str(run_dir),
    }
    if resumed_from:
        card["resumed from"] = resumed_from
    return card


class GracefulStop(L.Callback):
    """Ctrl-C (SIGINT) or SIGTERM stops the run at the next safe point with a checkpoint.

    The first signal only sets a flag; after the optimizer step in progress, every rank agrees (one
    collective when there are several), the checkpoint callback writes a checkpoint of this step, and the
    trainer stops. A second signal stops at once, as usual. :attr:`stopped_at` is the step saved.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        import signal

        if self.requested:  # a second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (a checkpoint is written); press Ctrl-C again to stop at once",
              flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Only at an optimizer step: a checkpoint between accumulated micro-batches would lose their gradients.
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        stop = self.requested
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or self.stopped_at is not None:
            return
        from chameleon_ft.training.checkpointing import AtomicCheckpoint

        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, AtomicCheckpoint) and cb._last_global_step_saved != trainer.global_step:
                cb._save_checkpoint(trainer, cb.format_checkpoint_name(cb._monitor_candidates(trainer)))
        self.stopped_at = trainer.global_step
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()  # a failed run must not leave Ctrl-C captured in the caller's process

    def _restore(self) -> None:
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
