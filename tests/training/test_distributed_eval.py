"""Generation-based validation metrics under several processes equal the one-process ones (DDP and FSDP).

Every run validates the same weights: no training step (trainer.max_steps=0), and new weights are seeded by
name, not by rank, so one process and two processes hold the same model.
"""

import json

import pytest

from tests.conftest import run_module

RUN = ["recipe=debug", "trainer.max_steps=0", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
       "eval.max_samples=9", "eval.max_new_tokens=4", "data.eval_batch_size=2", "logger.tensorboard=false"]


def validate(tmp_path, name, *extra):
    run = tmp_path / name
    res = run_module("chameleon_ft", [*RUN, f"hydra.run.dir={run}", *extra], cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    preds = [json.loads(line)["prediction"] for line in (run / "val_predictions.jsonl").read_text().splitlines()]
    return metrics, preds


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_one_process_metrics(tmp_path, tiny_grouped, strategy):
    one, one_preds = validate(tmp_path, "one")
    two, two_preds = validate(tmp_path, strategy, f"strategy={strategy}", "trainer.devices=2")
    assert len(one_preds) == 9 and any(one_preds)  # 9 questions over 2 ranks: one rank pads its share
    assert two_preds == one_preds
    assert "val/acc" in two and two["val/acc"] == one["val/acc"]
    assert two["val/exact_match"] == one["val/exact_match"]
