"""``resume`` continues the same run: a different run is refused before the run directory is touched;
deliberate changes are allowed with ``resume_allow``, applied, and recorded in ``resumes.jsonl``."""

import csv
import json
import shutil

import pytest
import torch

from chameleon_ft.errors import ConfigError, RunError
from chameleon_ft.training.resume import RESUMES_FILE, RUN_RECORD_KEY, check_resume, run_record
from chameleon_ft.training.train import train
from tests.conftest import run_module
from tests.training.helpers import loader_factory, make_cfg, small_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("ck") / "small")


def snapshot(run_dir) -> dict[str, bytes]:
    """Every file of a run directory but Hydra's log (Hydra appends to it before any of our code runs)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "train.log"}


def assert_untouched(run_dir, before: dict[str, bytes]) -> None:
    """Every file is as it was; the only new ones are Hydra's record of the refused invocation."""
    after = snapshot(run_dir)
    assert {k: after.get(k) for k in before} == before
    new = sorted(set(after) - set(before))
    assert len({k.split("/")[1] for k in new}) == 1 and all(k.startswith(".hydra/") for k in new), new


def lr_by_step(run_dir) -> dict[int, float]:
    out = {}
    for path in sorted((run_dir / "csv").glob("metrics*.csv")):
        with open(path) as f:
            out.update({int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")})
    return out


def test_cli_resume_of_another_recipe_is_refused_and_an_allowed_change_continues(tmp_path):
    first = tmp_path / "first"
    res = run_module("chameleon_ft", ["recipe=debug", "trainer.max_steps=2", f"hydra.run.dir={first}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    before = snapshot(copy)
    assert "config.yaml" in before and "csv/metrics.csv" in before

    res = run_module("chameleon_ft", ["recipe=captioning", "resume=auto", f"hydra.run.dir={copy}"], cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: resume=auto: {copy / 'checkpoints' / 'step-00000002.ckpt'} was written by a "
                           "different run; these keys differ (checkpoint -> now): "), last
    for change in ('task: "vqa" -> "captioning"', 'data.task: "vqa" -> "captioning"', "optim.lr: 0.0002 -> 0.002",
                   "optim.warmup_steps: 10 -> 20", 'peft.target_modules: "attention" -> "all_linear"'):
        assert change in last, change
    assert "trainer.max_steps" not in last  # not a key that defines the run
    assert f"Nothing in {copy} was changed" in last and "resume_allow=[" in last
    assert_untouched(copy, before)  # config.yaml, the CSV log, checkpoints, the first invocation's .hydra

    # README: continue longer with a deliberately lower learning rate
    res = run_module("chameleon_ft", ["recipe=debug", "resume=auto", f"hydra.run.dir={copy}", "trainer.max_steps=4",
                                      "optim.lr=1e-4", "resume_allow=[optim.lr]"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (entry,) = [json.loads(line) for line in (copy / RESUMES_FILE).read_text().splitlines()]
    assert entry["step"] == 2 and entry["checkpoint"] == str(copy / "checkpoints" / "step-00000002.ckpt")
    assert entry["changed"] == {"optim.lr": {"old": 2e-4, "new": 1e-4}, "trainer.max_steps": {"old": 2, "new": 4}}
    assert (copy / "checkpoints" / "step-00000004.ckpt").exists()
    assert (copy / "csv" / "metrics.part1.csv").read_bytes() == before["csv/metrics.csv"]


def test_changed_learning_rate_is_refused_then_allowed_applied_and_recorded(ckpt, tmp_path):
    base = {"optim.scheduler": "constant", "optim.warmup_steps": 0, "checkpoint.every_n_steps": 2}
    train(make_cfg(ckpt, **base, **{"trainer.max_steps": 4}), tmp_path, loader_factory=loader_factory())
    config_yaml = (tmp_path / "config.yaml").read_bytes()
    changed = {**base, "resume": "auto", "trainer.max_steps": 6, "optim.lr": 5e-3}
    with pytest.raises(RunError, match=r"these keys differ \(checkpoint -> now\): optim\.lr: 0\.01 -> 0\.005\. "):
        train(make_cfg(ckpt, **changed), tmp_path, loader_factory=loader_factory())
    assert (tmp_path / "config.yaml").read_bytes() == config_yaml
    assert not (tmp_path / RESUMES_FILE).exists() and not (tmp_path / "csv" / "metrics.part1.csv").exists()

    train(make_cfg(ckpt, **changed, resume_allow=["optim.lr"]), tmp_path, loader_factory=loader_factory())
    want = {0: 1e-2, 1: 1e-2, 2: 1e-2, 3: 1e-2, 4: 5e-3, 5: 5e-3}  # the new lr is used after the resume
    assert lr_by_step(tmp_path) == pytest.approx(want, rel=1e-6)
    (entry,) = [json.loads(line) for line in (tmp_path / RESUMES_FILE).read_text().splitlines()]
    assert entry["step"] == 4
    assert entry["changed"] == {"optim.lr": {"old": 1e-2, "new": 5e-3}, "trainer.max_steps": {"old": 4, "new": 6}}


def fake_checkpoint(path, cfg, world_size=1, step=3):
    torch.save({RUN_RECORD_KEY: run_record(cfg, world_size), "global_step": step}, path)
    return path


def test_global_batch_is_compared_not_its_factors(tmp_path):
    old = make_cfg("/base", **{"data.batch_size": 4, "trainer.accumulate_grad_batches": 1})
    path = fake_checkpoint(tmp_path / "step-00000003.ckpt", old, world_size=2)
    same = make_cfg("/base", **{"data.batch_size": 2, "trainer.accumulate_grad_batches": 2, "resume": "auto"})
    check = check_resume(path, same, 2, tmp_path)
    assert check.step == 3 and "global_batch" not in check.changed
    assert check.changed["data.batch_size"] == (4, 2)  # recorded, but not a different run
    bigger = make_cfg("/base", **{"data.batch_size": 4, "resume": "auto"})
    with pytest.raises(RunError, match=r"these keys differ \(checkpoint -> now\): global_batch: 8 -> 16\. "):
        check_resume(path, bigger, 4, tmp_path)
    assert "global_batch" in check_resume(path, make_cfg("/base", **{"resume_allow": ["global_batch"]}), 4,
                                          tmp_path).changed


def test_allow_list_entries_must_name_config_keys_or_groups(tmp_path):
    cfg = make_cfg("/base")
    path = fake_checkpoint(tmp_path / "step-00000003.ckpt", cfg)
    changed = make_cfg("/base", **{"optim.lr": 1.0, "peft.r": 8, "resume_allow": ["optim"]})
    with pytest.raises(RunError, match=r"differ \(checkpoint -> now\): peft\.r: 4 -> 8\. .*resume_allow=\[peft\.r\]$"):
        check_resume(path, changed, 1, tmp_path)
    with pytest.raises(ConfigError, match="resume_allow: 'optim.learning_rate' is not a config key"):
        check_resume(path, make_cfg("/base", resume_allow=["optim.learning_rate"]), 1, tmp_path)


def test_checkpoint_without_a_run_record_is_refused(tmp_path):
    path = tmp_path / "step-00000003.ckpt"
    torch.save({"global_step": 3, "state_dict": {}}, path)
    with pytest.raises(RunError, match="holds no run config"):
        check_resume(path, make_cfg("/base", resume="auto"), 1, tmp_path)
