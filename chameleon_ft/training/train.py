"""One training run end to end: config -> model, data, trainer -> fit -> validate -> export."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from chameleon_ft.errors import ConfigError, RunInterrupted
from chameleon_ft.training.checkpoint_format import PortableCheckpointIO
from chameleon_ft.training.checkpointing import CHECKPOINT_SUBDIR, AtomicCheckpoint, find_resume_checkpoint
from chameleon_ft.training.dataloading import ResumableDataLoader, build_dataloaders, trainer_progress
from chameleon_ft.training.health import check_finite_weights
from chameleon_ft.training.module import ChameleonLitModule
from chameleon_ft.training.reporting import GracefulStop, RunProgressBar, RunReport, run_card
from chameleon_ft.training.resume import check_resume, record_resume
from chameleon_ft.training.run_lock import RunDirLock
from chameleon_ft.training.strategy import build_strategy, resolve_accelerator

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"
METRICS_FILE = "metrics.json"

# (cfg, assets, world_size=, rank=, run_dir=) -> (train_loader, val_loader)
LoaderFactory = Callable[..., tuple]


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """``run_dir`` if given, else Hydra's output directory of the current run."""
    if run_dir is not None:
        return Path(run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError as e:
        raise ConfigError("train(cfg) outside Hydra needs a run_dir") from e


def resolve_resume(resume: str, run_dir: Path) -> str | None:
    """``none`` -> None, ``auto`` -> latest complete checkpoint of ``run_dir`` (or None), else the path."""
    if resume in (None, "none", ""):
        return None
    if resume == "auto":
        found = find_resume_checkpoint(run_dir)
        return str(found) if found else None
    if not Path(resume).exists():
        raise ConfigError(f"resume={resume}: no such checkpoint")
    return str(resume)


def resolve_precision(trainer_cfg, accelerator: str) -> str:
    """Lightning precision. Frozen weights are stored in ``model.dtype`` and trainable ones in fp32 by
    the model builder, so ``*-true`` (which would cast trainable weights) becomes the matching ``*-mixed``."""
    p = trainer_cfg.precision
    if p is None:
        return "bf16-mixed" if accelerator == "gpu" else "32-true"
    p = str(p)
    if p in ("bf16-true", "16-true"):
        log.info("trainer.precision=%s would cast trainable weights; using %s-mixed with a %s frozen base",
                 p, p.split("-")[0], p.split("-")[0])
        return p.replace("-true", "-mixed")
    return p


def build_loggers(logger_cfg, run_dir: Path) -> list:
    """TensorBoard and CSV under ``run_dir`` (and W&B if selected)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = []
    if logger_cfg.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    if logger_cfg.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if logger_cfg.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logger.wandb=true but wandb is not installed (pip install chameleon-ft[wandb])")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=logger_cfg.wandb_project, save_dir=str(run_dir)))
    return loggers


def _export_on_save(run_dir: Path, trainer, module) -> None:
    export_trained(module, run_dir, is_global_zero=trainer.is_global_zero)


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list | None = None) -> L.Trainer:
    """``L.Trainer`` from ``cfg.trainer`` / ``cfg.strategy`` / ``cfg.checkpoint`` / ``cfg.logger``, with a
    progress bar over the run's steps (:class:`RunProgressBar`) and Ctrl-C saving a checkpoint
    (:class:`GracefulStop`)."""
    t = cfg.trainer
    accelerator = resolve_accelerator(str(t.accelerator))
    callbacks = list(callbacks or [])
    on_saved = None
    if cfg.checkpoint.get("export_adapter_each", False):
        on_saved = partial(_export_on_save, run_dir)
    callbacks.append(AtomicCheckpoint(run_dir / CHECKPOINT_SUBDIR, cfg.checkpoint.every_n_steps,
                                      cfg.checkpoint.keep_last, on_saved=on_saved))
    callbacks.append(GracefulStop())
    if t.enable_progress_bar:  # its total is set once the data (and so the run's length) is known
        callbacks.append(RunProgressBar(max(int(t.max_steps or 0), 0)))
    optional = {k: t[k] for k in ("max_epochs", "val_check_interval", "check_val_every_n_epoch", "limit_val_batches")
                if t.get(k) is not None}
    if isinstance(t.get("val_check_interval"), int) and t.get("check_val_every_n_epoch") is None:
        # An integer interval counts batches across epochs (step-based validation), not within one.
        optional["check_val_every_n_epoch"] = None
    return L.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg.strategy, accelerator),
        precision=resolve_precision(t, accelerator),
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,  # the run card says what is trained
        num_sanity_val_steps=t.num_sanity_val_steps,
        deterministic=t.deterministic,
        logger=build_loggers(cfg.logger, run_dir),
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # our batch samplers shard by rank and keep their position
        plugins=[PortableCheckpointIO()],  # resumes from a sharded (FSDP2) checkpoint under any strategy
        enable_checkpointing=True,
        **optional,
    )


def _full_state_dict(module: ChameleonLitModule) -> dict[str, torch.Tensor]:
    """Every rank's shards gathered into full CPU tensors (collective under FSDP; full on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_trained(module: ChameleonLitModule, run_dir: Path, *, is_global_zero: bool) -> dict[str, str]:
    """Write what was trained to ``run_dir``: ``adapter/`` (PEFT format: LoRA and/or image-token rows), or
    ``model/`` (a full checkpoint) for full fine-tuning; either with the run's sample settings beside it.

    Collective under FSDP (every rank's shard is gathered): call on every rank. Returns paths by kind.
    """
    from chameleon_ft.adapter import export_adapter
    from chameleon_ft.model.checkpoint import save_state_dict

    model = module.model
    full = _full_state_dict(module)  # collective: every rank takes part
    if not is_global_zero:
        return {}
    settings = getattr(module, "sample_settings", None)
    if getattr(model, "peft_config", None):
        path = export_adapter(model, run_dir / ADAPTER_DIR, module.model_path, state_dict=full, settings=settings)
        return {"adapter": str(path)}
    lm = module.causal_lm  # full fine-tuning: the whole model, stock layout
    path = save_state_dict(full, lm.config, run_dir / FULL_MODEL_DIR, source_dir=getattr(lm, "checkpoint_dir", None))
    if settings is not None:
        settings.save(path)
    return {"model": str(path)}


def keep_previous_csv(run_dir: Path) -> Path | None:
    """Before a resume: move ``csv/metrics.csv`` to ``csv/metrics.partN.csv`` (Lightning's CSV logger
    deletes an existing file when it starts). Returns the new name, or None if there was none."""
    current = run_dir / "csv" / "metrics.csv"
    if not current.is_file():
        return None
    k = 1
    while (run_dir / "csv" / f"metrics.part{k}.csv").exists():
        k += 1
    target = run_dir / "csv" / f"metrics.part{k}.csv"
    current.rename(target)
    return target


def _json_safe(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None) for k, v in metrics.items()}


