"""The generation command answers exactly as validation did: same template, same image tokens, same model."""

import json
import os
import subprocess
import sys
from pathlib import Path

from chameleon_ft.data.digits import digits_conversations
from chameleon_ft.data.sample import DEFAULT_VQA_TEMPLATE
from chameleon_ft.evaluation.metrics import vqa_accuracy
from chameleon_ft.generation.generate import compose_generate_config, run

REPO = Path(__file__).resolve().parents[2]


def test_vqa_accuracy_through_generate_equals_validation(tmp_path, tiny_grouped):
    run_dir = tmp_path / "run"
    n = 24
    res = subprocess.run(
        [sys.executable, "-m", "chameleon_ft", "recipe=vqa", f"hydra.run.dir={run_dir}", "trainer.max_steps=30",
         "trainer.val_check_interval=30", "checkpoint.every_n_steps=30", f"eval.max_samples={n}",
         "trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    reported = json.loads((run_dir / "metrics.json").read_text())["val/acc"]

    records = digits_conversations("vqa", "val", image_size=64)[:n]
    lines, answers = [], []
    for rec in records:
        meta = json.loads(rec["meta_json"])
        image = next(s["image_path"] for t in rec["turns"] for s in t["segments"] if s["type"] == "image")
        lines.append({"prompt": DEFAULT_VQA_TEMPLATE.format(question=meta["question"]), "image": image})
        answers.append(meta["answers"])
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = compose_generate_config([f"model={tiny_grouped}", f"adapter={run_dir / 'adapter'}", f"input={questions}",
                                   f"output={tmp_path / 'gen'}", "mode=text", "max_new_tokens=8", "batch_size=5"])
    outputs = [json.loads(x)["output"] for x in run(cfg).read_text().splitlines()]
    assert len(outputs) == n
    assert vqa_accuracy(outputs, answers) == reported
