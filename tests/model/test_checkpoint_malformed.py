"""Malformed checkpoints give a CheckpointError (or VocabularyError) naming the file and the tensor.

Each bad file is built on disk byte by byte; the safetensors layout is 8 bytes of little-endian
header length, the JSON header, then the data area that ``data_offsets`` index.
"""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from chameleon_ft.model.checkpoint import (
    CheckpointError,
    check_stored_dtypes,
    iter_tensors,
    load_config,
    load_model,
    load_tokenizer,
    save_model,
    tensor_shapes,
    weight_files,
)
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from chameleon_ft.model.tokens import ChameleonTokens, VocabularyError
from tests.model.helpers import randomize_, small_config


def write_raw(path, header, data: bytes = b"") -> None:
    """A safetensors file from a header (dict, or raw bytes) and a data area."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def read_raw(path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def single(tmp_path, header, data: bytes = b""):
    """A checkpoint directory holding just ``model.safetensors``."""
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    write_raw(d / "model.safetensors", header, data)
    return d


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def read_everything(path):
    """What a loader does first: shapes from the headers, then every tensor."""
    tensor_shapes(path)
    return dict(iter_tensors(path))


# --- the header itself ------------------------------------------------------------------------------
def test_header_just_under_the_limit_that_is_not_utf8(tmp_path):
    n = 100_000_000 - 1
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", n) + b"\xff" * n)
    with pytest.raises(CheckpointError, match=r"ckpt/model\.safetensors: safetensors header: not UTF-8"):
        read_everything(d)


def test_header_not_json_or_not_an_object(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors: safetensors header: not valid JSON"):
        read_everything(single(tmp_path, b'{"w": {"dtype": "F32", '))
    with pytest.raises(CheckpointError, match="safetensors header: not a JSON object"):
        read_everything(single(tmp_path, b"[1, 2]"))
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_everything(single(tmp_path, b"[" * 100_000 + b"]" * 100_000))


def test_a_file_that_is_not_safetensors_does_not_leak_its_first_bytes(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    secret = b"root:x:0:0:root:/root:/bin/bash\n" * 4
    (d / "model.safetensors").write_bytes(secret)
    with pytest.raises(CheckpointError, match="not a safetensors file") as info:
        read_everything(d)
    assert str(struct.unpack("<Q", secret[:8])[0]) not in str(info.value)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 5000) + b"{}")
    with pytest.raises(CheckpointError, match="header length field exceeds the file's 10 bytes"):
        read_everything(d)


# --- one tensor's entry -----------------------------------------------------------------------------
def test_shape_larger_than_the_file_is_refused_before_allocating(tmp_path, monkeypatch):
    allocations = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k))
    huge = single(tmp_path, {"w": entry(shape=(2**40, 2**11), offsets=(0, 16))}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"tensor 'w': shape \[1099511627776, 2048\] of F32 needs "
                                              r"9007199254740992 bytes, but data_offsets \[0, 16\] hold 16"):
        read_everything(huge)
    past_end = single(tmp_path, {"w": entry(shape=(2**40, 2**11), offsets=(0, 2**53))}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"tensor 'w': data_offsets \[0, 9007199254740992\] run past the "
                                              r"16 bytes of data in the file: truncated"):
        read_everything(past_end)
    assert allocations == []


def test_negative_dims(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'w': shape \[-1, 2\] is not a list of "
                                              r"non-negative integers"):
        read_everything(single(tmp_path, {"w": entry(shape=(-1, 2))}, b"\0" * 8))
    with pytest.raises(CheckpointError, match="tensor 'w': shape"):
        read_everything(single(tmp_path, {"w": entry(shape=(2.0,))}, b"\0" * 8))


@pytest.mark.parametrize("key", ["shape", "dtype", "data_offsets"])
def test_missing_key(tmp_path, key):
    bad = entry()
    del bad[key]
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor 'w': header entry has no {key}"):
        read_everything(single(tmp_path, {"w": bad}, b"\0" * 8))


def test_unknown_dtype_and_malformed_offsets(tmp_path):
    with pytest.raises(CheckpointError, match=r"tensor 'w': unsupported dtype 'F33'"):
        read_everything(single(tmp_path, {"w": entry(dtype="F33")}, b"\0" * 8))
    with pytest.raises(CheckpointError, match=r"tensor 'w': data_offsets \[8, 0\] are out of order"):
        read_everything(single(tmp_path, {"w": entry(offsets=(8, 0))}, b"\0" * 8))
    with pytest.raises(CheckpointError, match=r"tensor 'w': data_offsets \[0\] is not a pair of integers"):
        read_everything(single(tmp_path, {"w": entry(offsets=(0,))}, b"\0" * 8))


def test_offsets_must_tile_the_data_area(tmp_path):
    data = bytes(range(16))
    overlap = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensors 'a' and 'b' overlap \(bytes 4\.\.8\)"):
        read_everything(single(tmp_path, overlap, data[:12]))
    gap = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}
    with pytest.raises(CheckpointError, match=r"bytes 8\.\.12 of the data, before tensor 'b', belong to no tensor"):
        read_everything(single(tmp_path, gap, data + b"\0" * 4))
    with pytest.raises(CheckpointError, match="the last 8 bytes of the file belong to no tensor"):
        read_everything(single(tmp_path, {"a": entry()}, data))
    outside = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(8, 16))}
    with pytest.raises(CheckpointError, match=r"tensor 'b': data_offsets \[8, 16\] run past the 12 bytes"):
        read_everything(single(tmp_path, outside, data[:12]))
    # the same tensors, well formed and listed out of order, read back exactly
    ok = {"b": entry(offsets=(8, 16)), "a": entry(offsets=(0, 8))}
    got = read_everything(single(tmp_path, ok, data))
    assert got["a"].view(torch.uint8).tolist() == list(range(8))
    assert got["b"].view(torch.uint8).tolist() == list(range(8, 16))


# --- index ------------------------------------------------------------------------------------------
def write_index(d, weight_map):
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("name", ["../outside/model.safetensors", "ABSOLUTE", "sub/model.safetensors", "..",
                                  "..\\outside\\model.safetensors", "C:model.safetensors"])
def test_index_cannot_point_outside_the_checkpoint(tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"w": torch.ones(2)}, str(outside / "model.safetensors"))
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(d / "sub" / "model.safetensors"))
    name = str(outside / "model.safetensors") if name == "ABSOLUTE" else name
    write_index(d, {"w": name})
    with pytest.raises(CheckpointError, match=r"index\.json: tensor 'w' maps to .*not a file name inside the "
                                              r"checkpoint directory"):
        read_everything(d)


def test_symlinked_shards_are_followed(tmp_path):
    # Hugging Face's cache: snapshot files are symlinks into a blob store next to the snapshot
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"w": torch.arange(3.0)}, str(blobs / "abc123"))
    d = tmp_path / "snapshot"
    d.mkdir()
    (d / "model-00001-of-00001.safetensors").symlink_to(blobs / "abc123")
    write_index(d, {"w": "model-00001-of-00001.safetensors"})
    assert torch.equal(read_everything(d)["w"], torch.arange(3.0))


def test_index_malformed_or_inconsistent_with_its_shards(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"w": torch.ones(2)}, str(d / "a.safetensors"))
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"w": "a.safe')
    with pytest.raises(CheckpointError, match=r"index\.json: not valid JSON, truncated or corrupt"):
        weight_files(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ["a.safetensors"]}')
    with pytest.raises(CheckpointError, match="has no 'weight_map' object"):
        weight_files(d)
    write_index(d, {"w": "a.safetensors", "v": "a.safetensors"})
    with pytest.raises(CheckpointError, match=r"a\.safetensors: the index maps tensor v to this shard, which does "
                                              r"not hold it"):
        tensor_shapes(d)
    with pytest.raises(CheckpointError, match="the index maps tensor v"):
        dict(iter_tensors(d, ["v"]))


# --- dtypes against the model -----------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    model = randomize_(ChameleonFTForCausalLM(small_config())).eval()
    return model, save_model(model, tmp_path / "m")


def rewrite(path, edit) -> None:
    """Rewrite a shard's header with ``edit(header)`` and the same data bytes."""
    header, data = read_raw(path)
    edit(header)
    write_raw(path, header, data)


