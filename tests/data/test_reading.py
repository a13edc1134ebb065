import io
import json
from collections import Counter

import datasets
import pytest
from PIL import Image

from chameleon_ft.data.config import ColumnsConfig, DataConfig
from chameleon_ft.data.errors import BadSampleError, BadSamplePolicy, DataConfigError, DataFormatError
from chameleon_ft.data.images import open_image
from chameleon_ft.data.reading import read_conversations
from chameleon_ft.data.sample import Conversation
from chameleon_ft.data.splits import holdout_indices
from chameleon_ft.tasks.vqa import most_common_answer


def _img(path, color=(200, 30, 30), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _cfg(tmp_path, columns=None, **kw):
    return DataConfig(cache_dir=str(tmp_path / "hf_cache"), columns=ColumnsConfig(**(columns or {})), **kw)


def _read(cfg, split="train", policy=None):
    return [Conversation.from_record(r) for r in read_conversations(cfg, split, policy)]


def _layout(conv):
    """[(role, [("text", str) | ("image", basename)])] -- easy to compare."""
    import os

    out = []
    for t in conv.turns:
        segs = [("text", s.text) if s.text is not None else
                ("image", os.path.basename(s.image.path) if s.image.path else "<bytes>") for s in t.segments]
        out.append((t.role, segs))
    return out


LLAVA = [
    {"id": "a", "image": "x.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red box."}]},
    {"id": 2, "image": ["x.png", "sub/y.png"],
     "conversations": [{"from": "system", "value": "Be brief."},
                       {"from": "user", "value": "Compare <image> with"},
                       {"from": "assistant", "value": "ok"},
                       {"from": "human", "value": "<image> this one."},
                       {"from": "gpt", "value": "Same."}]},
    {"image": "x.png",  # LLaVA convention: one image, no placeholder -> start of the first user turn
     "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Red."}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},  # text only
]
LLAVA_LAYOUT = [
    [("user", [("image", "x.png"), ("text", "What is this?")]), ("assistant", [("text", "A red box.")])],
    [("system", [("text", "Be brief.")]), ("user", [("text", "Compare"), ("image", "x.png"), ("text", "with")]),
     ("assistant", [("text", "ok")]), ("user", [("image", "y.png"), ("text", "this one.")]),
     ("assistant", [("text", "Same.")])],
    [("user", [("image", "x.png"), ("text", "Describe.")]), ("assistant", [("text", "Red.")])],
    [("user", [("text", "Hi")]), ("assistant", [("text", "Hello")])],
]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava(tmp_path, fmt):
    _img(tmp_path / "imgs" / "x.png")
    _img(tmp_path / "imgs" / "sub" / "y.png")
    f = tmp_path / f"llava.{fmt}"
    f.write_text(json.dumps(LLAVA) if fmt == "json" else "\n".join(json.dumps(r) for r in LLAVA) + "\n\n")
    convs = _read(_cfg(tmp_path, format="llava", path=str(f), image_root=str(tmp_path / "imgs")))
    assert [_layout(c) for c in convs] == LLAVA_LAYOUT
    assert [c.index for c in convs] == [0, 1, 2, 3]
    assert all(c.source == str(f) and c.task == "chat" for c in convs)
    assert convs[0].meta == {"id": "a"} and convs[1].meta == {"id": 2}
    assert convs[1].images[1].path == str(tmp_path / "imgs" / "sub" / "y.png")


def test_llava_image_root_defaults_to_file_dir(tmp_path):
    _img(tmp_path / "x.png")
    f = tmp_path / "d.json"
    f.write_text(json.dumps(LLAVA[:1]))
    (conv,) = _read(_cfg(tmp_path, format="llava", path=str(f)))
    assert conv.images[0].path == str(tmp_path / "x.png")


