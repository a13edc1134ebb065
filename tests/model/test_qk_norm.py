import pytest
import torch
from transformers.models.chameleon.modeling_chameleon import ChameleonLayerNorm

from chameleon_ft.model.qk_norm import GroupedQKNorm, QKNormLayoutError, expand_qk_norm, group_qk_norm


@pytest.mark.parametrize("heads,groups", [(4, 2), (32, 1), (64, 8)])
def test_grouped_norm_equals_stock_per_head_norm(heads, groups):
    torch.manual_seed(0)
    ours = GroupedQKNorm(heads, groups, head_dim=16)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    stock = ChameleonLayerNorm((heads, 16))
    with torch.no_grad():
        stock.weight.copy_(expand_qk_norm(ours.weight, heads))
        stock.bias.copy_(expand_qk_norm(ours.bias, heads))
    x = torch.randn(10, heads, 16)
    torch.testing.assert_close(ours(x), stock(x), rtol=0, atol=1e-6)


def test_expand_uses_repeat_interleave_order():
    g = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert expand_qk_norm(g, 4)[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]


def test_round_trip_is_bit_exact():
    g = torch.randn(8, 128, dtype=torch.bfloat16)
    e = expand_qk_norm(g, 64)
    assert torch.equal(group_qk_norm(e, 8), g)
    assert torch.equal(expand_qk_norm(group_qk_norm(e, 8), 64), e)


def test_inconsistent_groups_are_refused_with_name_and_difference():
    e = expand_qk_norm(torch.zeros(2, 4), 4).clone()
    e[3, 1] = 0.25
    with pytest.raises(QKNormLayoutError, match=r"layers\.7\.self_attn\.k_norm.*largest difference 0\.25"):
        group_qk_norm(e, 2, "model.layers.7.self_attn.k_norm.weight")


def test_indivisible_heads_refused():
    with pytest.raises(QKNormLayoutError):
        group_qk_norm(torch.zeros(6, 4), 4)
    with pytest.raises(ValueError):
        GroupedQKNorm(6, 4, 8)
