"""Empty or all-bad splits: an all-bad shard is just empty; a split without usable samples stops with the
file, the split, how many records were read and the skip counts per reason; an empty file says so."""

import pytest

from chameleon_ft.data.config import DataConfig
from chameleon_ft.data.errors import BadSamplePolicy, EmptySplitError
from chameleon_ft.data.pipeline import tokenized_split
from chameleon_ft.data.reading import read_conversations
from tests.data.test_pipeline import vqa, write_images, write_jsonl

TOO_LONG = "Is it even? " * 30  # over max_length=80 once tokenized, with the image


def jsonl_cfg(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(**{"format": "jsonl", "path": path, "image_size": 64, "max_length": 80,
                         "on_bad_sample": "skip", "cache_dir": str(tmp_path / "cache"), **kw})


def test_split_whose_every_record_is_bad_names_file_split_count_and_reasons(tiny_grouped, tmp_path):
    write_images(tmp_path)
    path = write_jsonl(tmp_path / "train.jsonl", [vqa("gone.png"), vqa(None), vqa("gone_too.png")])
    want = (f"{path}: split 'train' has no usable samples: 3 record(s) read, all skipped as bad "
            "(counts per reason: missing_image: 2, text_only: 1)")
    with pytest.raises(EmptySplitError) as info:
        read_conversations(jsonl_cfg(tmp_path, path), "train")
    assert str(info.value) == want
    with pytest.raises(EmptySplitError) as info:
        tokenized_split(jsonl_cfg(tmp_path, path), tiny_grouped, "train", progress=False)
    assert str(info.value) == want


def test_an_all_bad_shard_is_an_empty_shard(tiny_grouped, tmp_path):
    write_images(tmp_path)
    records = [vqa("good.png", answer=str(i)) for i in range(4)] + [vqa("good.png", question=TOO_LONG)] * 4 + [
        vqa("gray.png", answer=str(i)) for i in range(2)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = jsonl_cfg(tmp_path, path, pretokenize_shard_size=4)
    ds = tokenized_split(cfg, tiny_grouped, "train", run_dir=tmp_path / "run", progress=False)
    assert ds["index"] == [0, 1, 2, 3, 8, 9]
    (root,) = [p for p in (tmp_path / "cache").iterdir() if (p / "DONE.json").exists()]
    shards = sorted(p.name for p in (root / "shards").iterdir())
    assert shards == ["00000", "00000.json", "00001.json", "00002", "00002.json"]  # shard 1: stats only
    assert BadSamplePolicy.read_report(tmp_path / "run" / "bad_samples_train.json")["counts"] == {"too_long": 4}
    # the same rows as one big shard
    whole = tokenized_split(jsonl_cfg(tmp_path / "b", path), tiny_grouped, "train", progress=False)
    assert ds.to_list() == whole.to_list()


def test_max_length_one_leaves_no_sample_and_says_why(tiny_grouped, tmp_path):
    write_images(tmp_path)
    path = write_jsonl(tmp_path / "train.jsonl", [vqa("good.png"), vqa("gray.png")])
    cfg = jsonl_cfg(tmp_path, path, max_length=1)
    with pytest.raises(EmptySplitError) as info:
        tokenized_split(cfg, tiny_grouped, "train", progress=False)
    msg = str(info.value)
    assert msg.startswith(f"{path}: split 'train' has no usable samples: 2 record(s) read, all skipped as bad "
                          "(counts per reason: too_long: 2); report: ")
    assert msg.endswith("bad_samples.json")
    with pytest.raises(EmptySplitError) as again:  # the same answer from the cache
        tokenized_split(cfg, tiny_grouped, "train", progress=False)
    assert str(again.value) == msg


@pytest.mark.parametrize("content", ["", "[]", "\n\n"])
def test_an_empty_validation_file_says_so(tiny_grouped, tmp_path, content):
    write_images(tmp_path)
    train = write_jsonl(tmp_path / "train.jsonl", [vqa("good.png")])
    val = tmp_path / "val.json"
    val.write_text(content)
    cfg = jsonl_cfg(tmp_path, train, val_path=str(val), on_bad_sample="raise")
    with pytest.raises(EmptySplitError, match=f"^{val}: split 'val' is empty: the file has no records$"):
        tokenized_split(cfg, tiny_grouped, "val", progress=False)