def test_lumina(tmp_path):
    for n in ("a.png", "b.png", "c.png"):
        _img(tmp_path / n)
    recs = [
        {"conversations": [{"from": "human", "value": "Draw a red box."}, {"from": "gpt", "value": "<|image|>"}],
         "image": ["a.png"]},
        {"conversations": [{"from": "human", "value": "Edit <|image|> like <|image|>"},
                           {"from": "gpt", "value": "Here: <|image|> done"}],
         "image": ["a.png", "b.png", "c.png"]},
        # no markers: every image at the start of the first user turn
        {"conversations": [{"from": "human", "value": "Which differs?"}, {"from": "gpt", "value": "The second."}],
         "image": ["a.png", "b.png"]},
        {"conversations": [{"from": "human", "value": "<image> is plain text here"}, {"from": "gpt", "value": "ok"}]},
    ]
    f = tmp_path / "lumina.json"
    f.write_text(json.dumps(recs))
    convs = _read(_cfg(tmp_path, format="lumina", path=str(f)))
    assert [_layout(c) for c in convs] == [
        [("user", [("text", "Draw a red box.")]), ("assistant", [("image", "a.png")])],
        # Lumina-mGPT keeps the text next to a marker as written (its spaces are tokens there) ...
        [("user", [("text", "Edit "), ("image", "a.png"), ("text", " like "), ("image", "b.png")]),
         ("assistant", [("text", "Here: "), ("image", "c.png"), ("text", " done")])],
        # ... and puts unmarked images first, each followed by a space
        [("user", [("image", "a.png"), ("text", " "), ("image", "b.png"), ("text", " Which differs?")]),
         ("assistant", [("text", "The second.")])],
        [("user", [("text", "<image> is plain text here")]), ("assistant", [("text", "ok")])],
    ]


def test_coco_captions(tmp_path):
    _img(tmp_path / "train2014" / "COCO_1.jpg")
    _img(tmp_path / "train2014" / "COCO_2.jpg")
    ann = {"images": [{"id": 2, "file_name": "COCO_2.jpg"}, {"id": 1, "file_name": "COCO_1.jpg"}],
           "annotations": [{"image_id": 1, "id": 10, "caption": "A cat."},
                           {"image_id": 2, "id": 11, "caption": " A dog runs. "},
                           {"image_id": 1, "id": 12, "caption": "A cat sleeping."},
                           {"image_id": 2, "id": 13, "caption": "Dog on grass."},
                           {"image_id": 1, "id": 14, "caption": "Kitty."}]}
    f = tmp_path / "captions_train2014.json"
    f.write_text(json.dumps(ann))
    convs = _read(_cfg(tmp_path, format="coco_captions", path=str(f), image_root=str(tmp_path / "train2014"),
                       prompt_template="Caption:"))
    assert [c.index for c in convs] == [0, 1]
    assert [_layout(c) for c in convs] == [
        [("user", [("image", "COCO_2.jpg"), ("text", "Caption:")]), ("assistant", [("text", "A dog runs.")])],
        [("user", [("image", "COCO_1.jpg"), ("text", "Caption:")]), ("assistant", [("text", "A cat.")])],
    ]
    assert convs[1].meta["references"] == ["A cat.", "A cat sleeping.", "Kitty."]
    assert convs[0].meta["references"] == ["A dog runs.", "Dog on grass."]
    assert all(c.task == "captioning" for c in convs)


def test_most_common_answer_ties():
    assert most_common_answer(["2", "two", "2", "3"]) == "2"
    # tie between "yes" and "no": the one first in the list, unless multiple_choice_answer is among the tied
    assert most_common_answer(["no", "yes", "yes", "no"]) == "no"
    assert most_common_answer(["no", "yes", "yes", "no"], preferred="yes") == "yes"
    assert most_common_answer(["no", "yes", "yes", "no", "maybe"], preferred="maybe") == "no"


