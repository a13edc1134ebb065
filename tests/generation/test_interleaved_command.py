"""``python -m chameleon_ft.generate mode=interleaved``: a briefly fine-tuned digits model answers with text and a
PNG of the requested size; the JSONL and the Markdown show the segments in order."""

import json

import pytest
from PIL import Image

from chameleon_ft.cli import main as run_command
from chameleon_ft.generate import GENERATE
from chameleon_ft.generation.command import interleaved_markdown
from tests.conftest import run_module

PROMPTS = ('{"prompt": "Write the digit 3 in words and then draw it"}\n'
           '{"prompt": "Write the digit 5 in words and then draw it", "width": 32, "height": 64}\n')
NO_DEPRECATIONS = {"PYTHONWARNINGS": "error::FutureWarning"}


def test_a_briefly_fine_tuned_model_answers_with_text_then_an_image(tmp_path, tiny_grouped):
    # 60 steps of 8 samples (about 2 CPU-minutes): enough to learn "word, then an image, then end-of-turn".
    res = run_module("chameleon_ft", ["recipe=interleaved", "hydra.run.dir=run", "trainer.max_steps=60",
                                      "trainer.val_check_interval=60", "checkpoint.every_n_steps=60",
                                      "data.batch_size=8", "optim.lr=3e-3", "eval.max_samples=8",
                                      "trainer.enable_progress_bar=false"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (tmp_path / "prompts.jsonl").write_text(PROMPTS)
    res = run_module("chameleon_ft.generate", ["mode=interleaved", "adapter=run/adapter", "input=prompts.jsonl",
                                               "output=interleaved", "width=64", "height=64"], cwd=tmp_path,
                     env=NO_DEPRECATIONS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "deprecated" not in res.stderr.lower(), res.stderr[-3000:]
    out = tmp_path / "interleaved"
    lines = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1]
    markdown = (out / "outputs.md").read_text()
    for line, size in zip(lines, [(64, 64), (32, 64)]):
        kinds = [s["type"] for s in line["segments"]]
        assert "text" in kinds and "image" in kinds, line
        assert kinds.index("text") < kinds.index("image")  # the answer opens with text, as trained
        text = next(s for s in line["segments"] if s["type"] == "text")["text"]
        assert text and text in markdown
        for seg in (s for s in line["segments"] if s["type"] == "image"):
            assert (seg["width"], seg["height"]) == size
            with Image.open(out / seg["file"]) as im:
                im.verify()  # a complete, valid PNG
            with Image.open(out / seg["file"]) as im:
                assert im.format == "PNG" and im.size == size and im.mode == "RGB"
            assert f"]({seg['file']})" in markdown
            assert markdown.index(text) < markdown.index(seg["file"])


def test_markdown_shows_segments_in_order_and_marks_unfinished_answers():
    lines = [{"index": 0, "prompt": "Name it and draw it", "finished": True,
              "segments": [{"type": "text", "text": "three"},
                           {"type": "image", "file": "00000_0.png", "width": 64, "height": 32},
                           {"type": "text", "text": "done"}]},
             {"index": 1, "prompt": "Again", "finished": False, "segments": [{"type": "text", "text": "tw"}]}]
    md = interleaved_markdown(lines, max_new_tokens=8)
    assert md.split("\n") == ["# Interleaved answers", "", "## 1. Name it and draw it", "", "three", "",
                              "![64x32 image](00000_0.png)", "", "done", "", "## 2. Again", "", "tw", "",
                              "*(unfinished: max_new_tokens=8 text tokens reached before end-of-turn)*", ""]


@pytest.mark.parametrize("args,message", [(["sampler=hf"], "sampler='hf': mode=interleaved takes one of"),
                                          (["mode=image", "sampler=hf", "compile=true"], "compile=true"),
                                          (["sampler=beam"], "sampler='beam'")])
def test_bad_sampler_settings_are_one_line_errors(tmp_path, capsys, args, message):
    (tmp_path / "p.jsonl").write_text(PROMPTS)
    with pytest.raises(SystemExit) as ei:
        run_command(GENERATE, ["mode=interleaved", f"input={tmp_path / 'p.jsonl'}", f"output={tmp_path}", *args])
    assert ei.value.code == 2
    assert message in capsys.readouterr().err
