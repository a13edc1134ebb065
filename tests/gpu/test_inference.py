"""VQ encoding, generation and the fused loss on CUDA (``pytest -m gpu``) against CPU, and the same checks
at tiny sizes on CPU."""

import pytest

from tests.gpu.checks import check_fused_loss, check_generation, check_loss_memory, check_vq_codes
from tests.gpu.conftest import DEVICES

# CUDA: every bundled digit, the 7B vocabulary and width at 4,096 tokens; CPU: small enough for seconds.
SIZES = {
    "cpu": {"images": 48, "loss": dict(vocab=4096, hidden=256, seq=512, chunk=128),
            "memory": dict(vocab=16_384, hidden=512, seq=2048, chunk=256, goal=0.5)},
    "cuda": {"images": None, "loss": dict(vocab=65_536, hidden=4096, seq=4096, chunk=1024),
             "memory": dict(vocab=65_536, hidden=4096, seq=4096, chunk=1024, goal=0.25)},
}


@pytest.mark.parametrize("device", DEVICES)
def test_vq_codes_match_cpu(device, record):
    record(check_vq_codes(device, n_images=SIZES[device]["images"]))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_text_and_guided_image_generation_match_cpu(device, dtype, record):
    record(check_generation(device, dtype))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_loss_matches_plain_fp32_cross_entropy(device, dtype, record):
    record(check_fused_loss(device, dtype=dtype, **SIZES[device]["loss"]))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_loss_peak_memory_ratio(device, record):
    record(check_loss_memory(device, **SIZES[device]["memory"]))
