import pytest
import torch
import torch.nn.functional as F

from chameleon_ft.model.loss import fused_lm_loss


def reference(hidden, weight, labels, z_w=0.0, masked=None):
    logits = (hidden @ weight.t()).float()[:, :-1]
    if masked is not None:
        logits[..., masked] = torch.finfo(logits.dtype).min
    y = labels[:, 1:]
    keep = y != -100
    ce = F.cross_entropy(logits[keep], y[keep], reduction="sum")
    z = torch.logsumexp(logits[keep], -1).square().sum()
    return ce + z_w * z, ce, z, int(keep.sum())


@pytest.mark.parametrize("z_w", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_matches_plain_cross_entropy_values_and_grads(z_w, chunk):
    torch.manual_seed(0)
    B, T, H, V = 3, 17, 32, 101
    h1 = torch.randn(B, T, H, requires_grad=True)
    w1 = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = -100
    labels[2, 10:] = -100
    h2, w2 = h1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()

    sums = fused_lm_loss(h1, w1, labels, z_loss_weight=z_w, chunk_size=chunk)
    (sums.loss_sum / sums.n_tokens).backward()
    ref, ce, z, n = reference(h2, w2, labels, z_w)
    (ref / n).backward()

    assert int(sums.n_tokens) == n
    torch.testing.assert_close(sums.loss_sum, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.ce_sum, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.z_sum, z, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_per_token_losses_and_masking():
    torch.manual_seed(1)
    h = torch.randn(2, 9, 16)
    w = torch.randn(50, 16)
    labels = torch.randint(0, 40, (2, 9))
    masked = torch.arange(40, 50)
    sums = fused_lm_loss(h, w, labels, masked_ids=masked, chunk_size=4)
    logits = (h @ w.t())[:, :-1]
    logits[..., 40:] = torch.finfo(logits.dtype).min
    ref = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(sums.token_ce, ref[sums.token_index], rtol=1e-5, atol=1e-5)
    # a masked id as a target is impossible: infinite loss, exactly like stock Chameleon
    labels[0, 3] = 45
    assert torch.isinf(fused_lm_loss(h, w, labels, masked_ids=masked).loss_sum)


def test_frozen_weight_gets_no_grad_and_no_targets_is_zero():
    h = torch.randn(1, 5, 8, requires_grad=True)
    w = torch.randn(20, 8)
    sums = fused_lm_loss(h, w, torch.full((1, 5), -100))
    assert int(sums.n_tokens) == 0 and float(sums.loss_sum.detach()) == 0.0
    sums.loss_sum.backward()
    assert torch.count_nonzero(h.grad) == 0 and w.grad is None


def test_bf16_hidden_close_to_fp32():
    torch.manual_seed(2)
    h = torch.randn(2, 33, 64)
    w = torch.randn(300, 64) * 0.1
    y = torch.randint(0, 300, (2, 33))
    a = fused_lm_loss(h, w, y).loss_sum
    b = fused_lm_loss(h.bfloat16(), w.bfloat16(), y).loss_sum
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=2e-2, atol=0)
