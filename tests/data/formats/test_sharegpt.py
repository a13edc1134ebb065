"""LLaMA-Factory's ShareGPT files (``data=sharegpt``) and its ``dataset_info.json``.

The files here are written in LLaMA-Factory's documented layouts (its data/README.md: ShareGPT with
from/value, the OpenAI-style messages with role/content of its mllm_demo.json, and dataset_info.json entries);
the reference for what they must become is the same conversation in LLaVA format, read by our llava format.
"""

import json
import os
from collections import Counter

import pytest
from PIL import Image

from chameleon_ft.data.config import ColumnsConfig, DataConfig, ShareGPTTagsConfig
from chameleon_ft.data.errors import BadSampleError, BadSamplePolicy, DataConfigError
from chameleon_ft.data.formats import get_format
from chameleon_ft.data.reading import read_conversations
from chameleon_ft.data.sample import Conversation


def _img(path, color=(20, 120, 220)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _read(cfg, policy=None) -> list[Conversation]:
    return [Conversation.from_record(r) for r in read_conversations(cfg, "train", policy)]


def _cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(format="sharegpt", cache_dir=str(tmp_path / "hf_cache"), **kw)


def _same(a: list[Conversation], b: list[Conversation]) -> None:
    """Same turns, images and meta; the source file differs."""
    assert [c.turns for c in a] == [c.turns for c in b]
    assert [c.meta for c in a] == [c.meta for c in b]


# Our own records in the layout of LLaMA-Factory's mllm_demo.json: messages with role/content, images.
OPENAI_STYLE = [
    {"messages": [{"role": "user", "content": "<image>Which shape is drawn?"},
                  {"role": "assistant", "content": "A blue square."},
                  {"role": "user", "content": "And its colour?"},
                  {"role": "assistant", "content": "Blue."}],
     "images": ["pics/square.png"]},
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Compare <image> and <image>."},
                  {"role": "assistant", "content": "Different."}],
     "images": ["pics/square.png", "pics/red.png"]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
]
# The same conversations as LLaVA records: the reference.
LLAVA_EQUIVALENT = [
    {"conversations": [{"from": "human", "value": "<image>Which shape is drawn?"},
                       {"from": "gpt", "value": "A blue square."},
                       {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Blue."}],
     "image": "pics/square.png"},
    {"conversations": [{"from": "system", "value": "Answer in one word."},
                       {"from": "human", "value": "Compare <image> and <image>."},
                       {"from": "gpt", "value": "Different."}],
     "image": ["pics/square.png", "pics/red.png"]},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
]


@pytest.fixture
def images(tmp_path):
    _img(tmp_path / "pics" / "square.png")
    _img(tmp_path / "pics" / "red.png", (220, 20, 20))
    return tmp_path


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2))
    return path


def _reference(tmp_path, records=LLAVA_EQUIVALENT) -> list[Conversation]:
    f = _write(tmp_path / "reference" / "llava.json", records)
    return _read(DataConfig(format="llava", path=str(f), image_root=str(tmp_path), cache_dir=str(tmp_path / "hf")))


def test_llama_factory_mllm_demo_layout_loads_with_one_option(images):
    f = _write(images / "mllm.json", OPENAI_STYLE)
    convs = _read(_cfg(images, path=str(f)))
    _same(convs, _reference(images))
    assert [len(c.images) for c in convs] == [1, 2, 0]
    assert convs[1].images[1].path == str(images / "pics" / "red.png")  # relative to the file's directory
    assert [t.role for t in convs[1].turns] == ["system", "user", "assistant"]


def test_classic_sharegpt_from_value_and_the_conversations_column(images):
    classic = [{"conversations": [{"from": "human" if m["role"] == "user" else "gpt" if m["role"] == "assistant"
                                   else m["role"], "value": m["content"]} for m in r["messages"]],
                **({"images": r["images"]} if "images" in r else {})} for r in OPENAI_STYLE]
    f = _write(images / "classic.jsonl", [])
    f.write_text("".join(json.dumps(r) + "\n" for r in classic))
    _same(_read(_cfg(images, path=str(f))), _reference(images))


