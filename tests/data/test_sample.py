import io
import pickle

import datasets
import pytest
from PIL import Image

from chameleon_ft.data.errors import BadSampleError, BadSamplePolicy, DataConfigError
from chameleon_ft.data.sample import RECORD_FEATURES, Conversation, ImageRef, Segment, Turn, validate_conversation


def _png_bytes(color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def _conv():
    return Conversation(
        turns=[Turn("system", [Segment.of_text("be brief")]),
               Turn("user", [Segment.of_image(path="/imgs/a.png"), Segment.of_text("what?"),
                             Segment.of_image(data=_png_bytes())]),
               Turn("assistant", [Segment.of_text("a cat"), Segment.of_image(path="/imgs/b.png")])],
        task="chat", meta={"answers": ["a cat", "cat"], "id": 7}, source="data.json", index=3)


def test_record_roundtrip_through_arrow():
    conv = _conv()
    ds = datasets.Dataset.from_list([conv.to_record()], features=RECORD_FEATURES)
    back = Conversation.from_record(ds[0])
    assert back == conv
    assert back.turns[1].segments[2].image.data == _png_bytes()
    assert [im.path for im in back.images] == ["/imgs/a.png", None, "/imgs/b.png"]
    assert back.turns[1].text == "what?"


def test_exactly_one_of_each():
    with pytest.raises(ValueError):
        ImageRef()
    with pytest.raises(ValueError):
        ImageRef(path="a", data=b"x")
    with pytest.raises(ValueError):
        Segment(text="a", image=ImageRef(path="a"))
    with pytest.raises(ValueError):
        Segment()


@pytest.mark.parametrize("turns, reason", [
    ([], "empty_conversation"),
    ([Turn("human", [Segment.of_text("hi")]), Turn("assistant", [Segment.of_text("yo")])], "unknown_role"),
    ([Turn("user", [Segment.of_text("hi")])], "no_assistant_turn"),
    ([Turn("user", [Segment.of_text("  ")]), Turn("assistant", [Segment.of_text("yo")])], "empty_turn"),
])
def test_validate_conversation_errors(turns, reason):
    with pytest.raises(BadSampleError) as ei:
        validate_conversation(Conversation(turns), "f.json", 17)
    err = ei.value
    assert (err.file, err.record, err.reason) == ("f.json", 17, reason)
    assert str(err).startswith(f"f.json: record 17: {reason}: ")


def test_validate_accepts_good():
    conv = _conv()
    assert validate_conversation(conv) is conv


def test_error_pickles_with_fields():
    err = BadSampleError("x.jsonl", 4, "non_utf8", "line 5")
    back = pickle.loads(pickle.dumps(err))
    assert (back.file, back.record, back.reason, back.detail) == ("x.jsonl", 4, "non_utf8", "line 5")
    assert str(back) == "x.jsonl: record 4: non_utf8: line 5"


def test_policy_raise_and_skip(tmp_path):
    err = BadSampleError("a.json", 1, "missing_image", "gone.png does not exist")
    with pytest.raises(BadSampleError):
        BadSamplePolicy("raise").handle(err)
    pol = BadSamplePolicy("skip", max_examples=2)
    for i in range(5):
        pol.handle(BadSampleError("a.json", i, "missing_image", f"{i}.png"))
    pol.handle(BadSampleError("a.json", 9, "placeholder_count", "2 <image> markers but 1 images"))
    assert pol.total == 6 and pol.counts == {"missing_image": 5, "placeholder_count": 1}
    assert "skipped 6" in pol.summary() and "missing_image: 5" in pol.summary()
    rep = BadSamplePolicy.read_report(pol.write_report(tmp_path / "sub" / "bad.json"))
    assert rep["total_skipped"] == 6
    assert rep["counts"] == {"missing_image": 5, "placeholder_count": 1}
    assert [e["record"] for e in rep["examples"]["missing_image"]] == [0, 1]
    assert rep["examples"]["placeholder_count"][0]["detail"] == "2 <image> markers but 1 images"
    with pytest.raises(DataConfigError, match="on_bad_sample"):
        BadSamplePolicy("ignore")


def test_policy_logs_summary(caplog):
    pol = BadSamplePolicy("skip")
    pol.handle(BadSampleError("a.json", 3, "unknown_role", "turn 0 has role 'bot'"))
    with caplog.at_level("WARNING"):
        pol.log_summary("llava train")
    assert "llava train: skipped 1 bad sample(s) (unknown_role: 1)" in caplog.text
    assert "a.json: record 3: unknown_role" in caplog.text