def _vqav2_files(tmp_path):
    _img(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    _img(tmp_path / "val2014" / "COCO_val2014_000000000007.jpg")
    q = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color is the box?", "question_id": 420},
        {"image_id": 7, "question": "Is it raining?", "question_id": 70}]}
    tie = ["no", "yes", "yes", "no", "no", "yes", "maybe", "yes", "no", "maybe"]  # yes 4, no 4
    a = {"annotations": [
        {"question_id": 70, "image_id": 7, "multiple_choice_answer": "yes", "answer_type": "yes/no",
         "question_type": "is it", "answers": [{"answer": x, "answer_id": i + 1} for i, x in enumerate(tie)]},
        {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red", "answer_type": "other",
         "question_type": "what color",
         "answers": [{"answer": x, "answer_id": i + 1}
                     for i, x in enumerate(["red"] * 3 + ["dark red"] * 4 + ["maroon"] * 3)]}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    return tie


def test_vqav2(tmp_path):
    tie = _vqav2_files(tmp_path)
    cfg = _cfg(tmp_path, format="vqav2", path=str(tmp_path / "q.json"), annotations_path=str(tmp_path / "a.json"),
               image_root=str(tmp_path / "val2014"), prompt_template="{question}")
    c0, c1 = _read(cfg)
    # most common answer, not multiple_choice_answer ("red" has 3 votes, "dark red" 4)
    assert _layout(c0) == [("user", [("image", "COCO_val2014_000000000042.jpg"), ("text", "What color is the box?")]),
                           ("assistant", [("text", "dark red")])]
    assert len(c0.meta["answers"]) == 10 and Counter(c0.meta["answers"]) == {"red": 3, "dark red": 4, "maroon": 3}
    assert c0.meta["question_id"] == "420" and c0.task == "vqa"
    # tie yes/no (4 each): multiple_choice_answer "yes" is among the tied
    assert c1.turns[1].text == "yes" and c1.meta["answers"] == tie
    # a custom file-name template
    (tmp_path / "flat").mkdir()
    _img(tmp_path / "flat" / "42.jpg")
    _img(tmp_path / "flat" / "7.jpg")
    cfg.image_template, cfg.image_root = "{image_id}.jpg", str(tmp_path / "flat")
    flat = [str(tmp_path / "flat" / "42.jpg"), str(tmp_path / "flat" / "7.jpg")]
    assert [c.images[0].path for c in _read(cfg)] == flat


def test_vqav2_needs_annotations(tmp_path):
    _vqav2_files(tmp_path)
    with pytest.raises(DataConfigError, match="annotations_path"):
        read_conversations(_cfg(tmp_path, format="vqav2", path=str(tmp_path / "q.json")), "train")


def test_jsonl_per_task(tmp_path):
    _img(tmp_path / "p.png")
    lines = [{"image": "p.png", "caption": "a red patch"},
             {"image": "p.png", "question": "What color?", "answer": "red"},
             {"image": "p.png", "question": "Shape?", "answers": ["box", "square", "box"]},
             {"prompt": "a red patch", "image": "p.png"}]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    convs = _read(_cfg(tmp_path, format="jsonl", path=str(f), image_size=64))
    assert [c.task for c in convs] == ["captioning", "vqa", "vqa", "text_to_image"]
    assert _layout(convs[0]) == [("user", [("image", "p.png"), ("text", "Describe the image briefly.")]),
                                 ("assistant", [("text", "a red patch")])]
    assert convs[0].meta["references"] == ["a red patch"]
    assert convs[1].turns[0].segments[1].text.startswith("What color?") and convs[1].turns[1].text == "red"
    assert convs[1].meta["answers"] == ["red"]
    assert convs[2].turns[1].text == "box" and convs[2].meta["answers"] == ["box", "square", "box"]
    assert _layout(convs[3]) == [
        ("user", [("text", "Generate an image of 64x64 according to the following prompt:\na red patch")]),
        ("assistant", [("image", "p.png")])]
    # an explicit task with renamed columns
    g = tmp_path / "caps.jsonl"
    g.write_text(json.dumps({"img": "p.png", "text": "red"}) + "\n")
    (c,) = _read(_cfg(tmp_path, format="jsonl", path=str(g), task="captioning",
                      columns={"image": "img", "caption": "text"}))
    assert c.task == "captioning" and c.turns[1].text == "red"


def test_jsonl_text_only_for_image_task(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"caption": "no image"}) + "\n")
    with pytest.raises(BadSampleError) as ei:
        read_conversations(_cfg(tmp_path, format="jsonl", path=str(f)), "train")
    assert ei.value.reason == "text_only" and ei.value.record == 0


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), color).save(buf, format="PNG")
    return buf.getvalue()


def test_hf_dataset_save_to_disk_with_in_memory_images(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    feats = datasets.Features({"picture": datasets.Image(), "q": datasets.Value("string"),
                               "a": datasets.Value("string")})
    train = datasets.Dataset.from_dict({"picture": [Image.new("RGB", (5, 5), c) for c in colors[:2]],
                                        "q": ["Color?", "Color?"], "a": ["red", "green"]}, features=feats)
    val = datasets.Dataset.from_dict({"picture": [Image.new("RGB", (5, 5), colors[2])], "q": ["Color?"],
                                      "a": ["blue"]}, features=feats)
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "ds"))
    cfg = _cfg(tmp_path, format="hf_dataset", path=str(tmp_path / "ds"), task="vqa",
               columns={"image": "picture", "question": "q", "answer": "a"})
    tr, va = _read(cfg, "train"), _read(cfg, "validation")
    assert [c.turns[1].text for c in tr] == ["red", "green"] and [c.turns[1].text for c in va] == ["blue"]
    for conv, color in zip(tr + va, colors, strict=True):
        ref = conv.images[0]
        assert ref.path is None
        assert open_image(ref.data).convert("RGB").getpixel((2, 2)) == color


