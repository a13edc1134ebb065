"""coco-caption's tokenizer: the Java-free emulation against the real Stanford jar, and the Java runner."""

import json
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from chameleon_ft.evaluation import coco_tokenizer
from chameleon_ft.evaluation.coco_tokenizer import (
    PTB_JAVA,
    PTB_PYTHON,
    TOKENIZER_ENV,
    CaptionTokenizerError,
    coco_tokenize,
    ptb_lines,
    resolve_caption_tokenizer,
)
from chameleon_ft.evaluation.metrics import MetricInputError, caption_metrics

CORPUS = json.loads((Path(__file__).parent / "data" / "ptb_corpus.json").read_text(encoding="utf-8"))
CAPTIONS = CORPUS["captions"]
JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(JAVA is None, reason="no `java` on PATH: the real Stanford tokenizer cannot run "
                                                      "(the stored jar output is still checked)")


def _diff(captions, got, want):
    return [f"{c!r}\n  got  {g!r}\n  want {w!r}" for c, g, w in zip(captions, got, want) if g != w]


def test_corpus_is_large_and_varied():
    assert len(CAPTIONS) >= 200
    assert len(CORPUS["jar_ptb_lines"]) == len(CORPUS["jar_coco"]) == len(CAPTIONS)
    text = "".join(CAPTIONS)
    for needle in ("(", "[", "U.S.", "Mr.", "n't", "cannot", "gonna", "1,000", "3.5", "½", "-", "—", '"', "“",
                   "’", "é", "北", "😀", "\n", "\t", "  ", "http://", "@", ":)"):
        assert needle in text, needle


def test_python_tokenizer_equals_stored_jar_output_caption_by_caption():
    got = ptb_lines([CAPTIONS], tokenizer=PTB_PYTHON)[0]
    assert not _diff(CAPTIONS, got, CORPUS["jar_ptb_lines"]), "\n".join(_diff(CAPTIONS, got, CORPUS["jar_ptb_lines"]))
    coco = coco_tokenize([CAPTIONS], tokenizer=PTB_PYTHON)[0]
    assert coco == CORPUS["jar_coco"], "\n".join(_diff(CAPTIONS, coco, CORPUS["jar_coco"]))


def test_coco_specific_outputs():
    # Facts of coco-caption's tokenization, spelled out (they hold for both backends, see the corpus tests).
    got = coco_tokenize([["Mr. Smith (left) cannot go to the U.S. today, they're gonna stay!",
                          "A 5 7/8 inch pipe costs €5."]], tokenizer=PTB_PYTHON)[0]
    assert got[0] == "mr. smith -lrb- left -rrb- can not go to the u.s. today they 're gon na stay"
    assert got[1] == "a 5\u00a07/8 inch pipe costs $ 5"


def test_documents_are_tokenized_independently_like_separate_coco_calls():
    # Inside one file "U.S." before a line starting with "The" reads its period twice; across files it cannot.
    for backend in [PTB_PYTHON] + ([PTB_JAVA] if JAVA else []):
        assert ptb_lines([["in the U.S.", "The end"]], tokenizer=backend) == [["in the u.s. .", "the end"]]
        assert ptb_lines([["in the U.S."], ["The end"]], tokenizer=backend) == [["in the u.s."], ["the end"]]


@needs_java
def test_real_jar_output_equals_the_stored_output_and_the_python_tokenizer():
    jar = ptb_lines([CAPTIONS], tokenizer=PTB_JAVA)[0]
    assert not _diff(CAPTIONS, jar, CORPUS["jar_ptb_lines"]), "\n".join(_diff(CAPTIONS, jar, CORPUS["jar_ptb_lines"]))
    python = ptb_lines([CAPTIONS], tokenizer=PTB_PYTHON)[0]
    assert not _diff(CAPTIONS, python, jar), "\n".join(_diff(CAPTIONS, python, jar))
    assert coco_tokenize([CAPTIONS], tokenizer=PTB_JAVA)[0] == CORPUS["jar_coco"]


@needs_java
def test_equals_pycocoevalcaps_own_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    theirs = PTBTokenizer().tokenize({0: [{"caption": c} for c in CAPTIONS]})[0]
    assert theirs == CORPUS["jar_coco"], "\n".join(_diff(CAPTIONS, theirs, CORPUS["jar_coco"]))


@needs_java
def test_one_jvm_per_evaluation_and_no_temp_files_left(monkeypatch, tmp_path):
    calls = []
    real_run = subprocess.run

    def counting_run(cmd, *a, **kw):
        calls.append(cmd)
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(coco_tokenizer.subprocess, "run", counting_run)
    monkeypatch.setattr(coco_tokenizer.tempfile, "tempdir", str(tmp_path))
    preds = CAPTIONS[:60]
    refs = [[CAPTIONS[(i + k) % len(CAPTIONS)] for k in range(1, 4)] for i in range(60)]
    java = caption_metrics(preds, refs, tokenizer=PTB_JAVA)
    assert len(calls) == 1 and calls[0][0] == JAVA
    assert list(tmp_path.iterdir()) == []
    assert caption_metrics(preds, refs, tokenizer=PTB_PYTHON) == java


