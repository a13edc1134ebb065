import pytest
import torch
from transformers import ChameleonForConditionalGeneration

from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from chameleon_ft.model.qk_norm import expand_qk_norm
from tests.model.helpers import randomize_, small_config


def stock_twin(ours: ChameleonFTForCausalLM) -> ChameleonForConditionalGeneration:
    """Stock transformers model carrying our weights in the expanded layout."""
    cfg = ours.config
    stock = ChameleonForConditionalGeneration(cfg).eval()
    state = {}
    for k, v in ours.state_dict().items():
        if ".q_norm." in k:
            v = expand_qk_norm(v, cfg.num_attention_heads)
        elif ".k_norm." in k:
            v = expand_qk_norm(v, cfg.num_key_value_heads)
        state[k] = v
    missing, unexpected = stock.load_state_dict(state, strict=False)
    assert not unexpected and all(m.startswith("model.vqmodel.") for m in missing)
    return stock


@pytest.mark.parametrize(
    "kw", [dict(), dict(swin=True, heads=16, kv_heads=16, groups=8, hidden=128), dict(kv_heads=2, groups=2)],
    ids=["7b-prenorm", "34b-swin-8-groups", "gqa"],
)
def test_logits_equal_stock_transformers(kw):
    cfg = small_config(**kw)
    ours = randomize_(ChameleonFTForCausalLM(cfg)).eval()
    stock = stock_twin(ours)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_stock_loss_is_inf_on_image_labels_ours_finite_when_unmasked():
    cfg = small_config()
    ours = randomize_(ChameleonFTForCausalLM(cfg)).eval()
    stock = stock_twin(ours)
    image_ids = torch.tensor(stock.model.vocabulary_mapping.image_tokens)
    ids = image_ids[torch.randint(0, len(image_ids), (2, 10))]
    with torch.no_grad():
        assert torch.isinf(stock(input_ids=ids, labels=ids).loss)
        assert torch.isinf(ours(ids, labels=ids).loss)  # masking on: same as stock
        cfg.mask_image_logits = False
        loss = ours(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss > 0


def test_z_loss_is_added_and_reported():
    cfg = small_config(z_loss_weight=0.0)
    model = randomize_(ChameleonFTForCausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size - 16, (2, 9))
    with torch.no_grad():
        base = model(ids, labels=ids)
        cfg.z_loss_weight = 1e-2
        with_z = model(ids, labels=ids)
    n = with_z.loss_sums.n_tokens
    torch.testing.assert_close(with_z.loss, base.loss + 1e-2 * with_z.loss_sums.z_sum / n)


def test_residual_dropout_only_in_training():
    cfg = small_config(dropout=0.3)
    model = randomize_(ChameleonFTForCausalLM(cfg))
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    model.train()
    a, b = model(ids).logits, model(ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)


def test_loss_path_logits_match_logit_path():
    cfg = small_config(mask_image_logits=False)
    model = randomize_(ChameleonFTForCausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        out = model(ids, labels=ids, return_logits=True)
        ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)


def test_generate_with_cache_matches_without():
    cfg = small_config()
    model = randomize_(ChameleonFTForCausalLM(cfg)).eval()
    ids = torch.randint(3, 30, (1, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=cfg.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        a = model.generate(ids, use_cache=True, **kw)
        b = model.generate(ids, use_cache=False, **kw)
    assert a.shape == (1, 11) and torch.equal(a, b)