def test_the_data_group_option_composes(images):
    from chameleon_ft.config.store import compose

    f = _write(images / "mllm.json", OPENAI_STYLE)
    cfg = compose(["recipe=debug", "data=sharegpt", f"data.path={f}"])
    assert cfg.data.format == "sharegpt" and cfg.data.path == str(f)
    _same(_read(_cfg(images, path=cfg.data.path)), _reference(images))


def test_image_markers_must_match_the_images(images):
    # LLaMA-Factory requires one <image> per image; LLaVA's "one image, no marker" convention does not apply.
    recs = [{"messages": [{"role": "user", "content": "No marker."}, {"role": "assistant", "content": "ok"}],
             "images": ["pics/square.png"]}]
    f = _write(images / "bad.json", recs)
    with pytest.raises(BadSampleError, match="record 0: placeholder_count"):
        _read(_cfg(images, path=str(f)))


BAD = [
    ("turn_order", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"}]),  # ends with the user
    ("turn_order", [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]),
    ("turn_order", [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"},
                    {"role": "assistant", "content": "Hello"}]),
    ("unknown_role", [{"role": "user", "content": "Weather?"}, {"role": "function_call", "content": "{}"},
                      {"role": "observation", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]),
    ("unknown_role", [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "upon"}]),
    ("missing_field", [{"speaker": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
    ("empty_conversation", [{"role": "system", "content": "Be brief."}]),
]


def test_records_llama_factory_rejects_are_bad_samples_named_and_counted(images):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    f = _write(images / "mixed.json", [good] + [{"messages": m} for _, m in BAD] + [{"text": "no messages"}])
    with pytest.raises(BadSampleError) as err:
        _read(_cfg(images, path=str(f)))
    assert (err.value.file, err.value.record, err.value.reason) == (str(f), 1, "turn_order")
    policy = BadSamplePolicy("skip")
    convs = _read(_cfg(images, path=str(f), on_bad_sample="skip"), policy)
    assert [c.index for c in convs] == [0]
    expected = Counter(reason for reason, _ in BAD) + Counter(["missing_field"])
    assert policy.counts == expected
    tool = next(e for e in policy.examples["unknown_role"] if e["record"] == 4)
    assert "tool turn ('function_call')" in tool["detail"]


# --- dataset_info.json -----------------------------------------------------------------------------------------
def _dataset_info(root, entries):
    return _write(root / "dataset_info.json", entries)


def test_dataset_info_entry_gives_the_file_columns_and_tags(images):
    # Own column and role names, declared the LLaMA-Factory way; the file sits in a sub-folder and its images
    # resolve against the dataset_info.json directory (LLaMA-Factory's media_dir).
    renamed = [{"dialog": [{"speaker": {"user": "customer", "assistant": "agent", "system": "rules"}[m["role"]],
                            "text": m["content"]} for m in r["messages"]],
                **({"pics": r["images"]} if "images" in r else {})} for r in OPENAI_STYLE]
    _write(images / "sets" / "demo.json", renamed)
    info = _dataset_info(images, {
        "other": {"hf_hub_url": "someone/else"},
        "demo": {"file_name": "sets/demo.json", "formatting": "sharegpt",
                 "columns": {"messages": "dialog", "images": "pics"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                          "assistant_tag": "agent", "system_tag": "rules"}}})
    cfg = _cfg(images, dataset_info=str(info), dataset_name="demo")
    convs = _read(cfg)
    _same(convs, _reference(images))
    assert convs[0].images[0].path == str(images / "pics" / "square.png")
    inputs = get_format("sharegpt").split_inputs(cfg, "train")
    assert inputs.files == {"path": str(images / "sets" / "demo.json"), "dataset_info": str(info)}  # cache stamps both


def test_dataset_info_system_column_and_command_line_precedence(images):
    recs = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
             "sys": "Answer in one word."}]
    _write(images / "sys.json", recs)
    info = _dataset_info(images, {"s": {"file_name": "sys.json", "formatting": "sharegpt",
                                        "columns": {"messages": "conversations", "system": "sys"}}})
    (conv,) = _read(_cfg(images, dataset_info=str(info), dataset_name="s"))
    assert [(t.role, t.text) for t in conv.turns] == [("system", "Answer in one word."), ("user", "Hi"),
                                                       ("assistant", "Hello")]
    # data.tags set on the command line beat the entry's (LLaMA-Factory defaults for the rest: from/value).
    renamed = [{"conversations": [{"from": "client", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    _write(images / "sys.json", renamed)
    (conv,) = _read(_cfg(images, dataset_info=str(info), dataset_name="s", tags=ShareGPTTagsConfig(user_tag="client")))
    assert [(t.role, t.text) for t in conv.turns] == [("user", "Hi"), ("assistant", "Hello")]
    # ... and explicit tags are LLaMA-Factory's strict rule: "human" is no longer a user
    _write(images / "sys.json", recs)
    with pytest.raises(BadSampleError, match="unknown_role"):
        _read(_cfg(images, dataset_info=str(info), dataset_name="s", tags=ShareGPTTagsConfig(user_tag="client")))


def test_column_mapping_on_the_command_line(images):
    recs = [{"chat": r["messages"], "pictures": r.get("images", [])} for r in OPENAI_STYLE]
    f = _write(images / "mapped.json", recs)
    convs = _read(_cfg(images, path=str(f), columns=ColumnsConfig(conversations="chat", images="pictures")))
    _same(convs, _reference(images))


@pytest.mark.parametrize("entry, message", [
    ({"file_name": "x.json"}, "formatting 'alpaca' is not supported"),
    ({"hf_hub_url": "someone/set", "formatting": "sharegpt"}, "'hf_hub_url' is not supported"),
    ({"file_name": "x.json", "formatting": "sharegpt", "columns": {"messages": "m", "tools": "t"}},
     "column 'tools' is not supported"),
    ({"file_name": "x.json", "formatting": "sharegpt", "ranking": True}, "ranking"),
    ({"file_name": "x.json", "formatting": "sharegpt", "num_samples": 10}, "'num_samples' is not supported"),
    ({"file_name": "x.json", "formatting": "sharegpt", "tags": {"user": "u"}}, "unknown tag 'user'"),
])
def test_dataset_info_entries_it_cannot_honour_are_refused(tmp_path, entry, message):
    info = _dataset_info(tmp_path, {"d": entry})
    with pytest.raises(DataConfigError, match=message) as err:
        read_conversations(_cfg(tmp_path, dataset_info=str(info), dataset_name="d"), "train")
    assert str(info) in str(err.value) and "'d'" in str(err.value)


def test_dataset_info_config_errors(tmp_path):
    info = _dataset_info(tmp_path, {"a": {"file_name": "a.json", "formatting": "sharegpt"}, "b": {}})
    with pytest.raises(DataConfigError, match="no entry 'c'; entries: a, b"):
        read_conversations(_cfg(tmp_path, dataset_info=str(info), dataset_name="c"), "train")
    with pytest.raises(DataConfigError, match="go together"):
        read_conversations(_cfg(tmp_path, dataset_info=str(info)), "train")
    with pytest.raises(DataConfigError, match="data.dataset_info is read by data.format=sharegpt only"):
        read_conversations(DataConfig(format="llava", path="x.json", dataset_info=str(info), dataset_name="a"),
                           "train")
    with pytest.raises(DataConfigError, match="data.tags.user_tag is read by data.format=sharegpt only"):
        read_conversations(DataConfig(format="llava", path="x.json", tags=ShareGPTTagsConfig(user_tag="u")), "train")
    with pytest.raises(DataConfigError, match="set data.path, or data.dataset_info"):
        read_conversations(_cfg(tmp_path), "train")


def test_typed_keys_on_the_command_line(tmp_path):
    from chameleon_ft.config.store import ConfigKeyError, compose

    info = _dataset_info(tmp_path, {"d": {"file_name": "d.json", "formatting": "sharegpt"}})
    cfg = compose(["recipe=debug", "data=sharegpt", f"data.dataset_info={info}", "data.dataset_name=d",
                   "data.tags.role_tag=speaker", "data.columns.system=sys"])
    assert (cfg.data.dataset_name, cfg.data.tags.role_tag, cfg.data.columns.system) == ("d", "speaker", "sys")
    with pytest.raises(ConfigKeyError, match="valid keys: .*role_tag"):
        compose(["recipe=debug", "data=sharegpt", "data.tags.rol_tag=speaker"])
    assert os.path.isfile(info)
