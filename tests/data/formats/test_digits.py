import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from chameleon_ft.data.config import DataConfig
from chameleon_ft.data.formats import digits
from chameleon_ft.data.reading import read_conversations
from chameleon_ft.data.sample import Conversation

SKL = load_digits()  # the independent reference: scans and labels straight from scikit-learn


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_FT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def digits_records(task: str, split: str, image_size: int = 64, prompt_template: str | None = None) -> list[dict]:
    """The digits data of ``task`` read through the format registry, as canonical records."""
    cfg = DataConfig(format="digits", task=task, image_size=image_size, prompt_template=prompt_template)
    return list(read_conversations(cfg, split))


def test_splits_disjoint_cover_all_and_stratified():
    parts = {s: digits.split_indices(s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in parts.items()} == {"train": 1439, "val": 179, "test": 179}
    sets = {s: set(v) for s, v in parts.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(range(len(SKL.target))) and len(SKL.target) == 1797
    for s in ("val", "test"):
        per_class = Counter(SKL.target[parts[s]].tolist())
        assert set(per_class) == set(range(10)) and min(per_class.values()) >= 17
    assert digits.split_indices("validation") == parts["val"]  # alias, and deterministic


def test_vqa_answers_match_sklearn_labels():
    seen_types = Counter()
    for split in ("train", "val", "test"):
        recs = digits_records("vqa", split)
        per_image = len(digits.QUESTION_TYPES) if split == "train" else 1
        assert [r["index"] for r in recs] == [i for i in digits.split_indices(split) for _ in range(per_image)]
        for r in recs:
            conv = Conversation.from_record(r)
            label = int(SKL.target[conv.index])
            question, answer = conv.turns[0].segments[1].text.split("\n")[0], conv.turns[1].text
            expected = {"What digit is this?": str(label),
                        "Is this digit even?": "yes" if label in (0, 2, 4, 6, 8) else "no",
                        "Is this digit greater than five?": "yes" if label in (6, 7, 8, 9) else "no"}[question]
            assert answer == expected
            assert conv.meta["answers"] == [expected] * 10
            seen_types[(split, conv.meta["question_type"])] += 1
    val_types = [seen_types[("val", t)] for t in digits.QUESTION_TYPES]
    assert max(val_types) - min(val_types) <= 1 and sum(val_types) == 179
    assert all(seen_types[("train", t)] == 1439 for t in digits.QUESTION_TYPES)


def test_captioning_and_t2i():
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for r in digits_records("captioning", "val"):
        conv = Conversation.from_record(r)
        assert conv.turns[1].text == f"a handwritten digit {words[SKL.target[conv.index]]}"
        assert conv.turns[0].segments[0].image.path and conv.task == "captioning"
    recs = digits_records("text_to_image", "test", image_size=32, prompt_template="Draw: {prompt}")
    for r in recs:
        conv = Conversation.from_record(r)
        assert conv.turns[0].text == f"Draw: Draw the digit {SKL.target[conv.index]}"
        assert conv.turns[1].role == "assistant" and len(conv.turns[1].images) == 1
        assert conv.task == "text_to_image"
    default = Conversation.from_record(digits_records("text_to_image", "val", image_size=64)[0])
    assert default.turns[0].text.startswith("Generate an image of 64x64 according to the following prompt:\n")


def test_interleaved_answers_in_words_then_draws():
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    recs = digits_records("interleaved", "val")
    assert len(recs) == 179
    for r in recs:
        conv = Conversation.from_record(r)
        label = int(SKL.target[conv.index])
        assert conv.turns[0].text == f"Write the digit {label} in words and then draw it"
        answer = conv.turns[1]
        assert answer.role == "assistant" and [s.type for s in answer.segments] == ["text", "image"]
        assert answer.text == words[label] and conv.task == "interleaved"


def test_rendered_images_are_the_scans(_cache):
    idx = digits.split_indices("val")[0]
    at8 = np.asarray(Image.open(digits.digit_image_path(idx, size=8)))
    expected = np.rint(255 * (1 - SKL.images[idx] / 16)).astype(np.uint8)  # dark ink on white
    assert at8.shape == (8, 8, 3) and (at8 == expected[..., None]).all()
    img = Image.open(digits.digit_image_path(idx, size=64))
    assert img.size == (64, 64) and img.mode == "RGB"
    small = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
    assert np.corrcoef(small.ravel(), expected.ravel())[0, 1] > 0.9


def test_materialisation_idempotent_and_atomic(_cache):
    recs = digits_records("captioning", "val", image_size=16)
    paths = [Conversation.from_record(r).images[0].path for r in recs]
    assert all(os.path.isfile(p) for p in paths) and len(set(paths)) == 179
    folder = os.path.dirname(paths[0])
    assert str(_cache) in folder and not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    again = digits_records("captioning", "val", image_size=16)
    assert again == recs and [os.stat(p).st_mtime_ns for p in paths] == stamps


def test_read_conversations_digits(_cache):
    ds = read_conversations(DataConfig(format="digits", task="vqa", image_size=32, max_samples=5), "val")
    assert len(ds) == 5 and ds["index"] == digits.split_indices("val")[:5]
    assert all(t == "vqa" for t in ds["task"])
    Image.open(Conversation.from_record(ds[0]).images[0].path).verify()
