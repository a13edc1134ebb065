"""The embedded tiny checkpoint: real on-disk layout, both q/k-norm layouts, same model."""

import json

import torch
from transformers import ChameleonForConditionalGeneration

from chameleon_ft.model.checkpoint import iter_tensors, load_model, load_tokenizer, tensor_shapes
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.vq.vqgan import load_hf_vqgan, load_meta_vqgan
from tests.conftest import run_module


def test_layout_on_disk_matches_a_real_checkpoint(tiny_grouped):
    names = {p.name for p in tiny_grouped.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert len([n for n in names if n.startswith("model-0000")]) > 1  # sharded
    assert {p.name for p in (tiny_grouped / "tokenizer").iterdir()} >= {"vqgan.yaml", "vqgan.ckpt", "text_tokenizer.json"}
    cfg = json.loads((tiny_grouped / "config.json").read_text())
    assert cfg["vocabulary_map"] and cfg["vq_config"] and cfg["model_parallel_size"] == 2
    assert cfg["num_attention_heads"] == 4
    shapes = tensor_shapes(tiny_grouped)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (2, 64)
    assert any(n.startswith("model.vqmodel.encoder.") for n in shapes)
    # Meta's VQGAN file carries the decoder; the HF weights carry the encoder only
    assert load_meta_vqgan(tiny_grouped / "tokenizer").has_decoder
    assert not load_hf_vqgan(tiny_grouped).has_decoder


def test_special_tokens_resolve_by_name_at_non_7b_ids(tiny_grouped):
    tokens = ChameleonTokens.from_checkpoint(tiny_grouped)
    tok = load_tokenizer(tiny_grouped)
    assert (tokens.bos, tokens.pad, tokens.eos) != (0, 1, 2)  # 7B's ids: nothing may rely on them
    assert int(tokens.code_to_id[0]) != 4 and tokens.eot != 8710
    assert tok.convert_tokens_to_ids("<racm3:break>") == tokens.boi
    assert tok.convert_ids_to_tokens(int(tokens.code_to_id[7])) == "IMGIMGHZ"


def test_grouped_and_expanded_hold_the_same_model(tiny_grouped, tiny_expanded):
    assert tensor_shapes(tiny_expanded)["model.layers.0.self_attn.q_norm.weight"] == (4, 64)
    a, b = load_model(tiny_grouped), load_model(tiny_expanded)
    assert (a.checkpoint_layout, b.checkpoint_layout) == ("grouped", "expanded")
    ids = torch.randint(0, a.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_ours_equals_stock_transformers_on_the_expanded_checkpoint(tiny_expanded):
    ours = load_model(tiny_expanded)
    stock = ChameleonForConditionalGeneration.from_pretrained(tiny_expanded, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(input_ids=ids).logits, rtol=0, atol=1e-5)
    # the VQ encoder inside stock's checkpoint is the one our VQGAN uses
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        stock_ids = stock.model.get_image_tokens(pixels)
    ours_codes = load_meta_vqgan(tiny_expanded / "tokenizer").encode(pixels)
    tokens = ChameleonTokens.from_checkpoint(tiny_expanded)
    assert torch.equal(stock_ids.reshape(-1), tokens.codes_to_ids(ours_codes).reshape(-1))


def test_cli_builds_same_weights_in_either_layout(tmp_path, tiny_grouped):
    out = tmp_path / "tiny-expanded"
    res = run_module("chameleon_ft.tiny", [f"out={out}", "layout=expanded"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    built, cached = dict(iter_tensors(out)), dict(iter_tensors(tiny_grouped))
    assert built.keys() == cached.keys()
    for name, t in cached.items():
        other = built[name]
        if other.shape != t.shape:  # q/k norm: expanded rows repeat the groups
            other = other[:: other.shape[0] // t.shape[0]]
        assert torch.equal(other, t), name


def test_building_the_checkpoint_leaves_the_callers_random_numbers_alone(tmp_path):
    """A run that builds the tiny checkpoint on first use draws the same numbers afterwards as a cached one."""
    from chameleon_ft.tiny.build import build_tiny_checkpoint

    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_tiny_checkpoint(tmp_path / "fresh")
    assert torch.equal(torch.get_rng_state(), state)


def test_image_token_rows_follow_the_vq_codebook(tiny_grouped):
    """The base's image-token rows of embed_tokens and lm_head are the codebook through a linear map: codes
    close in the codebook are close in the model, while the text rows keep their random init."""
    import numpy as np

    from chameleon_ft.model.assets import CheckpointAssets
    from chameleon_ft.model.checkpoint import load_model

    assets = CheckpointAssets.open(tiny_grouped)
    model = load_model(tiny_grouped)
    codebook = assets.vqgan("cpu").quantize.embedding.weight.detach().double()
    ids = assets.tokens.image_token_ids
    codes = assets.tokens.ids_to_codes(ids)
    centred = (codebook - codebook.mean(0))[codes]
    for weight in (model.get_input_embeddings().weight, model.lm_head.weight):
        rows = weight.detach().double()[ids]
        # Exactly linear in the codebook vectors: least squares from 32 dims reproduces all 256-dim rows.
        fit = torch.linalg.lstsq(centred, rows).solution
        assert torch.allclose(centred @ fit, rows, atol=1e-5 * rows.abs().max())
        text = weight.detach().double()[: int(ids.min())]
        assert abs(rows.std().item() - text.std().item()) < 0.1 * text.std().item()  # scaled like the rest
        d_code = torch.cdist(centred, centred).flatten().numpy()
        d_row = torch.cdist(rows, rows).flatten().numpy()
        assert np.corrcoef(d_code, d_row)[0, 1] > 0.8
        # The text rows are not codebook-shaped: a 32-dim linear fit leaves most of them unexplained.
        probe = text[: len(ids)]
        resid = probe - centred[: len(probe)] @ torch.linalg.lstsq(centred[: len(probe)], probe).solution
        assert resid.norm() > 0.5 * probe.norm()
