"""Ctrl-C stops a run at the next optimizer step with a checkpoint; the printed command continues it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
ARGS = ["recipe=debug", "trainer.max_steps=400", "trainer.val_check_interval=1000", "checkpoint.every_n_steps=1000",
        "data.max_samples=16", "eval.max_samples=4", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0"]


def _cli(args, cwd, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "chameleon_ft", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _wait_for_line(proc, text: str, timeout: float = 300) -> list[str]:
    """Read the run's stdout until a line containing ``text`` (the lines read so far)."""
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"no {text!r} in the output: {''.join(lines)[-2000:]} {proc.stderr.read()[-2000:]}")


def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_resumes(tmp_path, tiny_grouped):
    run = tmp_path / "run"
    proc = _cli([*ARGS, f"hydra.run.dir={run}"], tmp_path)
    _wait_for_line(proc, "run directory")  # the run card's last line: training starts now
    time.sleep(3)  # a few steps; 400 take far longer
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "stopping after this step" in out
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: stopped at step ") and " of 400; checkpoint " in line, err[-2000:]
    step = int(line.split("stopped at step ")[1].split()[0])
    assert 0 < step < 400
    ckpts = list((run / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1
    saved = torch.load(ckpts[0], map_location="cpu", weights_only=True, mmap=True)
    assert saved["global_step"] == step  # the step it said, on disk
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()  # nothing exported
    hint = line.split("continue with the same command plus ")[1].split()
    assert hint == ["resume=auto", f"hydra.run.dir={run}"]

    # The same command plus the hint, with a shorter run so the test ends soon (max_steps may change).
    done = _cli([*ARGS, *hint, f"trainer.max_steps={step + 2}"], tmp_path)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    assert f"resuming from step {step} of {step + 2} (" in out
    assert f"step {step} (" in out.split("chameleon-ft run")[1]  # the card's "resumed from" line
    assert "chameleon-ft summary" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val/acc" in metrics and (run / "adapter" / "adapter_config.json").exists()
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["step"] == step
