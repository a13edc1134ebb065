"""Packed documents on the device: every document implementation's loss and gradients against the dense
mask (``sdpa`` rows), on CUDA (``pytest -m gpu``) and, where it can train, on CPU."""

import pytest
import torch

from chameleon_ft.model.attention import flash_attn_available
from tests.data.test_collator import make_samples
from tests.gpu.conftest import NO_CUDA
from tests.model.helpers import small_config
from tests.model.test_attention import LENGTHS, model_with, packed_batch

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]
CASES = [
    pytest.param("cpu", "sdpa_documents", torch.float32, id="cpu-sdpa_documents"),
    pytest.param("cuda", "sdpa_documents", torch.float32, id="cuda-sdpa_documents", marks=CUDA),
    pytest.param("cuda", "flex_attention", torch.float32, id="cuda-flex_attention", marks=CUDA),
    pytest.param("cuda", "flash_attention_2", torch.bfloat16, id="cuda-flash_attention_2", marks=[
        *CUDA, pytest.mark.skipif(not flash_attn_available(), reason="needs flash-attn (pip install flash-attn)")]),
]


def loss_and_grads(implementation: str, device: str, dtype: torch.dtype, samples):
    model = model_with(implementation, device_type=device).to(device=device, dtype=dtype).train()
    batch, _ = packed_batch(implementation, samples)
    batch = {k: v.to(device) for k, v in batch.items() if k != "sample_index"}
    out = model(**batch)
    out.loss_sums.loss_sum.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss_sums.loss_sum), grads


@pytest.mark.parametrize(("device", "implementation", "dtype"), CASES)
def test_packed_documents_train_like_the_dense_mask(device, implementation, dtype):
    samples = make_samples(LENGTHS, small_config().vocab_size, seed=5)
    ref_loss, ref_grads = loss_and_grads("sdpa", device, dtype, samples)
    loss, grads = loss_and_grads(implementation, device, dtype, samples)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    assert loss == pytest.approx(ref_loss, rel=tol["rtol"])
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, msg=name, **tol)
