import pytest
import torch

from chameleon_ft.adapter import export_adapter, load_adapter, read_adapter, weight_updates
from chameleon_ft.errors import ConfigError
from chameleon_ft.model.checkpoint import iter_tensors, load_model
from chameleon_ft.model.modeling import output_weight
from chameleon_ft.training.model_init import build_train_model
from chameleon_ft.training.optim import build_optimizer
from tests.training.helpers import make_cfg, small_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("ck") / "small")


def _build(ckpt, **over):
    cfg = make_cfg(ckpt, **over)
    return build_train_model(cfg.model, cfg.peft, ckpt, device=torch.device("cpu"), base_dtype=torch.float32, seed=0)


def _lora_modules(model):
    return sorted({n.split(".lora_A")[0].replace("base_model.model.", "") for n, _ in model.named_parameters()
                   if ".lora_A." in n})


@pytest.mark.parametrize("preset, names", [
    ("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("all_linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (["v_proj", "down_proj"], ["v_proj", "down_proj"]),
])
def test_lora_targets_only_decoder_linears(ckpt, preset, names):
    model = _build(ckpt, **{"peft.target_modules": preset})
    sub = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    expected = sorted(f"model.layers.{i}.{sub[n]}.{n}" for i in range(2) for n in names)
    assert _lora_modules(model) == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_unknown_preset_and_method_refused(ckpt):
    with pytest.raises(ConfigError, match="attn"):
        _build(ckpt, **{"peft.target_modules": "attn"})
    with pytest.raises(ConfigError, match="qlora"):
        _build(ckpt, **{"peft.method": "qlora"})


def test_full_finetune_trains_everything(ckpt):
    model = _build(ckpt, **{"peft.method": "none"})
    assert all(p.requires_grad for p in model.parameters())


def test_meta_init_streaming_load_equals_plain_load(ckpt):
    """The FSDP path (meta device, to_empty, per-tensor load) gives the same model as load_model."""
    cfg = make_cfg(ckpt, **{"peft.train_image_rows": True, "model.zero_image_lm_head": True})
    plain = build_train_model(cfg.model, cfg.peft, ckpt, device=torch.device("cpu"), base_dtype=torch.float32, seed=3)
    meta = build_train_model(cfg.model, cfg.peft, ckpt, device=torch.device("cpu"), base_dtype=torch.float32, seed=3,
                             shard_fn=lambda m: m)
    a, b = dict(plain.named_parameters()), dict(meta.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    for (ka, va), (kb, vb) in zip(plain.named_buffers(), meta.named_buffers()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=ka)


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "meta_init"])
def test_ambient_default_device_does_not_leak_into_the_build(ckpt, sharded):
    """Lightning runs configure_model under torch.device(root_device) (CUDA on a GPU: there the file reads
    and seeded LoRA draws failed). A foreign default device (meta, the one a CPU machine has) must change
    nothing: same parameters, bit for bit, on the asked device."""
    cfg = make_cfg(ckpt, **{"peft.train_image_rows": True})
    shard = {"shard_fn": (lambda m: m)} if sharded else {}
    want = build_train_model(cfg.model, cfg.peft, ckpt, device=torch.device("cpu"), base_dtype=torch.float32, seed=3,
                             **shard)
    with torch.device("meta"):
        got = build_train_model(cfg.model, cfg.peft, ckpt, device=torch.device("cpu"), base_dtype=torch.float32,
                                seed=3, **shard)
    a, b = dict(want.named_parameters()), dict(got.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].device.type == "cpu", k
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_zero_image_lm_head(ckpt):
    model = _build(ckpt, **{"model.zero_image_lm_head": True, "peft.method": "none"})
    lm = model
    ids = lm.image_token_ids
    ref = dict(iter_tensors(ckpt, ["lm_head.weight"]))["lm_head.weight"]
    w = lm.lm_head.weight.detach()
    assert ref[ids].abs().sum() > 0
    assert torch.all(w[ids] == 0)
    keep = torch.ones(len(w), dtype=torch.bool)
    keep[ids] = False
    torch.testing.assert_close(w[keep], ref[keep], rtol=0, atol=0)


def embedding_weight(lm):
    """The embedding matrix in effect (PEFT's trainable-token layers apply their rows in forward)."""
    return output_weight(lm.model.embed_tokens).detach()


