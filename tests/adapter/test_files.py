"""Adapter directories: stock-loadable PEFT files, image-token rows, settings, and reading them back."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import ChameleonForConditionalGeneration

from chameleon_ft.adapter import SampleSettings, export_adapter, load_adapter, read_adapter, weight_updates
from chameleon_ft.errors import CheckpointError
from chameleon_ft.model.checkpoint import load_model
from tests.export.helpers import lora_model, lora_with_image_rows, random_ids, write_small_checkpoint


@pytest.fixture(scope="module")
def expanded_ckpt(tmp_path_factory):
    return write_small_checkpoint(tmp_path_factory.mktemp("ckpt") / "base", layout="expanded")


def stock_with_adapter(base, adapter_dir):
    stock = ChameleonForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(stock, adapter_dir).eval()


def n_lora_modules(model):
    return sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))


def test_exported_adapter_loads_in_stock_peft_and_gives_our_logits(expanded_ckpt, tmp_path):
    ours = lora_model(load_model(expanded_ckpt))
    out = export_adapter(ours, tmp_path / "adapter", expanded_ckpt)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(expanded_ckpt)
    assert cfg["target_modules"] == ["o_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["modules_to_save"] is None
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"

    stock = stock_with_adapter(expanded_ckpt, out)
    # Plain names must not catch anything outside the decoder layers (e.g. the VQ model).
    assert n_lora_modules(stock) == n_lora_modules(ours) == 2 * 4
    ids = random_ids(ours.config, seed=3)
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        got = stock(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with stock.disable_adapter(), torch.no_grad():  # the adapter matters: without it the logits differ
        plain = stock(input_ids=ids).logits
    assert (plain - want).abs().max() > 1e-3


def test_export_writes_the_same_tensors_as_peft_save_pretrained(expanded_ckpt, tmp_path):
    ours = lora_with_image_rows(load_model(expanded_ckpt), seed=5)
    export_adapter(ours, tmp_path / "ours", expanded_ckpt)
    ours.save_pretrained(tmp_path / "peft")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and any("trainable_tokens_delta" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_from_gathered_full_state_dict_with_wrapper_names(expanded_ckpt, tmp_path):
    ours = lora_model(load_model(expanded_ckpt), seed=7)
    # What get_model_state_dict(full_state_dict=True) hands back for an activation-checkpointed model.
    state = {k.replace(".layers.0.", ".layers.0._checkpoint_wrapped_module."): v.clone()
             for k, v in ours.state_dict().items()}
    export_adapter(ours, tmp_path / "from_state", expanded_ckpt, state_dict=state)
    export_adapter(ours, tmp_path / "from_model", expanded_ckpt)
    a = load_file(tmp_path / "from_state" / "adapter_model.safetensors")
    b = load_file(tmp_path / "from_model" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((tmp_path / "from_state" / "adapter_config.json").read_text())
            == json.loads((tmp_path / "from_model" / "adapter_config.json").read_text()))


def test_a_model_without_adapter_weights_is_refused(expanded_ckpt, tmp_path):
    ours = lora_model(load_model(expanded_ckpt))
    state = {k: v for k, v in ours.state_dict().items() if ".lora_" not in k}
    with pytest.raises(CheckpointError, match="no adapter weights"):
        export_adapter(ours, tmp_path / "a", expanded_ckpt, state_dict=state)
    with pytest.raises(CheckpointError, match="no PEFT adapter"):
        export_adapter(load_model(expanded_ckpt), tmp_path / "b", expanded_ckpt)


def test_image_rows_travel_in_the_adapter_and_stock_peft_applies_them(expanded_ckpt, tmp_path):
    ours = lora_with_image_rows(load_model(expanded_ckpt))
    out = export_adapter(ours, tmp_path / "adapter", expanded_ckpt)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    stock = stock_with_adapter(expanded_ckpt, out)
    ids = random_ids(ours.config, seed=8)  # includes image-token ids, so embedding rows are exercised
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        got = stock(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Stock masks image logits, so compare the merged lm_head rows on the weight itself as well.
    merged_stock = stock.merge_and_unload().lm_head.weight
    merged_ours = load_adapter(load_model(expanded_ckpt), out).lm_head.weight
    torch.testing.assert_close(merged_stock, merged_ours, atol=1e-6, rtol=0)


def test_weight_updates_reproduce_the_merged_weights(expanded_ckpt, tmp_path):
    ours = lora_with_image_rows(load_model(expanded_ckpt), seed=9)
    out = export_adapter(ours, tmp_path / "adapter", expanded_ckpt)
    updates = weight_updates(read_adapter(out))
    assert set(updates.rows) == {"lm_head.weight", "model.embed_tokens.weight"}
    assert len(updates.lora) == 2 * 4
    base = load_model(expanded_ckpt).state_dict()
    merged = load_adapter(load_model(expanded_ckpt), out).state_dict()
    for name in updates.targets:
        torch.testing.assert_close(updates.apply(name, base[name].clone()), merged[name], atol=1e-6, rtol=0, msg=name)
    untouched = "model.layers.0.mlp.down_proj.weight"
    assert untouched not in updates.targets


def test_settings_round_trip_and_bad_directories(tmp_path):
    s = SampleSettings(task="vqa", prompt_template="{question}?", image_layout="lumina", image_size=64)
    s.save(tmp_path)
    assert SampleSettings.load(tmp_path) == s
    assert SampleSettings.load(tmp_path / "nowhere") is None
    (tmp_path / "chameleon_ft.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="chameleon_ft.json: invalid JSON"):
        SampleSettings.load(tmp_path)

    with pytest.raises(CheckpointError, match="adapter directory not found"):
        read_adapter(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not an adapter directory"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="'IA3'"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_adapter(tmp_path)