def test_hf_dataset_parquet_paths_and_holdout(tmp_path):
    for i in range(10):
        _img(tmp_path / "im" / f"{i}.png", color=(i, 0, 0))
    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"file": [f"{i}.png" for i in range(10)],
                                "cap": [f"shade {i}" for i in range(10)]}).to_parquet(str(pq))
    cfg = _cfg(tmp_path, format="hf_dataset", path=str(pq), image_root=str(tmp_path / "im"), task="captioning",
               columns={"image": "file", "caption": "cap"}, val_fraction=0.2, seed=3)
    tr, va = _read(cfg, "train"), _read(cfg, "val")
    assert len(tr) == 8 and len(va) == 2
    assert sorted(c.index for c in tr + va) == list(range(10))
    assert [c.index for c in va] == holdout_indices(10, 0.2, 3)
    for c in tr + va:
        assert c.turns[1].text == f"shade {c.index}"
        assert c.images[0].path == str(tmp_path / "im" / f"{c.index}.png")
    with pytest.raises(DataConfigError, match="val_path"):
        read_conversations(_cfg(tmp_path, format="hf_dataset", path=str(pq), task="captioning",
                                columns={"image": "file", "caption": "cap"}), "val")


def test_hf_dataset_imagefolder(tmp_path):
    root = tmp_path / "folder"
    _img(root / "a.png", color=(1, 2, 3))
    _img(root / "b.png", color=(4, 5, 6))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "first"}) + "\n"
                                         + json.dumps({"file_name": "b.png", "text": "second"}) + "\n")
    convs = _read(_cfg(tmp_path, format="hf_dataset", path=str(root), task="captioning", columns={"caption": "text"}))
    got = {c.turns[1].text: c.images[0] for c in convs}
    assert set(got) == {"first", "second"}
    img = got["second"].open()
    assert img.convert("RGB").getpixel((0, 0)) == (4, 5, 6)


def test_holdout_is_deterministic_and_sized():
    a = holdout_indices(1000, 0.05, 0)
    assert a == holdout_indices(1000, 0.05, 0) and len(a) == 50 and a != holdout_indices(1000, 0.05, 1)
    assert holdout_indices(3, 0.01, 0) and len(holdout_indices(3, 0.01, 0)) == 1


def test_max_samples(tmp_path):
    _img(tmp_path / "x.png")
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"image": "x.png", "caption": f"c{i}"}) + "\n" for i in range(5)))
    convs = _read(_cfg(tmp_path, format="jsonl", path=str(f), max_samples=2))
    assert [c.turns[1].text for c in convs] == ["c0", "c1"]


# --- bad input: raise names file + record + reason; skip counts and reports ------------------------------
def _llava_line(image="x.png", value="<image>\nQ?", role="human"):
    rec = {"conversations": [{"from": role, "value": value}, {"from": "gpt", "value": "A."}]}
    if image is not None:
        rec["image"] = image
    return json.dumps(rec).encode()


