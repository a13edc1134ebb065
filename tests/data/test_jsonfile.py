"""JSON arrays are streamed record by record: bounded memory, the same records as ``json.loads``, and the
same per-record errors as JSON lines."""

import json
import subprocess
import sys

import pytest

from chameleon_ft.data.errors import DataFormatError
from chameleon_ft.data.jsonfile import json_record_rows
from tests.conftest import REPO


def rows(path):
    return list(json_record_rows(str(path)))


def write_llava_array(path, n: int) -> int:
    """A pretty-printed LLaVA-style JSON array of ``n`` records; returns its size in bytes."""
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            rec = {"id": f"{i:09d}", "image": f"coco/train2017/{i:012d}.jpg", "score": i / 7,
                   "conversations": [{"from": "human", "value": "<image>\nWhat is happening in this picture? " * 3},
                                     {"from": "gpt", "value": "A person rides a bicycle down a busy street. " * 8}]}
            f.write(("," if i else "") + json.dumps(rec, indent=1) + "\n")
        f.write("]\n")
    return path.stat().st_size


MEASURE = """
import resource, sys
from chameleon_ft.data.jsonfile import json_record_rows
import ijson
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(1 for _ in json_record_rows(sys.argv[1]))
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_large_array_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "llava.json"
    size = write_llava_array(path, 90_000)
    assert size > 55 * 2**20
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO)}, timeout=300).stdout.split()
    n, grown_kib = int(out[0]), int(out[1])
    assert n == 90_000
    # Reading the whole text and parsing it at once grows by about 3x the file; streaming by a few MiB.
    assert grown_kib * 1024 < size / 20, (grown_kib, size)


def test_streamed_records_equal_json_loads(tmp_path):
    path = tmp_path / "small.json"
    write_llava_array(path, 50)
    want = json.loads(path.read_text())
    got = rows(path)
    assert [r["_row"] for r in got] == list(range(50)) and not any(r["_error"] for r in got)
    assert [json.loads(r["raw"]) for r in got] == want  # floats stay floats, order and nesting kept


def test_bytes_that_are_not_utf8_fail_only_their_record(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_bytes(b'\xef\xbb\xbf[{"a": "ok"}, {"b": "caf\xe9"}, {"c": "\\udce9 lone escape"}, {"d": "\\ud83d\\ude00"},'
                     b' {"e\xff": 1}, 7]')
    got = rows(path)
    errors = {r["_row"]: json.loads(r["_error"])["reason"] for r in got if r["_error"]}
    assert errors == {1: "non_utf8", 2: "non_utf8", 4: "non_utf8"}
    assert {r["_row"]: json.loads(r["raw"]) for r in got if not r["_error"]} == {0: {"a": "ok"}, 3: {"d": "\U0001f600"},
                                                                                 5: 7}
    assert all(json.loads(r["_error"])["file"] == str(path) for r in got if r["_error"])


@pytest.mark.parametrize(("content", "message"), [
    (b'[{"a": 1}, {"b": }]', r"not valid JSON \(after 1 record\(s\)\): parse error: "),
    (b'[{"a": 1}] trailing', r"not valid JSON \(after 1 record\(s\)\): parse error: trailing garbage$"),
    (b'{\n "conversations": []\n}', r"expected a JSON list of records, got an object$"),
    (b'{\n "conversations": [', r"not valid JSON: parse error: premature EOF$"),
])
def test_file_level_errors_name_the_file_in_one_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=f"^{path}: {message}") as info:
        rows(path)
    assert "\n" not in str(info.value)
