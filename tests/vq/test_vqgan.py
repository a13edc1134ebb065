import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonVQVAE,
    ChameleonVQVAEEncoderAttnBlock,
    ChameleonVQVAEEncoderResnetBlock,
)

from chameleon_ft.vq.vqgan import (
    VQGAN,
    VQGANConfig,
    VQGANError,
    VQGANLoadError,
    _AttnBlock,
    _ResnetBlock,
    load_hf_vqgan,
    load_meta_vqgan,
    load_vqgan,
    save_meta_vqgan,
    vq_config_dict,
    vqgan_hf_state_dict,
)
from tests.vq.conftest import tiny_config, write_hf_checkpoint


# --- config ----------------------------------------------------------------------------------
def test_default_config_is_chameleons_and_matches_transformers_defaults():
    cfg = VQGANConfig()
    assert (cfg.embed_dim, cfg.n_embed, cfg.z_channels, cfg.resolution, cfg.ch) == (256, 8192, 256, 512, 128)
    assert cfg.ch_mult == [1, 1, 2, 2, 4] and cfg.num_res_blocks == 2 and cfg.attn_resolutions == []
    assert cfg.downsample == 16 and cfg.double_z is False and cfg.dropout == 0.0
    # transformers' own defaults describe the same model
    assert VQGANConfig.from_hf_dict(ChameleonVQVAEConfig().to_dict()) == cfg


def test_config_round_trips_hf_and_meta():
    cfg = tiny_config()
    d = vq_config_dict(cfg)
    assert d["num_embeddings"] == 64 and d["latent_channels"] == 32 and d["base_channels"] == 32
    assert d["channel_multiplier"] == [1, 1, 1, 1, 2] and d["double_latent"] is False and d["attn_type"] == "vanilla"
    assert VQGANConfig.from_hf_dict(d) == cfg
    assert VQGANConfig.from_hf_dict(ChameleonVQVAEConfig(**d).to_dict()) == cfg
    meta = cfg.to_meta_dict()
    assert meta["model"]["params"]["n_embed"] == 64 and meta["model"]["params"]["ddconfig"]["z_channels"] == 32
    assert VQGANConfig.from_meta_dict(yaml.safe_load(yaml.safe_dump(meta))) == cfg


def test_real_meta_yaml_layout_parses():
    text = """
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 512
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.DummyLoss
"""
    assert VQGANConfig.from_meta_dict(yaml.safe_load(text)) == VQGANConfig()


def test_config_errors():
    with pytest.raises(VQGANError, match="multiples of 32"):
        VQGANConfig(ch=24)
    with pytest.raises(VQGANError, match="double_z"):
        VQGANConfig(double_z=True)
    with pytest.raises(VQGANError, match="attn_type"):
        VQGANConfig.from_hf_dict({"attn_type": "linear"})
    with pytest.raises(VQGANError, match="ddconfig"):
        VQGANConfig.from_meta_dict({"model": {"params": {"embed_dim": 4, "n_embed": 8}}})


# --- modules vs transformers' reference blocks ---------------------------------------------------
def test_decoder_blocks_match_transformers_reference_blocks():
    torch.manual_seed(0)
    hf_cfg = ChameleonVQVAEConfig(dropout=0.0)
    for cin, cout in [(32, 32), (32, 64)]:
        ours, ref = _ResnetBlock(cin, cout, 0.0).eval(), ChameleonVQVAEEncoderResnetBlock(hf_cfg, cin, cout).eval()
        ref.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, cin, 6, 5)
        torch.testing.assert_close(ours(x), ref(x.clone()), rtol=1e-5, atol=1e-5)
    ours, ref = _AttnBlock(64), ChameleonVQVAEEncoderAttnBlock(64)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 64, 4, 3)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_state_dict_keys_follow_taming_names(vqgan):
    keys = set(vqgan.state_dict())
    for k in ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.3.downsample.conv.weight",
              "encoder.down.4.block.0.nin_shortcut.weight", "encoder.down.3.attn.0.q.weight", "encoder.mid.attn_1.proj_out.bias",
              "encoder.norm_out.weight", "encoder.conv_out.weight",
              "decoder.conv_in.weight", "decoder.mid.block_1.norm1.weight", "decoder.mid.attn_1.k.weight",
              "decoder.up.4.block.0.conv1.weight", "decoder.up.4.block.1.conv2.weight", "decoder.up.3.attn.1.v.weight",
              "decoder.up.4.upsample.conv.weight", "decoder.up.3.block.0.nin_shortcut.weight", "decoder.up.1.upsample.conv.weight",
              "decoder.norm_out.bias", "decoder.conv_out.weight",
              "quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.bias"]:
        assert k in keys, k
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)  # level 0 has no upsampling
    # attention only at 4 px: encoder level 3 (32 -> 4 px), decoder level 3 (2 px at level 4, upsampled)
    assert not any(k.startswith(("decoder.up.4.attn.", "decoder.up.2.attn.", "encoder.down.4.attn.")) for k in keys)
    assert vqgan.state_dict()["quantize.embedding.weight"].shape == (64, 8)
    assert vqgan.state_dict()["decoder.conv_in.weight"].shape == (64, 32, 3, 3)  # z_channels -> ch * ch_mult[-1]


