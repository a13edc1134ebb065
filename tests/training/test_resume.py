"""Kill-and-resume reproduces an uninterrupted run; a crash during a save never costs the previous checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from chameleon_ft.training.checkpointing import (  # noqa: I001
    PARTIAL_SUFFIX,
    find_resume_checkpoint,
    list_checkpoints,
)
from chameleon_ft.training.train import train
from tests.training.helpers import loader_factory, make_cfg, small_checkpoint
from tests.training.test_fsdp import WORKER, run_worker, step_losses

# Dropout everywhere (RNG state must be restored), the data package's length-grouped sampler (its
# position must be restored), killed after the step-4 checkpoint: resumed mid-epoch (6-batch epochs),
# then across an epoch boundary; cosine schedule.
RESUME = {"peft.dropout": 0.1, "model.dropout": 0.1, "trainer.max_steps": 10, "checkpoint.every_n_steps": 4,
          "checkpoint.keep_last": 2, "optim.warmup_steps": 3}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("ck") / "small")


def test_kill_and_resume_equals_uninterrupted(ckpt, tmp_path):
    ref = tmp_path / "ref"
    run_worker(ref, ckpt, RESUME, "--sampler", "length")
    seen = [line.split()[1] for line in (ref / "batches.txt").read_text().split("\n") if line]
    assert seen[6:10] != seen[0:4]  # the second epoch is reshuffled, not a replay of the first

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(killed), str(ckpt), json.dumps(RESUME),
                             "--sampler", "length", "--delay", "0.4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (killed / "checkpoints" / "step-00000004.ckpt").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        assert (killed / "checkpoints" / "step-00000004.ckpt").exists()

        def steps_started():
            text = (killed / "batches.txt").read_text() if (killed / "batches.txt").exists() else ""
            return [int(line.split()[0]) for line in text.split("\n") if line.strip()]

        while time.time() < deadline and max(steps_started(), default=0) < 5:  # run past the checkpoint
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "metrics.json").exists()  # really interrupted
    assert 4 < max(steps_started()) < 8  # killed past the checkpoint, in the middle of the run
    assert find_resume_checkpoint(killed).name == "step-00000004.ckpt"

    run_worker(killed, ckpt, {**RESUME, "resume": "auto"}, "--sampler", "length")

    want, got = step_losses(ref), step_losses(killed)
    assert sorted(want) == sorted(got) == list(range(10))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    a = load_file(ref / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    assert json.loads((ref / "metrics.json").read_text()) == pytest.approx(json.loads((killed / "metrics.json").read_text()))
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["step-00000004.ckpt", "step-00000008.ckpt"]


def test_crash_during_save_keeps_previous_checkpoint(ckpt, tmp_path, monkeypatch):
    over = {"trainer.max_steps": 4, "checkpoint.every_n_steps": 2, "peft.dropout": 0.1}
    ref = tmp_path / "ref"
    train(make_cfg(ckpt, **over), ref, loader_factory=loader_factory())

    run = tmp_path / "crash"
    real_save = L.Trainer.save_checkpoint
    calls = []

    def crashing_save(self, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) == 2:  # second checkpoint (step 4): half-written, then the process "dies"
            Path(filepath).write_bytes(b"PK\x03\x04 truncated")
            raise RuntimeError("simulated crash during save")
        return real_save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(ckpt, **over), run, loader_factory=loader_factory())
    monkeypatch.setattr(L.Trainer, "save_checkpoint", real_save)

    ckpt_dir = run / "checkpoints"
    assert calls[1].endswith("step-00000004.ckpt" + PARTIAL_SUFFIX)
    assert (ckpt_dir / ("step-00000004.ckpt" + PARTIAL_SUFFIX)).exists()
    assert not (ckpt_dir / "step-00000004.ckpt").exists()
    assert find_resume_checkpoint(run) == ckpt_dir / "step-00000002.ckpt"
    saved = torch.load(ckpt_dir / "step-00000002.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and saved["state_dict"]
    assert all(".lora_" in k for k in saved["state_dict"])  # LoRA run: the frozen base is not saved

    # The previous checkpoint is usable: resuming from it finishes exactly like the uninterrupted run.
    train(make_cfg(ckpt, **{**over, "resume": "auto"}), run, loader_factory=loader_factory())
    want, got = step_losses(ref), step_losses(run)
    assert sorted(got) == [0, 1, 2, 3]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert not list(ckpt_dir.glob("*" + PARTIAL_SUFFIX))  # the stale partial is cleaned up by the next save


def test_find_resume_checkpoint_ignores_incomplete(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    torch.save({"global_step": 3}, d / "step-00000003.ckpt")
    (d / "step-00000009.ckpt").write_bytes(b"not a zip")  # truncated single file
    (d / "step-00000012.ckpt").mkdir()  # sharded dir without metadata (killed mid-write)
    (d / "step-00000012.ckpt" / "__0_0.distcp").write_bytes(b"x")
    (d / ("step-00000015.ckpt" + PARTIAL_SUFFIX)).mkdir()
    sharded = d / "step-00000006.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"m")
    (sharded / "meta.pt").write_bytes(b"m")
    assert find_resume_checkpoint(tmp_path) == sharded
    assert [p.name for p in list_checkpoints(d)] == ["step-00000003.ckpt", "step-00000006.ckpt"]
    assert find_resume_checkpoint(tmp_path / "nothing") is None


def test_keep_last_prunes_old_checkpoints(ckpt, tmp_path):
    train(make_cfg(ckpt, **{"trainer.max_steps": 5, "checkpoint.every_n_steps": 1, "checkpoint.keep_last": 2}),
          tmp_path, loader_factory=loader_factory())
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000004.ckpt", "step-00000005.ckpt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004.ckpt", "step-00000005.ckpt"]


class SimulatedCrash(Exception):
    pass


class _StopAfter(L.Callback):
    """Simulates a crash: raises once the given optimizer step has finished."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise SimulatedCrash(f"after step {trainer.global_step}")


def test_epoch_based_run_resumes_mid_epoch(ckpt, tmp_path):
    """max_epochs instead of max_steps: the loader position still survives the resume (the total step count is
    computed without trainer.estimated_stepping_batches, which drops restored loader states)."""
    over = {"trainer.max_steps": -1, "trainer.max_epochs": 2, "checkpoint.every_n_steps": 4}
    ref = tmp_path / "ref"
    train(make_cfg(ckpt, **over), ref, loader_factory=loader_factory())
    crashed = tmp_path / "crashed"
    with pytest.raises(SimulatedCrash):
        train(make_cfg(ckpt, **over), crashed, loader_factory=loader_factory(), callbacks=[_StopAfter(5)])
    assert find_resume_checkpoint(crashed).name == "step-00000004.ckpt"
    train(make_cfg(ckpt, **over, resume="auto"), crashed, loader_factory=loader_factory())
    want, got = step_losses(ref), step_losses(crashed)
    assert sorted(want) == sorted(got) == list(range(12))  # 6 batches per epoch, 2 epochs
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_checkpoint_due_on_an_epochs_last_batch_is_written_with_step_based_validation(ckpt, tmp_path):
    # 6 batches per epoch; step 6 ends epoch 0, but validation runs at steps 4 and 8 only: Lightning would
    # defer the step-6 save to a validation that never comes at that step.
    over = {"trainer.max_steps": 8, "checkpoint.every_n_steps": 6, "trainer.val_check_interval": 4,
            "checkpoint.keep_last": 0}
    train(make_cfg(ckpt, **over), tmp_path, loader_factory=loader_factory())
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000006.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "step-00000006.ckpt", weights_only=True)["global_step"] == 6