def train(cfg: DictConfig, run_dir: str | Path | None = None, *, loader_factory: LoaderFactory | None = None,
          evaluators: list | None = None, callbacks: list | None = None) -> dict:
    """Run the experiment ``cfg`` (as :func:`chameleon_ft.config.store.compose` makes it); returns the final
    validation metrics (keys as logged, e.g. ``val/loss``).

    ``run_dir``: where config, logs, checkpoints, adapter and ``metrics.json`` go (default: Hydra's
    output dir). ``loader_factory`` replaces :func:`build_dataloaders` (same signature); ``evaluators``
    go to :attr:`ChameleonLitModule.evaluators`; ``callbacks`` are extra Lightning callbacks.

    The run holds an exclusive lock on ``run_dir`` (:class:`RunDirLock`, rank 0). A resume is checked to
    continue the same run (:func:`check_resume`) before anything in ``run_dir`` is written. A diverged run
    stops with a :class:`~chameleon_ft.errors.RunError` and exports nothing.
    """
    # Lightning's CombinedLoader builds torch's deprecated LeafSpec on every batch (Lightning's code, not
    # ours; fixed upstream when Lightning follows torch): one warning per run that the user cannot act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    run_dir = resolve_run_dir(run_dir).resolve()
    lock = RunDirLock(run_dir) if rank_zero_only.rank == 0 else nullcontext()
    owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        with lock:
            return _train_locked(cfg, run_dir, loader_factory, evaluators, callbacks)
    finally:
        # Lightning leaves the process group it created alive; gloo's threads then abort the interpreter at
        # exit now and then ("terminate called without an active exception", status -6 after a good run).
        if owns_process_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_locked(cfg: DictConfig, run_dir: Path, loader_factory, evaluators, callbacks) -> dict:
    from chameleon_ft.data.pipeline import sample_settings, with_checkpoint_defaults
    from chameleon_ft.tiny import resolve_checkpoint

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    # Before seeding: building the tiny checkpoint on first use must not shift the run's random numbers.
    assets = resolve_checkpoint(cfg.model.path, cfg.model.tiny_layout)
    cfg.model.path = str(assets.path)
    cfg.data = with_checkpoint_defaults(cfg.data, assets)  # recorded in config.yaml as used
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks)  # writes nothing yet
    resumed = None
    if ckpt_path is not None:
        resumed = check_resume(ckpt_path, cfg, trainer.world_size, run_dir)  # refuses before any write
        if trainer.is_global_zero:
            keep_previous_csv(run_dir)
            record_resume(run_dir, resumed)
    module = ChameleonLitModule(cfg, assets.path, evaluators=evaluators)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    factory = loader_factory or build_dataloaders
    train_loader, val_loader = factory(cfg, assets, world_size=trainer.world_size, rank=trainer.global_rank,
                                       run_dir=run_dir)
    if loader_factory is None:
        module.sample_settings = sample_settings(cfg.data, assets, cfg.task)
    if evaluators is None and loader_factory is None:  # custom loaders bring their own evaluators
        from chameleon_ft.training.evaluators import build_evaluators

        module.evaluators = build_evaluators(cfg, assets, run_dir)
    if isinstance(train_loader, ResumableDataLoader):
        train_loader.bind_progress(trainer_progress(trainer))
    total_steps = int(cfg.trainer.max_steps or 0)
    if not total_steps > 0 and cfg.trainer.max_epochs:
        per_epoch = -(-len(train_loader) // int(cfg.trainer.accumulate_grad_batches))
        total_steps = module.total_steps = per_epoch * int(cfg.trainer.max_epochs)
    report = _attach_report(trainer, cfg, assets, run_dir, train_loader, val_loader, total_steps, resumed)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
    _raise_if_stopped_early(trainer, run_dir, total_steps)
    if trainer.global_step == 0:
        log.warning("NO OPTIMIZER STEP RAN (trainer.max_steps=%s): the exported %s is untrained, identical to the "
                    "base model", cfg.trainer.max_steps, "model" if cfg.peft.method == "none" else "adapter")
    trainer.validate(module, dataloaders=val_loader, verbose=False)
    metrics = dict(module.last_val_metrics)
    check_finite_weights(trainer, module, f"the trained weights to {run_dir}")
    exported = export_trained(module, run_dir, is_global_zero=trainer.is_global_zero)
    if trainer.is_global_zero:
        (run_dir / METRICS_FILE).write_text(json.dumps(_json_safe(metrics), indent=2, sort_keys=True))
        report.record(trainer.global_step, metrics)
        print(report.summary(metrics, {**exported, "metrics": str(run_dir / METRICS_FILE)}), flush=True)
    return metrics


def _attach_report(trainer, cfg, assets, run_dir: Path, train_loader, val_loader, total_steps: int,
                   resumed) -> RunReport:
    """Give the progress bar the run's length and add the run card / summary callback to ``trainer``."""
    for cb in trainer.callbacks:
        if isinstance(cb, RunProgressBar):
            cb.total_steps = total_steps
    if resumed is not None and trainer.is_global_zero:
        print(f"resuming from step {resumed.step} of {total_steps} ({resumed.checkpoint})", flush=True)

    def count(loader) -> int:
        try:
            return len(loader.dataset)
        except (AttributeError, TypeError):  # an iterable dataset has no length
            return 0

    card = run_card(cfg, assets, run_dir, train_samples=count(train_loader), val_samples=count(val_loader),
                    world_size=trainer.world_size, total_steps=total_steps,
                    resumed_from=f"step {resumed.step} ({resumed.checkpoint})" if resumed is not None else None)
    report = RunReport(card, cfg.monitor, cfg.monitor_mode)
    trainer.callbacks.append(report)
    return report


def _raise_if_stopped_early(trainer, run_dir: Path, total_steps: int) -> None:
    """After Ctrl-C / SIGTERM (:class:`GracefulStop`): say where the run stopped and how to continue it."""
    stop = next((cb for cb in trainer.callbacks if isinstance(cb, GracefulStop)), None)
    if stop is None or stop.stopped_at is None or stop.stopped_at >= total_steps > 0:
        return
    checkpoint = find_resume_checkpoint(run_dir)
    raise RunInterrupted(f"stopped at step {stop.stopped_at} of {total_steps}; checkpoint {checkpoint}; continue "
                         f"with the same command plus resume=auto hydra.run.dir={run_dir}")