def set_declared(out, value) -> None:
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = value
    (out / "config.json").write_text(json.dumps(cfg))


def test_integer_dtype_where_the_model_has_a_float_weight(saved):
    _, out = saved
    rewrite(out / "model.safetensors", lambda h: h["lm_head.weight"].update(dtype="I32"))  # same 4 bytes
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor lm_head\.weight is stored as I32, but "
                                              r"the model holds it as F32"):
        load_model(out)


def test_f16_bytes_in_a_bf16_checkpoint_are_refused(saved):
    model, out = saved
    model = model.to(torch.bfloat16)
    out = save_model(model, out)
    set_declared(out, "bfloat16")
    load_model(out)  # consistent: loads
    rewrite(out / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="F16"))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight is stored as F16, but .*config\.json "
                                              r"declares bfloat16"):
        load_model(out)


def test_a_differently_sized_float_than_declared_loads(saved):
    # F32 weights under a stale "bfloat16" declaration: a misread would change the byte count, so allowed
    model, out = saved
    set_declared(out, "bfloat16")
    loaded = load_model(out)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_check_stored_dtypes_integer_buffers_must_match(saved):
    _, out = saved
    with pytest.raises(CheckpointError, match="lm_head.weight is stored as F32, but the model holds it as I64"):
        check_stored_dtypes(out, {"lm_head.weight": torch.empty(0, dtype=torch.int64, device="meta")})


