"""The command line end to end: every recipe runs, sweeps run, bad config fails fast."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chameleon_ft.config.store import recipe_names

REPO = Path(__file__).resolve().parents[1]
FEW_STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint.every_n_steps=2",
             "data.max_samples=16", "eval.max_samples=4", "eval.image_samples=2", "trainer.enable_progress_bar=false"]


def run_cli(args, cwd, module="chameleon_ft"):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_runs_end_to_end(recipe, tmp_path, tiny_grouped):
    run = tmp_path / "run"
    res = run_cli([f"recipe={recipe}", f"hydra.run.dir={run}", *FEW_STEPS], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val/loss" in metrics
    if recipe in ("vqa", "debug"):
        assert "val/acc" in metrics
    if recipe == "text_to_image":
        assert "val/image_token_accuracy" in metrics
        assert list((run / "samples").glob("*.png"))
    assert (run / "adapter" / "adapter_config.json").exists()
    assert list((run / "checkpoints").glob("*.ckpt"))
    saved = (run / "config.yaml").read_text()
    assert f"path: {tiny_grouped}" in saved  # the resolved base checkpoint is recorded
    assert "adapter written to" in res.stdout and "metrics written to" in res.stdout


def test_multirun_sweep_gives_each_run_its_own_directory(tmp_path, tiny_grouped):
    sweep = tmp_path / "sweep"
    res = run_cli(["-m", "recipe=debug", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}", *FEW_STEPS], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 2
    lrs = sorted(float(next(l for l in (r / "config.yaml").read_text().splitlines() if l.strip().startswith("lr:")).split()[-1]) for r in runs)
    assert lrs == [1e-3, 2e-3]


def test_cli_typo_and_missing_recipe(tmp_path):
    res = run_cli(["recipe=vqa", "optim.lrr=1"], tmp_path)
    assert res.returncode != 0 and "valid keys:" in res.stderr and "warmup_steps" in res.stderr
    res = run_cli([], tmp_path)
    assert res.returncode != 0 and "vqa" in res.stderr and "text_to_image" in res.stderr
