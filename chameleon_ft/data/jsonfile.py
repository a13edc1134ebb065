"""Reading JSON and JSON-lines annotation files record by record, with per-record errors.

Files of the conversation and flat formats are parsed here rather than by ``load_dataset("json")``: real
files mix types between records (``image`` a string in one record and a list in the next, ``id`` int or
str), which Arrow's schema inference rejects for the whole file, and non-UTF-8 bytes must be reported
per record. A JSON array is streamed (``ijson``), so a 10 GB LLaVA file is never held in memory.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import Any

from chameleon_ft.data.errors import BadSampleError, DataFormatError


def file_stamp(path: str) -> str:
    """``size-mtime_ns`` of ``path``; a missing file is a :class:`DataFormatError`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    return f"{st.st_size}-{st.st_mtime_ns}"


def _utf8_clean(obj: Any) -> bool:
    """True when every string in ``obj`` encodes to UTF-8 (lone surrogates mark undecodable bytes)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def is_json_array(path: str) -> bool:
    """Whether ``path`` is one JSON document (a list, or a pretty-printed object) rather than JSON lines:
    ``.jsonl``/``.ndjson`` are lines; otherwise a file is lines when its first line parses on its own."""
    if path.endswith((".jsonl", ".ndjson")):
        return False
    with open(path, "rb") as f:
        first = f.readline().removeprefix(b"\xef\xbb\xbf").strip()
        while not first:
            line = f.readline()
            if not line:
                return False
            first = line.strip()
    if first.startswith(b"["):
        return True
    try:
        json.loads(first.decode("utf-8", errors="replace"))
        return False
    except json.JSONDecodeError:
        return True


def _bad(file: str, index: int, reason: str, detail: str) -> str:
    return json.dumps(BadSampleError(file, index, reason, detail).to_dict())


# Stands in for each byte that is not UTF-8, so that the streaming parser can go on and the record holding
# it is reported: a Unicode noncharacter, reserved for such internal use and absent from real text.
NOT_UTF8 = "\ufdd0"
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_TOP_LEVEL_TYPES = {b"{": "an object", b'"': "a string", b"t": "a boolean", b"f": "a boolean", b"n": "null"}


class _Utf8Repaired:
    """A binary file whose bytes that are not UTF-8 read as :data:`NOT_UTF8` (valid UTF-8 for the parser);
    a leading byte-order mark is dropped."""

    def __init__(self, f):
        self.f, self.decoder, self.first = f, codecs.getincrementaldecoder("utf-8")("surrogateescape"), True
        self.repaired = False  # whether any byte was replaced so far

    def read(self, size: int = -1) -> bytes:
        raw = self.f.read(size)
        text = self.decoder.decode(raw, final=not raw)
        if self.first and text:
            text, self.first = text.removeprefix("\ufeff"), False
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            self.repaired = True
            return _ESCAPED_BYTE.sub(NOT_UTF8, text).encode("utf-8")


def _first_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        while not head:
            chunk = f.read(4096)
            if not chunk:
                return b""
            head = chunk.lstrip()
    return head[:1]


def _not_a_list(path: str) -> DataFormatError:
    """The error for a JSON document that is not a list of records (or is not valid JSON at all)."""
    import ijson

    with open(path, "rb") as f:
        try:
            for _ in ijson.basic_parse(_Utf8Repaired(f)):  # streamed: only checks the document
                pass
        except ijson.JSONError as e:
            return DataFormatError(f"{path}: not valid JSON: {_first_line(e)}")
    kind = _TOP_LEVEL_TYPES.get(_first_byte(path), "a number")
    return DataFormatError(f"{path}: expected a JSON list of records, got {kind}")


def _json_array_rows(path: str):
    import ijson

    if _first_byte(path) != b"[":
        raise _not_a_list(path)
    done = 0
    # The fast C parser stops at a \\u escape of a lone surrogate (not UTF-8 text); the pure-Python parser
    # reads it, and the record holding it is reported. Only such a file is read again, the slow way.
    for backend in (ijson, ijson.get_backend("python")):
        try:
            for row in _array_items(path, backend, skip=done):
                yield row
                done += 1
            return
        except UnicodeDecodeError:
            if backend is not ijson:
                raise DataFormatError(f"{path}: not UTF-8 after {done} record(s)") from None


def _array_items(path: str, backend, skip: int):
    """Rows of the records of a JSON array (the first ``skip`` left out), parsed by ijson ``backend``."""
    from ijson import JSONError

    with open(path, "rb") as f:
        stream = _Utf8Repaired(f)
        i = 0
        try:
            for rec in backend.items(stream, "item", use_float=True):
                if i >= skip:
                    raw = json.dumps(rec, ensure_ascii=False)
                    if (stream.repaired and NOT_UTF8 in raw) or not _encodes(raw):
                        yield {"_row": i, "raw": "", "_error": _bad(path, i, "non_utf8",
                                                                    "text contains bytes that are not UTF-8")}
                    else:
                        yield {"_row": i, "raw": raw, "_error": ""}
                i += 1
        except JSONError as e:
            raise DataFormatError(f"{path}: not valid JSON (after {i} record(s)): {_first_line(e)}") from None


def _first_line(err: Exception) -> str:
    """The parser's message without the excerpt of the file it draws below it."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def json_record_rows(path: str, stamp: str = ""):
    """Rows ``{"_row", "raw" (the record as JSON), "_error"}`` from a JSON array (streamed) or JSON-lines file.

    ``stamp`` only takes part in the datasets cache fingerprint of a generator that calls this.
    """
    del stamp
    if is_json_array(path):
        yield from _json_array_rows(path)
        return
    i = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            err = ""
            try:
                rec = json.loads(line.decode("utf-8"))
                if not _utf8_clean(rec):
                    err = _bad(path, i, "non_utf8", f"line {lineno}: a \\u escape is not valid UTF-8 text")
            except UnicodeDecodeError as e:
                err = _bad(path, i, "non_utf8", f"line {lineno}: byte {e.start} is not UTF-8")
            except json.JSONDecodeError as e:
                err = _bad(path, i, "bad_json", f"line {lineno}: {e.msg} (column {e.colno})")
            yield {"_row": i, "raw": "" if err else json.dumps(rec, ensure_ascii=False), "_error": err}
            i += 1


def load_json(path: str) -> Any:
    """A whole JSON file (COCO / VQAv2 annotation files); errors name the file."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8").lstrip("\ufeff"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON: {e}") from None


def record_from_row(row: dict, file: str) -> dict:
    """The JSON object of a :func:`json_record_rows` row; a non-object is a ``bad_record`` bad sample."""
    rec = json.loads(row["raw"])
    if not isinstance(rec, dict):
        raise BadSampleError(file, int(row["_row"]), "bad_record", f"record is a {type(rec).__name__}, not an object")
    return rec
