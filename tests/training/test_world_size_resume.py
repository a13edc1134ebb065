"""Resume at another world size: killed 2-process FSDP2 runs resume on 1 process and the other way round,
seeing the same global batches and ending with the uninterrupted run's adapter; a changed global batch
warns and continues after the samples already consumed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from safetensors.torch import load_file

from chameleon_ft.training.checkpointing import find_resume_checkpoint
from tests.training.helpers import small_checkpoint
from tests.training.test_fsdp import WORKER, run_worker, step_losses

# 48 samples, global batch 8: 6 steps per epoch; killed after the step-3 checkpoint, so the resumed
# run finishes epoch 0 and starts epoch 1. Step 3 is odd: each of 2 ranks had taken 3 batches, which a
# resumed accumulating process must count as 6 to close its windows where the 2-process run did.
# No dropout: ranks draw different random streams.
RUN = {"trainer.max_steps": 8, "checkpoint.every_n_steps": 3, "checkpoint.keep_last": 3, "optim.warmup_steps": 2}
TWO = {**RUN, "strategy.name": "fsdp", "trainer.devices": 2}
ONE_ACCUMULATING = {**RUN, "trainer.devices": 1, "trainer.accumulate_grad_batches": 2}
KILL_AFTER = 3


def batches(run_dir: Path) -> list[tuple[int, int, int]]:
    """(step, batch signature, rank) of every training batch, in the order each rank logged them."""
    lines = (run_dir / "batches.txt").read_text().split("\n")
    return [tuple(int(x) for x in line.split()) for line in lines if line.strip()]


def per_step(run_dir: Path) -> dict[int, Counter]:
    """The batches (signatures) each optimizer step consumed, over all ranks; the last visit of a step wins
    (a killed run's unfinished step is trained again after the resume)."""
    seen: dict[int, list[int]] = defaultdict(list)
    for step, sig, _ in batches(run_dir):
        seen[step].append(sig)
    micro_batches = 2  # every layout here: ranks x accumulation = 2 micro-batches per step
    return {step: Counter(sigs[-micro_batches:]) for step, sigs in seen.items()}


def kill_after_checkpoint(run_dir: Path, ckpt: Path, overrides: dict) -> None:
    """Start a run, let it write the step-``KILL_AFTER`` checkpoint and start the next step, SIGKILL it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen([sys.executable, str(WORKER), str(run_dir), str(ckpt), json.dumps(overrides),
                             "--sampler", "length", "--delay", "0.3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    target = run_dir / "checkpoints" / f"step-{KILL_AFTER:08d}.ckpt"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, "training ended before it could be killed"
            started = [s for s, _, _ in batches(run_dir)] if (run_dir / "batches.txt").exists() else []
            if target.exists() and max(started, default=0) > KILL_AFTER:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank: Lightning starts rank 1 from rank 0's process
        proc.wait()
    assert not (run_dir / "metrics.json").exists()
    assert find_resume_checkpoint(run_dir) == target


def resume(run_dir: Path, ckpt: Path, overrides: dict, *extra: str) -> subprocess.CompletedProcess:
    return run_worker(run_dir, ckpt, {**overrides, "resume": "auto"}, "--sampler", "length", *extra, timeout=300)


def assert_same_run(got: Path, want: Path) -> None:
    a, b = step_losses(want), step_losses(got)
    assert sorted(a) == sorted(b) == list(range(RUN["trainer.max_steps"]))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert per_step(got) == per_step(want)  # the same samples in every step
    x = load_file(want / "adapter" / "adapter_model.safetensors")
    y = load_file(got / "adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    # As in test_fsdp: Adam turns reduction-order noise on near-zero gradients into steps of up to ~1% of lr.
    for k in x:
        assert (y[k] - x[k]).abs().max() < 1e-4, k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("world_size")
    ckpt = small_checkpoint(root / "small")
    ref = root / "two_uninterrupted"
    run_worker(ref, ckpt, TWO, "--sampler", "length", timeout=300)
    return ckpt, ref


def test_two_processes_killed_resume_on_one_accumulating(reference, tmp_path):
    ckpt, ref = reference
    run = tmp_path / "run"
    kill_after_checkpoint(run, ckpt, TWO)
    assert (run / "checkpoints" / f"step-{KILL_AFTER:08d}.ckpt").is_dir()  # sharded: one shard per rank
    resume(run, ckpt, ONE_ACCUMULATING)
    assert_same_run(run, ref)


def test_one_process_killed_resumes_on_two(reference, tmp_path):
    ckpt, ref = reference
    run = tmp_path / "run"
    kill_after_checkpoint(run, ckpt, ONE_ACCUMULATING)
    assert (run / "checkpoints" / f"step-{KILL_AFTER:08d}.ckpt").is_file()  # Lightning's single file
    resume(run, ckpt, TWO)
    assert_same_run(run, ref)


def test_changed_global_batch_warns_and_continues_after_the_consumed_samples(reference, tmp_path):
    ckpt, ref = reference
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    saved = ref / "checkpoints" / f"step-{KILL_AFTER:08d}.ckpt"
    shutil.copytree(saved, run / "checkpoints" / saved.name)
    # One process, no accumulation, the same per-device batch: 4 samples per step instead of 8; 2 more steps.
    # A changed global batch changes what is learnt: refused unless allowed deliberately (test_resume_check).
    proc = resume(run, ckpt, {**RUN, "trainer.devices": 1, "trainer.max_steps": KILL_AFTER + 2,
                              "resume_allow": ["global_batch"]}, "--global-batch", "4")
    assert "the global batch changed" in proc.stderr
    assert "samples per optimizer step (per-device batch 4 x 2 device(s) x 1 accumulation)" in proc.stderr
    assert "this run takes 4 (4 x 1 x 1)" in proc.stderr
    assert "continues after 24 of the 24 samples" in proc.stderr
    # The 6 batches of 4 already consumed were batches 0..5 of the epoch's order; the resumed run takes
    # batches 6 and 7 next: step 3's batches of the 2-process run, rank 0's then rank 1's.
    want = [sig for step, sig, rank in sorted(batches(ref), key=lambda b: (b[0], b[2])) if step == KILL_AFTER]
    got = [sig for step, sig, _ in batches(run)]
    assert got == want
    assert sorted(step_losses(run)) == [KILL_AFTER, KILL_AFTER + 1]  # the step count continues


def test_trainer_counters_move_to_the_new_share_and_rescale_earlier_epochs():
    from types import SimpleNamespace

    from lightning.pytorch.loops.progress import _BatchProgress

    from chameleon_ft.training.dataloading import TrainerProgress

    progress = _BatchProgress()
    # Saved at the end of a batch: 2 earlier epochs of 6 batches, then 3 batches of this one, the last
    # one not yet counted as completed.
    progress.total.ready = progress.total.started = progress.total.processed = 15
    progress.total.completed = 14
    progress.current.ready = progress.current.started = progress.current.processed = 3
    progress.current.completed = 2
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    TrainerProgress(trainer).set_batches_done(6, earlier_scale=2.0)  # 2 ranks -> 1: twice the batches
    assert (progress.current.ready, progress.current.started, progress.current.processed,
            progress.current.completed) == (6, 6, 6, 5)
    assert (progress.total.ready, progress.total.started, progress.total.processed, progress.total.completed) == \
        (30, 30, 30, 29)
