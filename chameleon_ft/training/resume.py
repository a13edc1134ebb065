"""A resume continues the same run: the checkpoint's config is compared with the new one first.

Every checkpoint stores the run's resolved config and world size (:func:`run_record`, under
:data:`RUN_RECORD_KEY`). Before a resume touches the run directory, :func:`check_resume` compares the
keys that define what is learnt -- ``task``, ``seed``, the ``model``, ``data``, ``peft`` and ``optim``
groups, and the global batch (``data.batch_size`` x devices x nodes x ``trainer.accumulate_grad_batches``)
-- and refuses any difference that ``resume_allow`` does not list, naming every differing key with its old
and new value. Other keys (``trainer.max_steps``, logging, checkpointing, evaluation) may change freely.
Every resume is appended to ``<run dir>/resumes.jsonl`` with the keys it changed (:func:`record_resume`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from chameleon_ft.errors import ConfigError, RunError

RUN_RECORD_KEY = "chameleon_ft_run"
RESUMES_FILE = "resumes.jsonl"
GLOBAL_BATCH = "global_batch"
# Top-level keys and groups whose values define what a run learns.
DEFINING = ("task", "seed", "model", "data", "peft", "optim")
# Keys inside those groups that only change how the run executes, not what it computes.
EXECUTION_ONLY = {"model.activation_checkpointing", "model.attn_implementation", "model.loss_chunk_size",
                  "data.batch_size", "data.eval_batch_size", "data.num_workers", "data.cache_dir",
                  "data.pretokenize_shard_size", "data.pretokenize_shard_seconds"}
NOT_COMPARED = {"resume", "resume_allow"}
_META_FILE = "meta.pt"  # the non-tensor part of a sharded (directory) checkpoint


def run_record(cfg: DictConfig, world_size: int) -> dict:
    """What a checkpoint stores about its run: the resolved config and the world size."""
    return {"config": OmegaConf.to_container(cfg, resolve=True), "world_size": int(world_size)}


def read_checkpoint_record(ckpt_path: str | Path) -> tuple[dict | None, int]:
    """``(run record or None, global step)`` of a checkpoint file or sharded directory, read without
    loading its tensors (memory-mapped)."""
    path = Path(ckpt_path)
    file = path / _META_FILE if path.is_dir() else path
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for unreadable files
        raise RunError(f"{file}: cannot read the checkpoint to check the resume ({e})") from e
    return ckpt.get(RUN_RECORD_KEY), int(ckpt.get("global_step", 0))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 2e-4, ...}``: every leaf of a nested dict under its dotted key (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def global_batch(config: dict, world_size: int) -> int:
    """Samples per optimizer step over every rank."""
    return int(config["data"]["batch_size"]) * int(world_size) * int(config["trainer"]["accumulate_grad_batches"])


def is_defining(key: str) -> bool:
    """Whether a change of ``key`` changes what the run learns (see :data:`DEFINING`)."""
    return key == GLOBAL_BATCH or (key.split(".")[0] in DEFINING and key not in EXECUTION_ONLY)


def _allows(allowed: list[str], key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def check_allow_list(allowed: list[str], config: dict) -> None:
    """Every ``resume_allow`` entry must name a key or group of the config (or ``global_batch``)."""
    keys = flatten(config)
    for a in allowed:
        if a != GLOBAL_BATCH and a not in keys and not any(k.startswith(a + ".") for k in keys):
            raise ConfigError(f"resume_allow: {a!r} is not a config key or group (nor {GLOBAL_BATCH!r})")


@dataclass
class ResumeCheck:
    """A validated resume: the checkpoint, its step, and every key that changed (``key: (old, new)``)."""

    checkpoint: str
    step: int
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def config_changes(old: dict, old_world_size: int, new: dict, new_world_size: int) -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs between two resolved configs, plus the global batch."""
    a, b = flatten(old), flatten(new)
    missing = object()
    changed = {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
               if k not in NOT_COMPARED and a.get(k, missing) != b.get(k, missing)}
    changed = {k: tuple(None if v is missing else v for v in pair) for k, pair in changed.items()}
    ga, gb = global_batch(old, old_world_size), global_batch(new, new_world_size)
    if ga != gb:
        changed[GLOBAL_BATCH] = (ga, gb)
    return changed


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (str, list, dict)) or v is None else str(v)


def check_resume(ckpt_path: str | Path, cfg: DictConfig, world_size: int, run_dir: Path) -> ResumeCheck:
    """Compare the run that wrote ``ckpt_path`` with ``cfg`` at ``world_size``; raise :class:`RunError`
    listing every defining key that differs and ``cfg.resume_allow`` does not allow. Reads only."""
    record, step = read_checkpoint_record(ckpt_path)
    if record is None:
        raise RunError(f"resume={cfg.resume}: {ckpt_path} holds no run config (it was written by an older "
                       "chameleon-ft), so it cannot be checked to be this run; start a new run directory")
    new = OmegaConf.to_container(cfg, resolve=True)
    allowed = [str(a) for a in (cfg.get("resume_allow") or [])]
    check_allow_list(allowed, new)
    changed = config_changes(record["config"], record["world_size"], new, world_size)
    refused = {k: v for k, v in changed.items() if is_defining(k) and not _allows(allowed, k)}
    if refused:
        listed = "; ".join(f"{k}: {_show(o)} -> {_show(n)}" for k, (o, n) in refused.items())
        raise RunError(
            f"resume={cfg.resume}: {ckpt_path} was written by a different run; these keys differ "
            f"(checkpoint -> now): {listed}. Nothing in {run_dir} was changed. Start a new run in another "
            f"directory (hydra.run.dir=...), or allow the change deliberately with "
            f"resume_allow=[{','.join(refused)}]")
    return ResumeCheck(str(ckpt_path), step, changed)


def record_resume(run_dir: Path, check: ResumeCheck) -> Path:
    """Append one line to ``<run_dir>/resumes.jsonl``: time, checkpoint, step and the changed keys."""
    path = Path(run_dir) / RESUMES_FILE
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": check.checkpoint, "step": check.step,
             "changed": {k: {"old": o, "new": n} for k, (o, n) in check.changed.items()}}
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
    return path