BAD_CASES = {
    "missing_image": _llava_line(image="nope.png"),
    "placeholder_count": _llava_line(value="<image> and <image>"),
    "empty_conversation": b'{"image": "x.png", "conversations": []}',
    "unknown_role": _llava_line(role="robot"),
    "non_utf8": b'{"conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "A."}]}',
    "bad_json": b'{"conversations": [',
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_sample_raise(tmp_path, reason):
    _img(tmp_path / "x.png")
    f = tmp_path / "bad.jsonl"
    # good, good, bad, good: the bad one is record 2 (blank lines are not records)
    f.write_bytes(b"\n".join([_llava_line(), b"", _llava_line(), BAD_CASES[reason], _llava_line()]) + b"\n")
    with pytest.raises(BadSampleError) as ei:
        read_conversations(_cfg(tmp_path, format="llava", path=str(f)), "train")
    err = ei.value
    assert (err.file, err.record, err.reason) == (str(f), 2, reason)
    assert str(err).startswith(f"{f}: record 2: {reason}")


def test_bad_samples_skip_counted_and_reported(tmp_path):
    _img(tmp_path / "x.png")
    f = tmp_path / "bad.jsonl"
    lines = [_llava_line()]
    for reason in sorted(BAD_CASES):
        lines += [BAD_CASES[reason], _llava_line()]
    f.write_bytes(b"\n".join(lines) + b"\n")
    policy = BadSamplePolicy("skip")
    ds = read_conversations(_cfg(tmp_path, format="llava", path=str(f), on_bad_sample="skip"), "train", policy)
    assert list(ds["index"]) == [0, 2, 4, 6, 8, 10, 12]
    assert policy.counts == {r: 1 for r in BAD_CASES}
    rep = BadSamplePolicy.read_report(policy.write_report(tmp_path / "report.json"))
    assert rep["total_skipped"] == len(BAD_CASES)
    by_reason = {r: ex[0] for r, ex in rep["examples"].items()}
    assert {r: e["record"] for r, e in by_reason.items()} == {r: 2 * i + 1 for i, r in enumerate(sorted(BAD_CASES))}
    assert all(e["file"] == str(f) for e in by_reason.values())
    assert by_reason["placeholder_count"]["detail"] == "2 <image> markers but 1 images"
    assert "line" in by_reason["non_utf8"]["detail"]


def test_non_utf8_in_json_array(tmp_path):
    f = tmp_path / "bad.json"
    good = json.dumps(LLAVA[3]).encode()
    f.write_bytes(b"[" + good + b", " + BAD_CASES["non_utf8"] + b"]")
    with pytest.raises(BadSampleError) as ei:
        read_conversations(_cfg(tmp_path, format="llava", path=str(f)), "train")
    assert (ei.value.record, ei.value.reason) == (1, "non_utf8")


def test_file_level_errors(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        read_conversations(_cfg(tmp_path, format="llava", path=str(tmp_path / "none.json")), "train")
    f = tmp_path / "obj.json"
    f.write_text(json.dumps({"conversations": []}, indent=1))
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        read_conversations(_cfg(tmp_path, format="llava", path=str(f)), "train")
    with pytest.raises(DataConfigError, match="data.format"):
        read_conversations(_cfg(tmp_path, format="no_such_format", path=str(f)), "train")
    with pytest.raises(DataConfigError, match="val_path"):
        read_conversations(_cfg(tmp_path, format="llava", path=str(f)), "val")


def test_open_image(tmp_path):
    p = _img(tmp_path / "ok.png", size=(64, 64))
    assert open_image(str(p)).size == (64, 64)
    data = p.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSampleError) as ei:
        open_image(str(tmp_path / "cut.png"), "d.json", 5)
    assert (ei.value.file, ei.value.record, ei.value.reason) == ("d.json", 5, "bad_image")
    with pytest.raises(BadSampleError) as ei:
        open_image(b"not an image", "d.json", 6)
    assert ei.value.reason == "bad_image"
    with pytest.raises(BadSampleError) as ei:
        open_image(str(tmp_path / "gone.png"), "d.json", 7)
    assert ei.value.reason == "missing_image"


def test_hf_dataset_chat_with_image_list_and_content_parts(tmp_path):
    feats = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"),
                                   "content": datasets.List({"type": datasets.Value("string"),
                                                             "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image())})
    row = {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                     {"type": "text", "text": "and"},
                                                     {"type": "image", "text": None}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "two boxes"}]}],
           "images": [Image.new("RGB", (3, 3), (9, 9, 9)), Image.new("RGB", (3, 3), (99, 99, 99))]}
    datasets.Dataset.from_list([row], features=feats).save_to_disk(str(tmp_path / "chat"))
    (conv,) = _read(_cfg(tmp_path, format="hf_dataset", path=str(tmp_path / "chat"), task="chat",
                         columns={"conversations": "messages"}))
    assert _layout(conv) == [("user", [("image", "<bytes>"), ("text", "and"), ("image", "<bytes>")]),
                             ("assistant", [("text", "two boxes")])]
    assert [im.open().getpixel((1, 1)) for im in conv.images] == [(9, 9, 9), (99, 99, 99)]


def test_a_record_of_another_layout_names_its_keys_and_the_fix(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                              "images": []}]))
    with pytest.raises(BadSampleError) as ei:
        read_conversations(_cfg(tmp_path, format="llava", path=str(f)), "train")
    assert ei.value.reason == "missing_field"
    assert ei.value.detail == ("the record has keys ['images', 'messages']; expected 'conversations' "
                               "(set data.columns.conversations=messages)")
    (conv,) = _read(_cfg(tmp_path, format="llava", path=str(f), columns={"conversations": "messages"}))
    assert conv.turns[0].text == "Hi"