# --- encode / decode ------------------------------------------------------------------------------
def test_encode_shapes_and_matches_transformers_vqvae(vqgan):
    x = torch.rand(3, 3, 64, 48) * 2 - 1
    codes = vqgan.encode(x)
    assert codes.shape == (3, 4, 3) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    ref = ChameleonVQVAE(vqgan.config.to_hf_config()).eval()
    state = {k[len("model.vqmodel."):]: v for k, v in vqgan_hf_state_dict(vqgan).items()}
    ref.load_state_dict(state, strict=True)
    with torch.no_grad():
        ref_codes = ref.encode(x).image_tokens
    assert torch.equal(codes.flatten(), ref_codes.flatten())
    assert codes.unique().numel() > 3  # the test is not trivially one code


def test_encode_rejects_bad_input(vqgan):
    with pytest.raises(VQGANError, match="multiple"):
        vqgan.encode(torch.zeros(1, 3, 40, 32))
    with pytest.raises(VQGANError, match=r"\[B, 3, H, W\]"):
        vqgan.encode(torch.zeros(3, 32, 32))
    with pytest.raises(VQGANError, match="float"):
        vqgan.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_decode_shape_range_and_lookup(vqgan):
    codes = torch.randint(0, 64, (2, 3, 2))
    out = vqgan.decode(codes)
    assert out.shape == (2, 3, 48, 32)
    assert out.min() >= -1 and out.max() <= 1
    # decode is codebook lookup -> post_quant_conv -> decoder -> clamp
    with torch.no_grad():
        emb = vqgan.quantize.embedding.weight[codes].permute(0, 3, 1, 2)
        ref = vqgan.decoder(vqgan.post_quant_conv(emb)).clamp(-1, 1)
    torch.testing.assert_close(out, ref)
    with pytest.raises(VQGANError, match=r"\[0, 64\)"):
        vqgan.decode(torch.full((1, 2, 2), 64))
    with pytest.raises(VQGANError, match=r"\[B, h, w\]"):
        vqgan.decode(torch.zeros(2, 2, dtype=torch.long))


# --- Meta files ---------------------------------------------------------------------------------
def test_meta_round_trip_gives_identical_codes_and_images(tmp_path, vqgan):
    save_meta_vqgan(vqgan, tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"vqgan.yaml", "vqgan.ckpt"}
    raw = torch.load(tmp_path / "tok" / "vqgan.ckpt", weights_only=True)
    assert set(raw) == {"state_dict"} and set(raw["state_dict"]) == set(vqgan.state_dict())
    loaded = load_meta_vqgan(tmp_path / "tok")
    assert loaded.config == vqgan.config and loaded.has_decoder and not loaded.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), vqgan.encode(x))
    codes = torch.randint(0, 64, (2, 2, 2))
    assert torch.equal(loaded.decode(codes), vqgan.decode(codes))


def _rewrite_ckpt(tok_dir, edit):
    path = tok_dir / "vqgan.ckpt"
    obj = torch.load(path, weights_only=True)
    edit(obj["state_dict"])
    torch.save(obj, path)
    return path


def test_meta_loading_is_strict_missing_key(tmp_path, vqgan):
    save_meta_vqgan(vqgan, tmp_path / "tok")
    path = _rewrite_ckpt(tmp_path / "tok", lambda sd: sd.pop("decoder.up.2.block.1.conv2.bias"))
    with pytest.raises(VQGANLoadError) as e:
        load_meta_vqgan(tmp_path / "tok")
    assert "missing keys ['decoder.up.2.block.1.conv2.bias']" in str(e.value) and str(path) in str(e.value)


def test_meta_loading_is_strict_unexpected_key(tmp_path, vqgan):
    save_meta_vqgan(vqgan, tmp_path / "tok")
    path = _rewrite_ckpt(tmp_path / "tok", lambda sd: sd.update({"loss.discriminator.main.0.weight": torch.zeros(1)}))
    with pytest.raises(VQGANLoadError) as e:
        load_meta_vqgan(tmp_path / "tok")
    assert "unexpected keys ['loss.discriminator.main.0.weight']" in str(e.value) and str(path) in str(e.value)


def test_meta_loading_shape_mismatch_names_key(tmp_path, vqgan):
    save_meta_vqgan(vqgan, tmp_path / "tok")
    _rewrite_ckpt(tmp_path / "tok", lambda sd: sd.update({"quantize.embedding.weight": torch.zeros(32, 8)}))
    with pytest.raises(VQGANLoadError, match=r"quantize.embedding.weight has shape \[32, 8\], the config expects \[64, 8\]"):
        load_meta_vqgan(tmp_path / "tok")


