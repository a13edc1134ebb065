import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import ChameleonForConditionalGeneration

from chameleon_ft.export.adapter import (
    IMAGE_ROWS_FILE,
    AdapterExportError,
    ImageRows,
    apply_image_rows,
    export_adapter,
    load_image_rows,
    read_adapter,
    save_image_rows,
)
from chameleon_ft.model.checkpoint import load_model
from chameleon_ft.training.adapters import add_image_row_deltas
from tests.export.helpers import lora_model, random_ids, write_small_checkpoint


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
    # The adapter matters: without it the logits differ.
    with stock.disable_adapter(), torch.no_grad():
        plain = stock(input_ids=ids).logits
    assert (plain - want).abs().max() > 1e-3


def test_export_writes_the_same_tensors_as_peft_save_pretrained(expanded_ckpt, tmp_path):
    ours = lora_model(load_model(expanded_ckpt), seed=5)
    export_adapter(ours, tmp_path / "ours", expanded_ckpt)
    ours.save_pretrained(tmp_path / "peft")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_from_gathered_full_state_dict_with_wrapper_names(expanded_ckpt, tmp_path):
    ours = lora_model(load_model(expanded_ckpt), seed=7)
    # What get_model_state_dict(full_state_dict=True) hands back for an activation-checkpointed model.
    state = {k.replace(".layers.0.", ".layers.0._checkpoint_wrapped_module."): v.clone()
             for k, v in ours.state_dict().items()}
    export_adapter(state, tmp_path / "from_state", expanded_ckpt, peft_config=ours.peft_config["default"])
    export_adapter(ours, tmp_path / "from_model", expanded_ckpt)
    a = load_file(tmp_path / "from_state" / "adapter_model.safetensors")
    b = load_file(tmp_path / "from_model" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((tmp_path / "from_state" / "adapter_config.json").read_text())
            == json.loads((tmp_path / "from_model" / "adapter_config.json").read_text()))


def test_state_dict_without_lora_weights_is_refused(expanded_ckpt, tmp_path):
    ours = lora_model(load_model(expanded_ckpt))
    state = {k: v for k, v in ours.state_dict().items() if ".lora_" not in k}
    with pytest.raises(AdapterExportError, match="no LoRA weights"):
        export_adapter(state, tmp_path / "a", expanded_ckpt, peft_config=ours.peft_config["default"])


def test_image_row_deltas_travel_beside_the_adapter_and_apply_to_stock(expanded_ckpt, tmp_path):
    ours = lora_model(load_model(expanded_ckpt), seed=2)
    add_image_row_deltas(ours, ours.get_base_model().image_token_ids)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("image_rows_delta"):
                p.copy_(torch.randn(p.shape, generator=gen))
    out = export_adapter(ours, tmp_path / "adapter", expanded_ckpt)
    assert (out / IMAGE_ROWS_FILE).exists()
    rows = load_image_rows(out)
    assert torch.equal(rows.row_ids, ours.get_base_model().image_token_ids)
    assert sorted(rows.deltas) == ["lm_head.weight", "model.embed_tokens.weight"]

    stock = stock_with_adapter(expanded_ckpt, out)
    apply_image_rows(stock, rows)
    ids = random_ids(ours.config, seed=8)  # includes image-token ids, so embedding deltas are exercised
    ours.get_base_model().config.mask_image_logits = True
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        got = stock(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Stock masks image logits, so compare the lm_head deltas on the weight itself as well.
    w_ours = ours.get_base_model().lm_head.weight
    w_stock = stock.get_base_model().lm_head.weight
    torch.testing.assert_close(w_stock, w_ours, atol=1e-6, rtol=0)


def test_image_rows_round_trip_and_validation(tmp_path):
    ids = torch.tensor([5, 9, 2])
    d = {"lm_head.weight": torch.randn(3, 4)}
    save_image_rows(tmp_path, ids, d)
    rows = load_image_rows(tmp_path)
    assert torch.equal(rows.row_ids, ids) and torch.equal(rows.deltas["lm_head.weight"], d["lm_head.weight"])
    (tmp_path / "nothing_here").mkdir()
    assert load_image_rows(tmp_path / "nothing_here") is None

    with pytest.raises(AdapterExportError, match="expected \\[3, hidden\\]"):
        save_image_rows(tmp_path, ids, {"lm_head.weight": torch.randn(2, 4)})
    with pytest.raises(AdapterExportError, match="unknown weight"):
        save_image_rows(tmp_path, ids, {"model.norm.weight": torch.randn(3, 4)})
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"row_ids": ids}, str(bad / IMAGE_ROWS_FILE))  # no format metadata
    with pytest.raises(AdapterExportError, match=str(bad / IMAGE_ROWS_FILE).replace("\\", "\\\\")):
        load_image_rows(bad)
    (bad / IMAGE_ROWS_FILE).write_bytes(b"garbage")
    with pytest.raises(AdapterExportError, match="not a readable safetensors"):
        load_image_rows(bad)
    with pytest.raises(AdapterExportError, match="not an adapter directory"):
        read_adapter(tmp_path / "nothing_here")


def test_apply_image_rows_adds_exactly_the_delta():
    lin = torch.nn.Linear(4, 10, bias=False)
    emb = torch.nn.Embedding(10, 4)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head, self.emb = lin, emb

        def get_output_embeddings(self):
            return self.lm_head

        def get_input_embeddings(self):
            return self.emb

    lm = LM()
    before_w, before_e = lin.weight.detach().clone(), emb.weight.detach().clone()
    rows = ImageRows(torch.tensor([1, 7]), {"lm_head.weight": torch.ones(2, 4), "model.embed_tokens.weight": 2 * torch.ones(2, 4)})
    apply_image_rows(lm, rows)
    expect_w, expect_e = before_w.clone(), before_e.clone()
    expect_w[[1, 7]] += 1
    expect_e[[1, 7]] += 2
    assert torch.equal(lin.weight.detach(), expect_w) and torch.equal(emb.weight.detach(), expect_e)


def test_load_image_rows_reads_the_training_wrappers_layout(tmp_path):
    from chameleon_ft.training.adapters import image_row_deltas

    lm = torch.nn.Module()
    lm.lm_head = torch.nn.Linear(4, 12, bias=False)
    lm.model = torch.nn.Module()
    lm.model.embed_tokens = torch.nn.Embedding(12, 4)
    add_image_row_deltas(lm, torch.tensor([3, 8, 5]))
    with torch.no_grad():
        for p in (lm.lm_head.image_rows_delta, lm.model.embed_tokens.image_rows_delta):
            p.normal_()
    save_file(image_row_deltas(lm), str(tmp_path / IMAGE_ROWS_FILE), metadata={"format": "pt"})
    rows = load_image_rows(tmp_path)
    assert rows.row_ids.tolist() == [3, 5, 8]
    assert torch.equal(rows.deltas["lm_head.weight"], lm.lm_head.image_rows_delta.detach())
    assert torch.equal(rows.deltas["model.embed_tokens.weight"], lm.model.embed_tokens.image_rows_delta.detach())