def _fake_java(tmp_path: Path, script: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text("#!/bin/sh\n" + script)
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_java_failure_is_a_clear_error_and_leaves_no_temp_files(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(_fake_java(tmp_path, "echo 'Error: could not find main class' >&2\nexit 3\n")))
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(coco_tokenizer.tempfile, "tempdir", str(work))
    with pytest.raises(CaptionTokenizerError, match=r"exited with 3: Error: could not find main class"):
        coco_tokenize([["a dog"]], tokenizer=PTB_JAVA)
    assert list(work.iterdir()) == []
    with pytest.raises(MetricInputError, match="caption_metrics: 'ptb-java': the Stanford tokenizer"):
        caption_metrics(["a dog"], [["a dog"]], tokenizer=PTB_JAVA)


def test_java_output_with_wrong_line_count_is_an_error(monkeypatch, tmp_path):
    # A "java" that writes a single line per document whatever it was given.
    script = 'while read -r src dst; do printf one > "$dst"; done < "$(eval echo \\${$#})"\n'
    monkeypatch.setenv("PATH", str(_fake_java(tmp_path, script)))
    with pytest.raises(CaptionTokenizerError, match="document 0 has 2 captions but the tokenizer returned 1 lines"):
        coco_tokenize([["a dog", "a cat"]], tokenizer=PTB_JAVA)


def test_backend_choice(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    assert resolve_caption_tokenizer() == (PTB_JAVA if JAVA else PTB_PYTHON)
    assert resolve_caption_tokenizer(PTB_PYTHON) == PTB_PYTHON
    monkeypatch.setenv(TOKENIZER_ENV, PTB_PYTHON)
    assert resolve_caption_tokenizer() == PTB_PYTHON          # the variable forces the Java-free path
    assert resolve_caption_tokenizer("auto") == PTB_PYTHON
    monkeypatch.setenv(TOKENIZER_ENV, "stanford")
    with pytest.raises(CaptionTokenizerError, match=f"environment variable {TOKENIZER_ENV}: unknown caption "
                                                    "tokenizer 'stanford'"):
        resolve_caption_tokenizer()
    monkeypatch.delenv(TOKENIZER_ENV)
    with pytest.raises(CaptionTokenizerError, match="unknown caption tokenizer 'nltk'"):
        resolve_caption_tokenizer("nltk")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))                     # no java anywhere
    assert resolve_caption_tokenizer() == PTB_PYTHON
    with pytest.raises(CaptionTokenizerError, match="no `java` is on PATH"):
        resolve_caption_tokenizer(PTB_JAVA)


def test_bad_captions(monkeypatch):
    with pytest.raises(CaptionTokenizerError, match=r"document 1, caption 0: not valid Unicode text"):
        coco_tokenize([["fine"], ["bad \ud800 text"]], tokenizer=PTB_PYTHON)
    with pytest.raises(CaptionTokenizerError, match="document 0, caption 1: expected a string, got int"):
        coco_tokenize([["fine", 3]], tokenizer=PTB_PYTHON)


def test_line_breaks_inside_a_caption_are_spaces():
    # coco-caption turns "\n" into a space; the other line breaks would make the jar emit extra lines (and
    # coco-caption shift every later caption), so they become spaces as well.
    for backend in [PTB_PYTHON] + ([PTB_JAVA] if JAVA else []):
        got = coco_tokenize([["a\ndog", "a\rdog", "a\u2028dog\u000b\u000cnow", "last"]], tokenizer=backend)
        assert got == [["a dog", "a dog", "a dog now", "last"]]


def test_environment_variable_reaches_caption_metrics(monkeypatch):
    monkeypatch.setenv(TOKENIZER_ENV, PTB_PYTHON)
    monkeypatch.setattr(coco_tokenizer, "_java_lines", lambda docs: pytest.fail("Java must not run"))
    assert caption_metrics(["a dog runs on grass"], [["a dog runs on grass"]])["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert os.environ[TOKENIZER_ENV] == PTB_PYTHON


@needs_java
def test_caption_metrics_equal_coco_caption_end_to_end():
    # What COCOEvalCap.evaluate does for BLEU and CIDEr: pycocoevalcap's PTBTokenizer on the references, then
    # on the candidates, then its scorers.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    n = 80
    preds = CAPTIONS[:n]
    refs = [[CAPTIONS[(i * 7 + k) % len(CAPTIONS)] for k in range(1, 1 + i % 4 + 1)] for i in range(n)]
    gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = PTBTokenizer().tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    want = {"bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3], "cider": Cider().compute_score(gts, res)[0]}
    assert caption_metrics(preds, refs, tokenizer=PTB_JAVA) == want
    assert caption_metrics(preds, refs, tokenizer=PTB_PYTHON) == want


# Pieces random captions are glued from: the constructs the tokenizer treats specially, in bulk.
_PIECES = (list("aAbBeEiInNoOsStTxXyYzZmMrRlLpP0123456789    ..,,;:!?'\"`-_/\\()[]{}<>@#$%&*+=~^|")
           + list("\u00a0\u2019\u2018\u201c\u201d\u00ab\u00bb\u2013\u2014\u2026\u00bd\u00e9\u00fc\u00df\u00ad\u20ac"
                  "\u00a3\u00a2\u00b0\u00b2\u2122\u00d7\u3000\u2009\t\x85\x91\x92\x93\x94\x96\x80")
           + ["&amp;", "&apos;", "&quot;", "&lt;", "&gt;", "&nbsp;", "U.S.", "Mr.", "etc.", "The ", "He ", "cannot",
              "gonna", "n't", "'s", "'re", "http://", "www.", ".com", ".pdf", ":)", "^_^", "(^_^)", "\u5317\u4eac",
              "\U0001F600", "a man ", "dog", " 3.5 ", "1,000", "e.g.", "o'clock", "x-ray", "<b>"])


@needs_java
def test_python_tokenizer_equals_the_jar_on_random_captions():
    rng = random.Random(20240611)
    captions = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    jar = ptb_lines([captions], tokenizer=PTB_JAVA)[0]
    python = ptb_lines([captions], tokenizer=PTB_PYTHON)[0]
    diffs = _diff(captions, python, jar)
    assert not diffs, f"{len(diffs)} of {len(captions)} differ:\n" + "\n".join(diffs[:20])
