"""coco-caption's tokenization step, with the real Stanford tokenizer when Java is available.

coco-caption scores captions only after ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer``: one run of
Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` over a file holding one caption a line
(the references in one call, the candidates in another), then the removal of its punctuation tokens.

Two backends give the same strings:

- ``"ptb-java"``: the jar that ships inside ``pycocoevalcap``, with coco-caption's flags, all documents of an
  evaluation in ONE JVM (``-ioFileList``), files in a private temporary folder;
- ``"ptb-python"``: :mod:`chameleon_ft.evaluation.ptb_tokenizer`, a Java-free emulation checked against the
  jar on ``tests/evaluation/data/ptb_corpus.json``.

``"auto"`` (the default) takes the value of the environment variable ``CHAMELEON_FT_CAPTION_TOKENIZER`` when
set, else ``"ptb-java"`` when ``java`` is on ``PATH``, else ``"ptb-python"``.

One deviation from coco-caption, where coco-caption itself breaks: it replaces only ``\\n`` inside a caption,
so a caption holding another line break (``\\r``, ``\\v``, ``\\f``, U+2028, U+2029) makes the jar emit an
extra line and shifts every later caption onto the wrong image. Here all of them become spaces.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from chameleon_ft.errors import ChameleonFTError

PTB_JAVA = "ptb-java"
PTB_PYTHON = "ptb-python"
TOKENIZER_ENV = "CHAMELEON_FT_CAPTION_TOKENIZER"
_CHOICES = ("auto", PTB_JAVA, PTB_PYTHON)
_JAVA_TIMEOUT_S = 1800
_LINE_BREAKS = re.compile("[\r\n\u000b\u000c\u2028\u2029]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class CaptionTokenizerError(ChameleonFTError, ValueError):
    """The caption tokenizer cannot run (unknown choice, Java or the jar missing, the JVM failed)."""


def _jar() -> Path:
    from pycocoevalcap.tokenizer import ptbtokenizer

    return Path(ptbtokenizer.__file__).resolve().parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR


def _punctuation() -> frozenset[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return frozenset(PUNCTUATIONS)


def resolve_caption_tokenizer(tokenizer: str = "auto") -> str:
    """The backend ``tokenizer`` stands for: ``"ptb-java"`` or ``"ptb-python"`` (see the module docstring).

    Raises :class:`CaptionTokenizerError` for an unknown name, or for ``"ptb-java"`` without ``java`` on
    ``PATH`` or without the jar inside the installed ``pycocoevalcap``.
    """
    choice = tokenizer
    if choice == "auto":
        choice = os.environ.get(TOKENIZER_ENV, "").strip() or "auto"
        where = f"environment variable {TOKENIZER_ENV}"
    else:
        where = "tokenizer argument"
    if choice not in _CHOICES:
        raise CaptionTokenizerError(f"{where}: unknown caption tokenizer {choice!r}; choose one of {_CHOICES}")
    java = shutil.which("java")
    if choice == "auto":
        return PTB_JAVA if java is not None and _jar().is_file() else PTB_PYTHON
    if choice == PTB_JAVA:
        if java is None:
            raise CaptionTokenizerError(f"{where} asks for {PTB_JAVA!r} but no `java` is on PATH; install a JRE "
                                        f"or use {PTB_PYTHON!r}")
        if not _jar().is_file():
            raise CaptionTokenizerError(f"{where} asks for {PTB_JAVA!r} but the Stanford jar is missing from the "
                                        f"installed pycocoevalcap: {_jar()}")
    return choice


def _clean(documents: Sequence[Sequence[str]]) -> list[list[str]]:
    out = []
    for d, captions in enumerate(documents):
        doc = []
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise CaptionTokenizerError(f"document {d}, caption {i}: expected a string, got {type(c).__name__}")
            if _LONE_SURROGATE.search(c):
                raise CaptionTokenizerError(f"document {d}, caption {i}: not valid Unicode text (lone surrogate): "
                                            f"{c[:60]!r}")
            doc.append(_LINE_BREAKS.sub(" ", c))
        out.append(doc)
    return out


def _coco_strings(lines: Sequence[str], punctuation: frozenset[str]) -> list[str]:
    # coco-caption's own post-processing: split on single spaces, drop its punctuation tokens.
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines]


def _python_lines(documents: list[list[str]]) -> list[list[str]]:
    from chameleon_ft.evaluation.ptb_tokenizer import ptb_tokenize_lines

    return [[" ".join(t) for t in ptb_tokenize_lines(doc)] if doc else [] for doc in documents]


def _java_lines(documents: list[list[str]]) -> list[list[str]]:
    """The jar's output lines (tokens joined by spaces) for each document, all in one JVM."""
    java, jar = shutil.which("java"), _jar()
    if java is None:
        raise CaptionTokenizerError(f"{PTB_JAVA!r}: no `java` on PATH")
    todo = [i for i, doc in enumerate(documents) if doc]
    results: list[list[str]] = [[] for _ in documents]
    if not todo:
        return results
    with tempfile.TemporaryDirectory(prefix="coco-ptb-") as tmp:
        work = Path(tmp)
        for i in todo:
            (work / f"doc{i}.txt").write_bytes("\n".join(documents[i]).encode("utf-8"))
        # One JVM for all documents; each is still tokenized as its own file, as coco-caption does per call.
        (work / "files.txt").write_text("".join(f"doc{i}.txt\tdoc{i}.tok\n" for i in todo), encoding="utf-8")
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               "-ioFileList", "files.txt"]
        try:
            proc = subprocess.run(cmd, cwd=work, capture_output=True, timeout=_JAVA_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise CaptionTokenizerError(f"{PTB_JAVA!r}: the Stanford tokenizer ran past {_JAVA_TIMEOUT_S} s") from e
        except OSError as e:
            raise CaptionTokenizerError(f"{PTB_JAVA!r}: cannot start {java}: {e}") from e
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        if proc.returncode != 0:
            raise CaptionTokenizerError(f"{PTB_JAVA!r}: the Stanford tokenizer ({java}) exited with "
                                        f"{proc.returncode}: {stderr[-2000:]}")
        for i in todo:
            out = work / f"doc{i}.tok"
            if not out.is_file():
                raise CaptionTokenizerError(f"{PTB_JAVA!r}: the Stanford tokenizer wrote no output for document "
                                            f"{i}: {stderr[-2000:]}")
            lines = out.read_bytes().decode("utf-8").split("\n")
            if len(lines) != len(documents[i]):
                raise CaptionTokenizerError(f"{PTB_JAVA!r}: document {i} has {len(documents[i])} captions but the "
                                            f"tokenizer returned {len(lines)} lines")
            results[i] = lines
    return results


def ptb_lines(documents: Sequence[Sequence[str]], tokenizer: str = "auto") -> list[list[str]]:
    """The Stanford tokenizer's own output for each document: one line per caption, lower-cased tokens
    joined by spaces, before coco-caption removes punctuation (``-lrb-``, ``u.s.``, ``.``, ...)."""
    backend = resolve_caption_tokenizer(tokenizer)
    docs = _clean(documents)
    return _java_lines(docs) if backend == PTB_JAVA else _python_lines(docs)


def coco_tokenize(documents: Sequence[Sequence[str]], tokenizer: str = "auto") -> list[list[str]]:
    """coco-caption's tokenized caption strings for each document.

    A document is what coco-caption hands to one ``PTBTokenizer.tokenize`` call, e.g. all references of an
    evaluation in order, or all candidates: the jar reads it as one file, and a caption's tokens can depend on
    its neighbours (``"... U.S."`` followed by a caption starting with ``"The"`` reads the period twice).
    ``tokenizer`` is ``"auto"``, ``"ptb-java"`` or ``"ptb-python"`` (:func:`resolve_caption_tokenizer`); with
    Java all documents go through a single JVM.
    """
    punct = _punctuation()
    return [_coco_strings(lines, punct) for lines in ptb_lines(documents, tokenizer)]
