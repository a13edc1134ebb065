"""bf16-mixed LoRA training against fp32 on CPU, the dtypes it really uses, its export, and activation
checkpointing: on CUDA (``pytest -m gpu``) and, at the same tiny size, on CPU."""

import pytest

from tests.gpu.checks import (
    check_activation_checkpointing,
    check_adapter_roundtrip,
    check_dtypes,
    check_losses_track_reference,
    train_run,
)
from tests.gpu.conftest import DEVICES

STEPS = 4
# Two micro-batches per step, as in the one-rank FSDP run (tests/gpu/test_fsdp.py), which then shares
# the fp32 CPU reference run.
ACCUMULATE = ["trainer.accumulate_grad_batches=2"]


@pytest.fixture(scope="module", params=DEVICES)
def bf16_run(request, tmp_path_factory, fp32_cpu_reference):
    """The bf16-mixed run on the device and the fp32 CPU run of the same data order."""
    device = request.param
    run = train_run(tmp_path_factory.mktemp(f"bf16_{device}"), device, "bf16", steps=STEPS, extra=ACCUMULATE)
    return run, fp32_cpu_reference(STEPS, ACCUMULATE)


def test_bf16_lora_losses_track_the_fp32_cpu_run(bf16_run, record):
    run, ref = bf16_run
    assert sorted(ref.steps) == list(range(STEPS))
    record(check_losses_track_reference(run, ref))


def test_frozen_base_is_bf16_and_trainables_grads_and_adam_state_are_fp32(bf16_run, record):
    run, ref = bf16_run
    record(check_dtypes(run.dtypes, "bf16", run.device))
    record(check_dtypes(ref.dtypes, "fp32", "cpu", name="dtypes_fp32_reference"))


def test_exported_adapter_gives_the_trained_logits_on_cpu(bf16_run, record):
    run, _ = bf16_run
    record(check_adapter_roundtrip(run))


@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(device, record):
    record(check_activation_checkpointing(device, "bf16"))