def test_saving_declares_the_dtype_written(saved):
    model, out = saved
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    model.config.dtype = torch.float32  # a stale declaration must not be copied
    out = save_model(model.to(torch.bfloat16), out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    out = save_model(model, out, dtype=torch.float16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert load_model(out).lm_head.weight.dtype == torch.float32


# --- config.json and tokenizer.json -----------------------------------------------------------------
def test_truncated_config_json(saved):
    _, out = saved
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=r"m/config\.json: not valid JSON, truncated or corrupt"):
        load_config(out)
    with pytest.raises(CheckpointError, match=r"m/config\.json: not valid JSON"):
        load_model(out)
    with pytest.raises(VocabularyError, match=r"m/config\.json: not valid JSON"):
        ChameleonTokens.from_checkpoint(out)
    (out / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config\.json: not a JSON object"):
        load_config(out)


def test_config_json_with_a_bad_vocabulary(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocabulary_map"]["<s>"] = "zero"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VocabularyError, match=r"config\.json: token ids must be non-negative integers; '<s>' has "
                                              r"'zero'"):
        load_config(out)
    cfg["vocabulary_map"]["<s>"] = 0
    cfg["vocabulary_map"]["IMGIMGxZ"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VocabularyError, match=r"config\.json: malformed image token name 'IMGIMGxZ'"):
        ChameleonTokens.from_checkpoint(out)


def test_config_json_transformers_cannot_read(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["vq_config"] = 5
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: not a valid Chameleon config"):
        load_config(out)


def test_truncated_tokenizer_json(saved):
    from chameleon_ft.tiny.build import build_tokenizer_json

    _, out = saved
    text = build_tokenizer_json(16)
    (out / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=r"m/tokenizer\.json: not a valid tokenizer file \(EOF while parsing"):
        load_tokenizer(out)
    (out / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(CheckpointError, match=r"m/tokenizer\.json: not a valid tokenizer file"):
        load_tokenizer(out)
