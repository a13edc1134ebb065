"""Periodic, atomic, resumable training checkpoints.

A checkpoint is written under a temporary name (``step-00000010.ckpt.partial``: a file, or under FSDP a
directory with every rank's shard) and renamed to its final name by rank 0 only after every rank has
finished writing. A kill at any moment therefore leaves either the complete new checkpoint or none,
and the previous ones stay usable; :func:`find_resume_checkpoint` never returns a ``.partial``.
What a checkpoint holds (only the trained tensors when the base is frozen) is decided by
``ChameleonLitModule.checkpoint_keys``. Weights with a NaN or infinity are never saved: the save
stops the run instead (:func:`~chameleon_ft.training.health.check_finite_weights`).
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path
from weakref import proxy

from lightning.pytorch.callbacks import ModelCheckpoint

from chameleon_ft.training.checkpoint_format import is_sharded
from chameleon_ft.training.health import check_finite_weights

CHECKPOINT_SUBDIR = "checkpoints"
PARTIAL_SUFFIX = ".partial"
_NAME = re.compile(r"^step-(\d+)\.ckpt$")


def checkpoint_step(path: str | Path) -> int | None:
    """The optimizer step in a checkpoint's name, or None if the name is not a final checkpoint's."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete_checkpoint(path: str | Path) -> bool:
    """A final-named checkpoint that is a readable zip file, or a sharded directory with its metadata."""
    path = Path(path)
    if checkpoint_step(path) is None:
        return False
    if path.is_dir():
        return is_sharded(path)
    return path.is_file() and zipfile.is_zipfile(path)


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: checkpoint_step(p))


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The latest complete checkpoint of ``run_dir`` (for ``resume=auto``), or None."""
    found = list_checkpoints(Path(run_dir) / CHECKPOINT_SUBDIR)
    return found[-1] if found else None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


class AtomicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every ``every_n_steps`` optimizer steps, written atomically.

    The last ``keep_last`` are kept by Lightning's own top-k bookkeeping, ranking checkpoints by ``step``
    (``keep_last <= 0`` keeps all). ``on_saved(trainer, module)`` runs on every rank after each complete
    checkpoint.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_last: int = 2, on_saved=None):
        super().__init__(
            dirpath=str(dirpath),
            filename="step-{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=int(every_n_steps),
            monitor="step",
            mode="max",
            save_top_k=int(keep_last) if int(keep_last) > 0 else -1,
            save_last=False,
            enable_version_counter=False,
        )
        # Called on every rank after each complete save (e.g. exporting the adapter; may be collective).
        self.on_saved = on_saved

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # Lightning defers a save on an epoch's last batch to the validation it expects next, so that a
        # validation metric is fresh; with step-based validation none may come, and the checkpoint is lost.
        # Our ranking key, the step, is never stale: save now.
        if getattr(self, "_defer_save_until_validation", False):
            self._defer_save_until_validation = False
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        final = Path(filepath)
        check_finite_weights(trainer, trainer.lightning_module, f"checkpoint {final}")
        tmp = final.with_name(final.name + PARTIAL_SUFFIX)
        strategy = trainer.strategy
        if trainer.is_global_zero:
            _remove(tmp)
            tmp.parent.mkdir(parents=True, exist_ok=True)
        strategy.barrier("checkpoint_start")
        trainer.save_checkpoint(str(tmp), self.save_weights_only)
        strategy.barrier("checkpoint_written")
        if trainer.is_global_zero:
            _fsync(tmp)
            if final.exists():  # same step saved again (e.g. after a resume): replace it
                old = final.with_name(final.name + ".old")
                _remove(old)
                os.replace(final, old)
                os.replace(tmp, final)
                _remove(old)
            else:
                os.replace(tmp, final)
            self._remove_partials(final.parent)
        strategy.barrier("checkpoint_renamed")
        if self.on_saved is not None:
            self.on_saved(trainer, trainer.lightning_module)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = str(final)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _remove_partials(self, ckpt_dir: Path) -> None:
        """Leftovers of a save that was killed before the newest complete one."""
        done = list_checkpoints(ckpt_dir)
        newest = checkpoint_step(done[-1]) if done else None
        for p in ckpt_dir.glob(f"*{PARTIAL_SUFFIX}"):
            step = checkpoint_step(p.name[: -len(PARTIAL_SUFFIX)])
            if newest is not None and step is not None and step < newest:
                _remove(p)
