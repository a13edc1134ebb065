"""The generation command answers exactly as validation did: same template, same image tokens, same model.

Users type raw questions; the adapter carries the template it was trained with (chameleon_ft.json).
"""

import json

from chameleon_ft.config.store import compose
from chameleon_ft.data.reading import read_conversations
from chameleon_ft.evaluation.metrics import vqa_accuracy
from tests.conftest import run_module


def test_vqa_accuracy_through_generate_equals_validation(tmp_path, tiny_grouped):
    run_dir = tmp_path / "run"
    n = 24
    res = run_module("chameleon_ft", ["recipe=vqa", f"hydra.run.dir={run_dir}", "trainer.max_steps=30",
                                      "trainer.val_check_interval=30", "checkpoint.every_n_steps=30",
                                      f"eval.max_samples={n}", "trainer.enable_progress_bar=false"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    reported = json.loads((run_dir / "metrics.json").read_text())["val/acc"]

    records = list(read_conversations(compose(["recipe=vqa"]).data, "val"))[:n]
    lines, answers = [], []
    for rec in records:
        meta = json.loads(rec["meta_json"])
        image = next(s["image_path"] for t in rec["turns"] for s in t["segments"] if s["type"] == "image")
        lines.append({"prompt": meta["question"], "image": image})  # the raw question, as a user types it
        answers.append(meta["answers"])
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = run_module("chameleon_ft.generate", [f"adapter={run_dir / 'adapter'}", f"input={questions}",
                                               f"output={tmp_path / 'gen'}", "mode=text", "max_new_tokens=8",
                                               "batch_size=5"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    outputs = [json.loads(x)["output"] for x in (tmp_path / "gen" / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == n
    assert vqa_accuracy(outputs, answers) == reported
