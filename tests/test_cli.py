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
        assert 0 <= metrics["val/image_match"] <= 1 and 0 <= metrics["val/image_match_ceiling"] <= 1
        assert list((run / "samples").glob("*.png"))
        evaluated = run_cli(["recipe=text_to_image", f"adapter={run / 'adapter'}", "data.max_samples=16",
                             "eval.max_samples=4"], tmp_path, module="chameleon_ft.evaluate")
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        record = json.loads((run / "eval-val.json").read_text())
        assert 0 <= record["metrics"]["image_match"] <= 1 and record["metrics"]["num_samples"] == 4
        assert len((run / "eval-val.predictions.jsonl").read_text().splitlines()) == 4
    assert (run / "adapter" / "adapter_config.json").exists()
    assert list((run / "checkpoints").glob("*.ckpt"))
    saved = (run / "config.yaml").read_text()
    assert f"path: {tiny_grouped}" in saved  # the resolved base checkpoint is recorded
    assert "adapter written to" in res.stdout and "metrics written to" in res.stdout
    assert "chameleon-ft run" in res.stdout and "chameleon-ft summary" in res.stdout  # card and summary
    assert "deprecated" not in res.stderr and "Total FLOPs" not in res.stdout  # a quiet console


def test_multirun_sweep_gives_each_run_its_own_directory(tmp_path, tiny_grouped):
    sweep = tmp_path / "sweep"
    res = run_cli(["-m", "recipe=debug", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}", *FEW_STEPS], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 2
    lrs = sorted(float(next(l for l in (r / "config.yaml").read_text().splitlines() if l.strip().startswith("lr:")).split()[-1]) for r in runs)
    assert lrs == [1e-3, 2e-3]
    # The sweep tells its results: a table of the runs and their monitored metric, and a CSV of it.
    import csv

    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    # Only what varies between the runs; Hydra writes the swept floats in its own spelling.
    assert sorted(r["overrides"] for r in rows) == ["optim.lr=0.001", "optim.lr=0.002"]
    for r in rows:
        run = sweep / r["run"]
        assert r["monitor"] == "val/acc" and float(r["value"]) == json.loads((run / "metrics.json").read_text())["val/acc"]
    assert "sweep summary (2 runs, * = best)" in res.stdout


def test_cli_typo_and_missing_recipe(tmp_path):
    res = run_cli(["recipe=vqa", "optim.lrr=1"], tmp_path)
    assert res.returncode == 2 and "valid keys:" in res.stderr and "warmup_steps" in res.stderr
    res = run_cli([], tmp_path)
    assert res.returncode == 2 and "vqa" in res.stderr and "text_to_image" in res.stderr


def test_user_errors_are_one_line_unless_full_errors_are_asked_for(tmp_path):
    res = run_cli(["recipe=vqa", "data=llava", f"data.path={tmp_path / 'missing.json'}"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.json'}: file not found"]
    assert not (tmp_path / "outputs").exists() or True
    full = subprocess.run([sys.executable, "-m", "chameleon_ft", "recipe=vqa", "data=llava",
                           f"data.path={tmp_path / 'missing.json'}"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="1"), timeout=600)
    assert full.returncode != 0 and "Traceback" in full.stderr and "DataFormatError" in full.stderr


def test_help_version_and_cfg_job(tmp_path):
    res = run_cli(["--help"], tmp_path)
    assert res.returncode == 0
    for name, line in [("vqa", "VQA"), ("text_to_image", "image"), ("debug", "steps")]:
        assert any(row.split()[:1] == [name] and line in row for row in res.stdout.splitlines()), name
    assert "data: " in res.stdout and "digits" in res.stdout and "llava" in res.stdout  # groups and options
    assert "optim.lr" in res.stdout and "default: 0.0002" in res.stdout  # keys, types, defaults
    res = run_cli(["--version"], tmp_path)
    from chameleon_ft import __version__

    assert res.returncode == 0 and res.stdout.strip() == f"chameleon-ft {__version__}"
    res = run_cli(["recipe=vqa", "optim.lr=0.003", "--cfg", "job"], tmp_path)
    assert res.returncode == 0 and "lr: 0.003" in res.stdout and "task: vqa" in res.stdout
    assert not (tmp_path / "outputs").exists()
