import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from chameleon_ft.model.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    iter_tensors,
    load_model,
    save_model,
    save_state_dict,
    tensor_shapes,
)
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from chameleon_ft.model.qk_norm import QKNormLayoutError
from tests.model.helpers import randomize_, small_config


@pytest.fixture()
def model():
    return randomize_(ChameleonFTForCausalLM(small_config())).eval()


def read_all(path):
    return dict(iter_tensors(path))


def test_save_load_both_layouts_same_logits(tmp_path, model):
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    ref = model(ids).logits
    for layout, rows in (("grouped", 2), ("expanded", 4)):
        out = save_model(model, tmp_path / layout, layout=layout, max_shard_bytes=20_000)
        assert (out / "model.safetensors.index.json").exists()
        shapes = tensor_shapes(out)
        assert shapes["model.layers.0.self_attn.q_norm.weight"] == (rows, 16)
        loaded = load_model(out)
        assert loaded.checkpoint_layout == layout
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)


def test_round_trip_expanded_grouped_expanded_is_bit_exact(tmp_path, model):
    e1 = save_model(model.to(torch.bfloat16), tmp_path / "e1", layout="expanded")
    g = convert_checkpoint(e1, tmp_path / "g", "grouped")
    e2 = convert_checkpoint(g, tmp_path / "e2", "expanded")
    a, b = read_all(e1), read_all(e2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
    assert json.loads((g / "config.json").read_text())["qk_norm_layout"] == "grouped"


def test_inconsistent_groups_refused_at_load(tmp_path, model):
    out = save_model(model, tmp_path / "e", layout="expanded")
    f = out / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.self_attn.q_norm.weight"][1, 3] += 0.5
    save_file(tensors, str(f))
    with pytest.raises(QKNormLayoutError, match=r"layers\.1\.self_attn\.q_norm\.weight.*largest difference 0\.5"):
        load_model(out)


def test_missing_and_unexpected_tensors_named(tmp_path, model):
    out = save_model(model, tmp_path / "m")
    f = out / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model\.layers\.0\.mlp\.up_proj\.weight'\].*extra"):
        load_model(out)


def test_wrong_qk_shape_and_missing_dir(tmp_path, model):
    out = save_model(model, tmp_path / "w")
    f = out / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.k_norm.weight"] = torch.ones(3, 16)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="fits neither layout"):
        load_model(out)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")


def test_truncated_shard_is_reported(tmp_path, model):
    out = save_model(model, tmp_path / "t")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(out)


def test_streaming_reader_matches_safetensors(tmp_path):
    t = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.arange(5), "c": torch.tensor(2.0)}
    save_file(t, str(tmp_path / "model.safetensors"))
    got = read_all(tmp_path)
    for k in t:
        assert torch.equal(got[k], t[k])
    assert dict(iter_tensors(tmp_path, ["a"], dtype=torch.float32))["a"].dtype == torch.float32


def test_lumina_wrong_bos_is_corrected_and_options_apply(tmp_path, model):
    out = save_state_dict(model.state_dict(), model.config, tmp_path / "l")
    cfg = json.loads((out / "config.json").read_text())
    cfg["bos_token_id"] = 1 if cfg["bos_token_id"] != 1 else 0  # Lumina-mGPT's config.json is wrong
    (out / "config.json").write_text(json.dumps(cfg))
    m = load_model(out, mask_image_logits=False, z_loss_weight=1e-5)
    assert m.config.bos_token_id == m.config.vocabulary_map["<s>"]
    assert m.config.mask_image_logits is False and m.config.z_loss_weight == 1e-5
    with pytest.raises(TypeError, match="unknown model options"):
        load_model(out, z_los_weight=1.0)
