"""Reading JSON and JSON-lines annotation files record by record, with per-record errors.

Files of the conversation and flat formats are parsed here rather than by ``load_dataset("json")``: real
files mix types between records (``image`` a string in one record and a list in the next, ``id`` int or
str), which Arrow's schema inference rejects for the whole file, and non-UTF-8 bytes must be reported
per record.
"""

from __future__ import annotations

import json
import os
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


def json_record_rows(path: str, stamp: str = ""):
    """Rows ``{"_row", "raw" (the record as JSON), "_error"}`` from a JSON array or JSON-lines file.

    ``stamp`` only takes part in the datasets cache fingerprint of a generator that calls this.
    """
    del stamp
    if is_json_array(path):
        text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            if not _utf8_clean(rec):
                yield {"_row": i, "raw": "", "_error": _bad(path, i, "non_utf8", "text contains bytes that are not UTF-8")}
            else:
                yield {"_row": i, "raw": json.dumps(rec, ensure_ascii=False), "_error": ""}
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
