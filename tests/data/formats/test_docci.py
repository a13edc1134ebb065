"""DOCCI: one JSON-lines file holds every split; each record names its own."""

import json

import pytest
from PIL import Image

from chameleon_ft.config.store import compose
from chameleon_ft.data.config import DataConfig
from chameleon_ft.data.errors import BadSampleError, DataConfigError
from chameleon_ft.data.reading import read_conversations
from chameleon_ft.data.sample import Conversation


def write_docci(root):
    (root / "images").mkdir()
    recs = []
    for i, split in enumerate(["train", "train", "qual_dev", "test", "qual_test", "train"]):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / "images" / f"{split}_{i}.jpg")
        recs.append({"example_id": f"{split}_{i}", "split": split, "image_file": f"{split}_{i}.jpg",
                     "description": f"Picture {i}, a long description of the {split} image."})
    (root / "docci_descriptions.jsonlines").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root / "docci_descriptions.jsonlines"


def read(cfg, split):
    return [Conversation.from_record(r) for r in read_conversations(cfg, split)]


def test_splits_come_from_the_records_own_split_field(tmp_path):
    path = write_docci(tmp_path)
    cfg = DataConfig(format="docci", path=str(path), cache_dir=str(tmp_path / "hf"))
    train, val, test = read(cfg, "train"), read(cfg, "val"), read(cfg, "test")
    assert [c.index for c in train] == [0, 1, 5]  # line positions in the file
    assert [c.index for c in val] == [2] and [c.index for c in test] == [3]  # qual_dev; qual_test is unused
    conv = train[2]
    assert conv.task == "captioning" and conv.meta["id"] == "train_5"
    assert conv.turns[1].text == "Picture 5, a long description of the train image."
    assert conv.images[0].path == str(tmp_path / "images" / "train_5.jpg")  # images/ next to the file


def test_holdout_from_train_and_errors(tmp_path):
    path = write_docci(tmp_path)
    cfg = DataConfig(format="docci", path=str(path), val_fraction=0.4, cache_dir=str(tmp_path / "hf"))
    assert sorted(c.index for c in read(cfg, "train") + read(cfg, "val")) == [0, 1, 5]
    with pytest.raises(DataConfigError, match="docci"):
        read_conversations(DataConfig(format="docci"), "train")
    with pytest.raises(DataConfigError, match="only makes \\['captioning'\\]"):
        compose(["recipe=vqa", "data=docci", f"data.path={path}"])
    bad = tmp_path / "bad.jsonlines"
    bad.write_text(json.dumps({"example_id": "x", "split": "train", "image_file": "train_0.jpg"}) + "\n")
    with pytest.raises(BadSampleError, match="'description' is missing"):
        read_conversations(DataConfig(format="docci", path=str(bad), image_root=str(tmp_path / "images")), "train")
