"""Every command in README.md that can run on a CPU runs here, as a subprocess, with the exact text from README.

The commands are read from README itself, so the two cannot drift. They run in order in one working
directory that holds small files under the names README uses (train.json, images/, questions.json, ...).
Each training command gets a few overrides appended that only shorten it (steps, samples); nothing else
is changed. Commands that need a real 7B checkpoint, a GPU, several nodes or the install itself are
skipped, each with its reason.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"

# Why a README command cannot run here (first match wins).
SKIP = [
    ("/models/", "needs a real Chameleon checkpoint"),
    ("trainer=gpu", "needs a GPU"),
    ("torchrun", "several nodes (rehearsed in the training tests)"),
    ("submitit", "needs a SLURM cluster"),
    ("gpu_check.sh", "needs a GPU"),
    ("python -m benchmarks", "timed separately: python -m benchmarks"),
    ("pip install", "the install itself (CI runs it)"),
    ("pip wheel", "the install itself (CI runs it: .ci/installed_wheel)"),
    ("python -m venv", "the install itself (CI runs it)"),
    ("python -m pytest", "this test suite itself"),
]
# Appended to training runs: shorter, same code path.
SHORT_TRAINING = ["trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint.every_n_steps=2",
                  "data.max_samples=12", "eval.max_samples=6", "eval.image_samples=2",
                  "trainer.enable_progress_bar=false"]


def readme_commands() -> list[str]:
    """Shell commands of README's bash blocks, in order (continuation lines joined, comments dropped)."""
    text = README.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIP if pattern in command), None)


def shortened(argv: list[str]) -> list[str]:
    """``argv`` with overrides that only shorten a run appended."""
    module = argv[2] if argv[:2] == [sys.executable, "-m"] else None
    asks_only = any(a in ("--help", "--version", "--cfg") for a in argv)
    if module == "chameleon_ft" and not asks_only:
        return argv + SHORT_TRAINING
    if module == "chameleon_ft.pretokenize":
        return argv + ["data.max_samples=12"]
    if module == "chameleon_ft.evaluate":
        return argv + ["eval.max_samples=6"]
    return argv


def to_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[0] == "chameleon-ft":  # the console script itself runs in CI's installed-wheel check
        argv = [sys.executable, "-m", "chameleon_ft", *argv[1:]]
    return argv


def write_workspace(root: Path) -> None:
    """Small files under the names README uses, made from the bundled digits."""
    import datasets
    from PIL import Image

    from chameleon_ft.data.formats.digits import load_scans, render_digit, split_indices

    scans, labels = load_scans()
    picks = split_indices("train")[:16]
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def image(folder: str, name: str, i: int) -> str:
        (root / folder).mkdir(parents=True, exist_ok=True)
        render_digit(scans[i], 64).save(root / folder / name)
        return name

    llava = [{"id": str(i), "image": image("images", f"{i}.png", i),
              "conversations": [{"from": "human", "value": "<image>\nWhat digit is this?"},
                                {"from": "gpt", "value": str(labels[i])}]} for i in picks]
    (root / "train.json").write_text(json.dumps(llava[:12]))
    (root / "val.json").write_text(json.dumps(llava[12:]))
    coco = {"images": [{"id": i, "file_name": image("train2017", f"{i:012d}.jpg", i)} for i in picks],
            "annotations": [{"image_id": i, "id": k, "caption": f"a handwritten digit {words[labels[i]]}"}
                            for k, i in enumerate(picks)]}
    (root / "captions_train2017.json").write_text(json.dumps(coco))
    questions = {"data_subtype": "train2014", "questions": []}
    annotations = {"annotations": []}
    for k, i in enumerate(picks):
        image("train2014", f"COCO_train2014_{i:012d}.jpg", i)
        questions["questions"].append({"image_id": int(i), "question": "What digit is this?", "question_id": k})
        annotations["annotations"].append({"question_id": k, "image_id": int(i),
                                           "multiple_choice_answer": str(labels[i]),
                                           "answers": [{"answer": str(labels[i]), "answer_id": a + 1} for a in range(10)]})
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "annotations.json").write_text(json.dumps(annotations))
    (root / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"Draw the digit {labels[i]}", "image": f"images/{i}.png"}) + "\n" for i in picks))
    ds = {"picture": [render_digit(scans[i], 64) for i in picks], "q": ["What digit is this?"] * len(picks),
          "a": [str(labels[i]) for i in picks]}
    feats = datasets.Features({"picture": datasets.Image(), "q": datasets.Value("string"), "a": datasets.Value("string")})
    full = datasets.Dataset.from_dict(ds, features=feats)
    datasets.DatasetDict({"train": full.select(range(12)), "validation": full.select(range(12, 16))}).save_to_disk(
        str(root / "my_dataset"))
    docci = [{"example_id": f"ex{i}", "split": "train" if k < 12 else "qual_dev", "image_file": f"{i}.png",
              "description": f"A handwritten {words[labels[i]]} in dark ink on white paper."} for k, i in enumerate(picks)]
    (root / "docci_descriptions.jsonlines").write_text("".join(json.dumps(d) + "\n" for d in docci))
    (root / "my_configs" / "recipe").mkdir(parents=True)
    (root / "my_configs" / "recipe" / "my_task.yaml").write_text(
        "# My captions: the digits with a higher learning rate.\ndefaults:\n  - override /data: digits\n"
        "task: captioning\noptim:\n  lr: 2.0e-3\n")
    (root / "questions.jsonl").write_text("".join(
        json.dumps({"prompt": "What digit is this?", "image": f"images/{i}.png"}) + "\n" for i in picks[:4]))
    (root / "interleaved.jsonl").write_text(json.dumps({"prompt": "Write the digit 3 in words and then draw it"}) + "\n")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Draw the digit {d}"}) + "\n" for d in (3, 7)))
    Image.open(root / "images" / f"{picks[0]}.png").verify()


def test_readme_commands_run_as_written(tmp_path, tiny_grouped):
    write_workspace(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    ran, skipped = [], []
    for command in readme_commands():
        why = skip_reason(command)
        if why:
            skipped.append((command, why))
            continue
        for part in command.split(" && "):  # one README line may chain two commands
            argv = shortened(to_argv(part))
            res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            expected_failure = "optim.lrr" in part  # README shows this typo's error message
            if expected_failure:
                assert res.returncode == 2 and "valid keys: betas, eps, grad_clip, lr" in res.stderr, part
            else:
                assert res.returncode == 0, f"{part}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
            ran.append(part)
    assert len(ran) >= 20 and all(why for _, why in skipped)
    # What README promises about the runs it shows.
    assert (tmp_path / "runs" / "vqa" / "adapter" / "chameleon_ft.json").exists()
    assert sorted(p.name for p in (tmp_path / "drawn").glob("*.png")) == ["00000.png", "00001.png"]
    assert sorted(p.name for p in (tmp_path / "drawn-sjd").glob("*.png")) == ["00000.png", "00001.png"]
    assert (tmp_path / "interleaved" / "outputs.md").exists()
    adapter_eval = json.loads((tmp_path / "runs" / "vqa" / "eval-val.json").read_text())["metrics"]
    merged_eval = json.loads((tmp_path / "merged-vqa-eval.json").read_text())["metrics"]
    assert merged_eval["acc"] == adapter_eval["acc"]  # the expanded merge keeps the adapter's image layout
    assert merged_eval["loss"] == pytest.approx(adapter_eval["loss"], rel=1e-4)
    answers = [json.loads(x) for x in (tmp_path / "answers" / "outputs.jsonl").read_text().splitlines()]
    assert len(answers) == 4