def _image_batch(model):
    ids = model.image_token_ids if hasattr(model, "image_token_ids") else model.get_base_model().image_token_ids
    used = ids[:5]  # only some image tokens appear in the input
    input_ids = torch.tensor([[1, 12, 13, *used.tolist(), 14, 15]])
    labels = input_ids.clone()
    labels[0, :2] = -100
    return input_ids, labels, used


@pytest.mark.parametrize("method", ["none", "lora"])
def test_image_rows_only_those_rows_change_and_export_is_rows_only(ckpt, tmp_path, method):
    cfg = make_cfg(ckpt, **{"peft.method": method, "peft.train_image_rows": True, "model.mask_image_logits": False})
    model = build_train_model(cfg.model, cfg.peft, ckpt, device=torch.device("cpu"), base_dtype=torch.float32, seed=0)
    lm = model.get_base_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "trainable_tokens_delta" in n} and all(
        "trainable_tokens_delta" in n or ".lora_" in n for n in trainable)
    head0, emb0 = output_weight(lm.lm_head).detach().clone(), embedding_weight(lm).clone()
    ref = dict(iter_tensors(ckpt, ["lm_head.weight", "model.embed_tokens.weight"]))
    torch.testing.assert_close(head0, ref["lm_head.weight"], rtol=0, atol=0)  # the rows start at the base
    input_ids, labels, used = _image_batch(lm)
    opt = build_optimizer(model, cfg.optim, total_steps=10)["optimizer"]
    for group in opt.param_groups:
        group["lr"] = 1e-2  # past warmup
    model(input_ids=input_ids, labels=labels).loss.backward()
    opt.step()
    head1, emb1 = output_weight(lm.lm_head).detach(), embedding_weight(lm)
    ids = lm.image_token_ids
    changed_head = (head1 != head0).any(dim=1).nonzero().squeeze(1)
    assert set(changed_head.tolist()) == set(ids.tolist())  # every image row (softmax over all), nothing else
    changed_emb = (emb1 != emb0).any(dim=1).nonzero().squeeze(1)
    assert set(changed_emb.tolist()) == set(used.tolist())  # only image ids that were embedded (no decay)

    # The export holds the rows only, and loading it reproduces the trained weights.
    out = export_adapter(model, tmp_path / "adapter", ckpt)
    tensors = read_adapter(out).tensors
    assert all("trainable_tokens_delta" in k or ".lora_" in k for k in tensors)
    assert tensors[next(k for k in tensors if "lm_head" in k)].shape == (len(ids), lm.config.hidden_size)
    updates = weight_updates(read_adapter(out))
    torch.testing.assert_close(updates.apply("lm_head.weight", ref["lm_head.weight"]), head1, rtol=0, atol=1e-7)
    merged = load_adapter(load_model(ckpt, mask_image_logits=False, z_loss_weight=cfg.model.z_loss_weight), out)
    torch.testing.assert_close(merged.model.embed_tokens.weight, emb1, rtol=0, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids, labels=labels).loss,
                                   model(input_ids=input_ids, labels=labels).loss)


def test_train_exports_image_rows_with_rows_only(ckpt, tmp_path):
    from chameleon_ft.model.tokens import ChameleonTokens
    from chameleon_ft.training.train import train
    from tests.training.helpers import loader_factory

    cfg = make_cfg(ckpt, **{"peft.method": "none", "peft.train_image_rows": True, "trainer.max_steps": 2,
                            "model.mask_image_logits": False})
    train(cfg, tmp_path / "run", loader_factory=loader_factory())
    files = sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    adapter = read_adapter(tmp_path / "run" / "adapter")
    assert adapter.config["peft_type"] == "TRAINABLE_TOKENS"
    assert sorted(adapter.config["token_indices"]) == ChameleonTokens.from_checkpoint(ckpt).image_token_ids.tolist()
    rows = weight_updates(adapter).rows
    base = dict(iter_tensors(ckpt, ["lm_head.weight"]))["lm_head.weight"]
    idx, values = rows["lm_head.weight"]
    assert values.shape == (16, 64) and not torch.equal(values, base[idx])  # trained away from the base rows
    assert not (tmp_path / "run" / "model").exists()  # no full-model export for a rows-only adapter
