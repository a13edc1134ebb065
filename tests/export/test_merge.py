import json

import pytest
import torch
from transformers import ChameleonForConditionalGeneration

import chameleon_ft.export.merge as merge_mod
from chameleon_ft.adapter import SampleSettings, export_adapter
from chameleon_ft.errors import CheckpointError
from chameleon_ft.export.merge import merge_adapter
from chameleon_ft.model.checkpoint import INDEX_FILE, load_model, tensor_shapes
from tests.conftest import run_module
from tests.export.helpers import lora_model, lora_with_image_rows, random_ids, write_small_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A grouped base checkpoint, a LoRA + image-row model on it, and its exported adapter (with settings)."""
    root = tmp_path_factory.mktemp("merge")
    base = write_small_checkpoint(root / "base", layout="grouped", seed=3)
    model = lora_with_image_rows(load_model(base, mask_image_logits=False), seed=11)
    settings = SampleSettings(task="vqa", prompt_template="{question}", image_layout="lumina", image_size=32)
    adapter = export_adapter(model, root / "adapter", base, settings=settings)
    return base, model, adapter


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layout", ["grouped", "expanded"])
def test_merged_checkpoint_reproduces_the_adapter_model(trained, tmp_path, layout):
    base, model, adapter = trained
    out = merge_adapter(base, adapter, tmp_path / "merged", layout=layout)
    shapes = tensor_shapes(out)
    groups, heads = model.config.model_parallel_size, model.config.num_attention_heads
    assert shapes["model.layers.0.self_attn.q_norm.weight"][0] == (groups if layout == "grouped" else heads)
    assert json.loads((out / "config.json").read_text())["qk_norm_layout"] == layout
    assert SampleSettings.load(out) == SampleSettings.load(adapter)  # the settings travel into the merge
    merged = load_model(out, mask_image_logits=False)
    ids = random_ids(model.config, seed=4)
    # Image logits are unmasked, so the lm_head image-row deltas show in the comparison.
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    assert (logits(load_model(base, mask_image_logits=False), ids) - logits(model, ids)).abs().max() > 1e-3


def test_expanded_merge_loads_in_stock_transformers(trained, tmp_path):
    base, model, adapter = trained
    out = merge_adapter(base, adapter, tmp_path / "merged", layout="expanded")
    stock = ChameleonForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(model.config, seed=5)
    model.get_base_model().config.mask_image_logits = True  # stock always masks image logits
    try:
        want = logits(model, ids)
    finally:
        model.get_base_model().config.mask_image_logits = False
    torch.testing.assert_close(logits(stock, ids), want, atol=1e-5, rtol=1e-5)


def test_merge_streams_one_shard_at_a_time(trained, tmp_path, monkeypatch):
    base, model, adapter = trained
    reads = []
    real = merge_mod.iter_tensors

    def spy(path, names=None, dtype=None):
        batch = []
        reads.append(batch)
        for name, t in real(path, names, dtype):
            batch.append(t.numel() * t.element_size())
            yield name, t

    monkeypatch.setattr(merge_mod, "iter_tensors", spy)
    limit = 40_000
    out = merge_adapter(base, adapter, tmp_path / "merged", layout="grouped", max_shard_bytes=limit)
    index = json.loads((out / INDEX_FILE).read_text())
    n_shards = len(set(index["weight_map"].values()))
    assert n_shards > 3 and len(reads) == n_shards
    biggest = max(max(b) for b in reads)
    assert all(sum(b) <= max(limit, biggest) for b in reads)
    assert sorted(index["weight_map"]) == sorted(tensor_shapes(base))


def test_merge_command_with_key_value_arguments(trained, tmp_path):
    base, model, adapter = trained
    res = run_module("chameleon_ft.merge", [f"base={base}", f"adapter={adapter}", f"out={tmp_path / 'm'}",
                                                   "layout=expanded", "dtype=bfloat16"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "merged checkpoint (expanded q/k norm) written to" in res.stdout
    merged = load_model(tmp_path / "m", mask_image_logits=False)
    ids = random_ids(model.config, seed=6)
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=0.05, rtol=0.05)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "BF16"


def test_modules_to_save_replace_the_base_weight(tmp_path):
    base = write_small_checkpoint(tmp_path / "base", layout="expanded", seed=8)
    model = lora_model(load_model(base, mask_image_logits=False), seed=9, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.5)
    adapter = export_adapter(model, tmp_path / "adapter", base)
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    merged = load_model(merge_adapter(base, adapter, tmp_path / "merged"), mask_image_logits=False)
    ids = random_ids(model.config, seed=10)
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_adapter_for_another_model_is_refused_with_its_path(trained, tmp_path):
    base, _, adapter = trained
    from chameleon_ft.model.checkpoint import save_state_dict
    from chameleon_ft.model.modeling import ChameleonFTForCausalLM
    from tests.model.helpers import small_config

    cfg = small_config(hidden=32)
    other = save_state_dict(ChameleonFTForCausalLM(cfg).state_dict(), cfg, tmp_path / "other")
    with pytest.raises(CheckpointError, match=str(adapter)):
        merge_adapter(other, adapter, tmp_path / "out")
    res = run_module("chameleon_ft.merge", [f"base={other}", f"adapter={adapter}", f"out={tmp_path / 'o2'}"],
                     cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and str(adapter) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert not (tmp_path / "o2").exists()