class _Custom:
    pass


def test_meta_unsafe_or_malformed_ckpt_is_a_clear_error(tmp_path, vqgan):
    save_meta_vqgan(vqgan, tmp_path / "tok")
    ckpt = tmp_path / "tok" / "vqgan.ckpt"
    obj = torch.load(ckpt, weights_only=True)
    obj["hyper_parameters"] = _Custom()
    torch.save(obj, ckpt)
    with pytest.raises(VQGANLoadError, match=r"vqgan.ckpt: cannot be loaded safely .*weights_only=True"):
        load_meta_vqgan(tmp_path / "tok")
    torch.save({"weights": {}}, ckpt)
    with pytest.raises(VQGANLoadError, match="state_dict"):
        load_meta_vqgan(tmp_path / "tok")
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(VQGANLoadError, match="vqgan.ckpt: cannot be loaded safely"):
        load_meta_vqgan(tmp_path / "tok")
    ckpt.unlink()
    with pytest.raises(VQGANLoadError, match="vqgan.ckpt: not found"):
        load_meta_vqgan(tmp_path / "tok")


# --- Hugging Face files ------------------------------------------------------------------------
def test_hf_and_meta_encoders_agree_and_hf_has_no_decoder(checkpoint_dir):
    meta = load_meta_vqgan(checkpoint_dir / "tokenizer")
    hf = load_hf_vqgan(checkpoint_dir)
    assert hf.config == meta.config and not hf.has_decoder
    x = torch.rand(4, 3, 32, 48) * 2 - 1
    assert torch.equal(hf.encode(x), meta.encode(x))
    with pytest.raises(VQGANError, match=r"no decoder .*Hugging Face.*dropped the VQ decoder"):
        hf.decode(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(VQGANError, match="no decoder"):
        save_meta_vqgan(hf, checkpoint_dir / "other")


def test_hf_state_dict_has_only_vq_parts(vqgan):
    keys = vqgan_hf_state_dict(vqgan)
    assert all(k.startswith("model.vqmodel.") for k in keys)
    parts = {k.split(".")[2] for k in keys}
    assert parts == {"encoder", "quantize", "quant_conv", "post_quant_conv"}


def test_hf_single_file_and_strict_errors(tmp_path, vqgan):
    write_hf_checkpoint(vqgan, tmp_path / "single", sharded=False)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(load_hf_vqgan(tmp_path / "single").encode(x), vqgan.encode(x))
    # drop one VQ tensor from a shard: the error names it
    write_hf_checkpoint(vqgan, tmp_path / "sharded")
    shard = tmp_path / "sharded" / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    dropped = next(k for k in sorted(tensors) if k.startswith("model.vqmodel."))
    del tensors[dropped]
    save_file(tensors, str(shard))
    with pytest.raises(VQGANLoadError, match=f"{dropped}.* listed in the index is not in the file"):
        load_hf_vqgan(tmp_path / "sharded")


def test_hf_unexpected_vq_tensor_is_an_error(tmp_path, vqgan):
    write_hf_checkpoint(vqgan, tmp_path / "c", sharded=False)
    tensors = load_file(str(tmp_path / "c" / "model.safetensors"))
    tensors["model.vqmodel.encoder.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(VQGANLoadError, match=r"unexpected keys \['encoder.extra.weight'\]"):
        load_hf_vqgan(tmp_path / "c")


def test_load_vqgan_prefers_meta_files(checkpoint_dir):
    assert load_vqgan(checkpoint_dir).has_decoder
    shutil.rmtree(checkpoint_dir / "tokenizer")
    assert not load_vqgan(checkpoint_dir).has_decoder
    with pytest.raises(VQGANLoadError, match="no VQGAN found"):
        load_vqgan(checkpoint_dir / "nowhere")


def test_load_dtype_and_device(checkpoint_dir):
    v = load_vqgan(checkpoint_dir, dtype=torch.bfloat16, device="cpu")
    assert v.quantize.embedding.weight.dtype == torch.bfloat16
    codes = v.encode(torch.zeros(1, 3, 32, 32))
    assert codes.dtype == torch.long and codes.shape == (1, 2, 2)


def test_real_size_vqgan_has_meta_checkpoint_shapes():
    with torch.device("meta"):  # shapes only: no memory, no compute
        v = VQGAN(VQGANConfig())
    sd = v.state_dict()
    assert sd["quantize.embedding.weight"].shape == (8192, 256)
    assert sd["encoder.conv_out.weight"].shape == (256, 512, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 256, 3, 3)
    assert sd["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert sd["quant_conv.weight"].shape == (256, 256, 1, 1) and sd["post_quant_conv.weight"].shape == (256, 256, 1, 1)
    assert len([k for k in sd if k.startswith("decoder.up.") and k.endswith(".conv1.weight")]) == 5 * 3
    assert not any(".attn.0." in k for k in sd)  # attn_resolutions is empty; only mid.attn_1 attends
