"""Fitting the tiny checkpoint's VQGAN to the digit scans (chameleon_ft.tiny.build.fit_tiny_vqgan)."""

import torch

from chameleon_ft.tiny.build import fit_tiny_vqgan
from tests.vq.conftest import blob_images, make_vqgan


def _fit(seed):
    v = make_vqgan(seed=1)
    images = blob_images(48)
    rng = torch.get_rng_state()
    stats = fit_tiny_vqgan(v, images, seed=seed, decoder_steps=25, max_seconds=120, batch_size=8)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG stream is left alone
    return v, images, stats


def test_fit_tiny_vqgan_is_deterministic_and_improves_reconstructions():
    v_init = make_vqgan(seed=1)
    images = blob_images(48)
    with torch.no_grad():
        mse_init = torch.mean((v_init.decode(v_init.encode(images)) - images) ** 2).item()
    a, _, stats = _fit(seed=3)
    b, _, _ = _fit(seed=3)
    c, _, _ = _fit(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["quantize.embedding.weight"], sc["quantize.embedding.weight"])
    # the encoder is untouched; codebook, decoder and post_quant_conv are fitted
    assert all(torch.equal(sa[k], v_init.state_dict()[k]) for k in sa if k.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(sa["decoder.conv_out.weight"], v_init.state_dict()["decoder.conv_out.weight"])
    with torch.no_grad():
        mse_fit = torch.mean((a.decode(a.encode(images)) - images) ** 2).item()
    assert mse_fit < 0.35 * mse_init, (mse_init, mse_fit)
    assert stats["steps"] == 25 and stats["mse_after"] < stats["mse_before"]
    assert a.encode(images).unique().numel() >= 16  # k-means codes are informative
    assert not a.training and a.decoder.conv_in.weight.is_contiguous()
