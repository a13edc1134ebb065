"""One run per run directory: a second run fails at once naming the holder; a killed run's lock does not
block ``resume=auto``."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from chameleon_ft.errors import RunError
from chameleon_ft.training.checkpointing import list_checkpoints
from chameleon_ft.training.resume import RESUMES_FILE
from chameleon_ft.training.run_lock import OWNER_FILE, RunDirLock
from tests.conftest import REPO, run_module


def test_second_run_fails_at_once_and_a_killed_runs_directory_resumes(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "chameleon_ft", "recipe=debug", "trainer.max_steps=1000",
                              "checkpoint.every_n_steps=1", "trainer.val_check_interval=1000", f"hydra.run.dir={run_dir}"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list_checkpoints(run_dir / "checkpoints"):
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        assert list_checkpoints(run_dir / "checkpoints"), "the first run wrote no checkpoint in time"
        config_yaml = (run_dir / "config.yaml").read_bytes()

        started = time.time()
        second = run_module("chameleon_ft", ["recipe=debug", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        took = time.time() - started
        assert first.poll() is None  # still training: the second run did not disturb it
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: run directory {run_dir} is in use by another run "
                           f"(PID {first.pid} on host {socket.gethostname()}, since "), last
    assert took < 60, took  # refused before any model or data was loaded
    assert (run_dir / "config.yaml").read_bytes() == config_yaml

    # The killed run left its lock file and owner record behind; neither blocks the resume.
    assert json.loads((run_dir / OWNER_FILE).read_text())["pid"] == first.pid
    step = max(int(p.name[5:13]) for p in list_checkpoints(run_dir / "checkpoints"))
    resumed = run_module("chameleon_ft", ["recipe=debug", "resume=auto", f"trainer.max_steps={step + 1}",
                                          "checkpoint.every_n_steps=1", "trainer.val_check_interval=1000",
                                          f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (entry,) = [json.loads(line) for line in (run_dir / RESUMES_FILE).read_text().splitlines()]
    assert entry["step"] == step and entry["changed"] == {"trainer.max_steps": {"old": 1000, "new": step + 1}}
    assert not (run_dir / OWNER_FILE).exists()  # released at the end of the run


HOLDER = """
import sys, time
from chameleon_ft.training.run_lock import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_is_exclusive_between_processes_and_freed_by_the_os_on_kill(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"in use by another run \(PID {holder.pid} on host "):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunDirLock(tmp_path) as lock:  # a dead holder holds nothing
        assert lock.owner()["pid"] == os.getpid()
        with pytest.raises(RunError, match=rf"PID {os.getpid()} on host"):  # also within one process
            RunDirLock(tmp_path).acquire()
    assert not (tmp_path / OWNER_FILE).exists()
